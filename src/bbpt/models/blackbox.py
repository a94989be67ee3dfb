"""The black box: class scores for a batch of images under a batch of candidate prompts.

This is the only thing a tuning method may touch. In: P candidate prompts (hard templates
or soft context vectors), B images, and optionally a visual prompt; out: logits (P, B, C)
over the task's C classes. Visual prompts come in two kinds:

- prompted pixels (BlackVIP, BAR): the client modifies the images itself and sends them,
  one batch for all candidates (B, 3, S, S) or one per candidate (P, B, 3, S, S), without
  cache keys;
- visual prompt tokens (BPT-VLM): :class:`VisualPrompt` tokens (P, n, W) appended after a
  ViT's patch tokens.

Image features are cached only when neither is in play (4-d pixels with keys, no visual
tokens); otherwise every image is re-encoded and the meter's ``images_encoded`` says so.
:meth:`BlackBox.upload` fills that cache ahead of time (an API's image upload: not a query).

The black box refuses before it charges: a query is checked in full (types, shapes, dtypes,
pixel range, finiteness, the P-or-1 rule, the visual-token limit, the budget, every text
fitting the text context) and only then charged to a :class:`QueryMeter`, before anything
is computed; a refused query costs nothing, and one the budget refuses is not even
tokenised. Several queries answered together are charged all or nothing. Pixels are float RGB in [0, 1], unnormalised: the box applies the model's mean/std
itself, so uint8 or already-normalised pixels are refused rather than silently mis-scored.

Methods never see weights, features or gradients through it (outputs are detached, computed
under ``torch.no_grad``); the white-box CoOp reference is the one exception and says so.

Where each part lives (this module re-exports their public names):

- :mod:`bbpt.models.prompts`: what a query sends (:class:`TextPrompt`, :class:`SoftPrompt`,
  :class:`VisualPrompt`, :class:`Images`);
- :mod:`bbpt.models.checks`: :class:`QueryChecks`, the refusals every box makes before it charges;
- :mod:`bbpt.models.protocol`: :class:`BlackBoxAPI`, all that a method may use;
- :mod:`bbpt.models.caches`: :class:`ByteLRU` and :class:`FeatureCache`;
- :mod:`bbpt.models.texts`: prompt assembly (token ids, soft-prompt sequences, text features);
- :mod:`bbpt.models.localbox`: the in-process :class:`BlackBox` and :func:`query_many`.
"""
from __future__ import annotations

from .caches import ByteLRU, FeatureCache
from .checks import QueryChecks
from .localbox import ENCODE_BYTES, IMAGE_CHUNK, PRECISIONS, VISUAL_TOKENS, BlackBox, image_tokens, query_many
from .protocol import BlackBoxAPI
from .prompts import Images, SoftPrompt, TextPrompt, VisualPrompt
from .texts import TEXT_CACHE_BYTES, PromptTexts

__all__ = [
    "ENCODE_BYTES", "IMAGE_CHUNK", "PRECISIONS", "TEXT_CACHE_BYTES", "VISUAL_TOKENS", "BlackBox", "BlackBoxAPI", "ByteLRU",
    "FeatureCache", "Images", "PromptTexts", "QueryChecks", "SoftPrompt", "TextPrompt", "VisualPrompt",
    "image_tokens", "query_many",
]
