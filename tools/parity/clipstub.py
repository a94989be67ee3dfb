"""The toy CLIP (:mod:`toy`) in the shape of OpenAI's ``clip`` package and model, so that the
official statements that build prompts and run the text encoder (CraFT's and SharpZO's
``TextEncoder`` / ``PromptLearner``) run unchanged on it.

OpenAI's text path is x = transformer(prompts + positional_embedding); ln_final; pick the
<eot> position; @ text_projection. With zero positions, a "transformer" that returns the
running sum over positions of tanh(x_j W1[j]) (causal, as CLIP's), an identity ln_final and
text_projection = W2, that path computes exactly the toy's text features.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from official import stub
from toy import ToyCLIP


class _RunningSum(nn.Module):
    def __init__(self, W1: torch.Tensor):
        super().__init__()
        self.W1 = W1  # (L, D, H)

    def forward(self, x):  # (L, N, D), CLIP's LND layout
        L = x.shape[0]
        return torch.tanh(torch.einsum("lnd,ldh->lnh", x, self.W1[:L])).cumsum(0)  # (L, N, H)


class _Identity(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))  # CraFT reads ctx_dim from ln_final.weight

    def forward(self, x):
        return x


class ToyClipModel(nn.Module):
    """What the official code reads of ``clip_model``."""

    def __init__(self, toy: ToyCLIP):
        super().__init__()
        self.toy = toy
        self.token_embedding = nn.Embedding.from_pretrained(toy.E.clone(), freeze=True)
        self.positional_embedding = nn.Parameter(torch.zeros(toy.context_length, toy.width), requires_grad=False)
        self.transformer = _RunningSum(toy.W1)
        self.ln_final = _Identity(toy.width)
        self.text_projection = nn.Parameter(toy.W2.clone(), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor(100.0).log(), requires_grad=False)

    @property
    def dtype(self):
        return torch.float32

    def encode_image(self, images):
        return self.toy.encode_image(images)


def clip_modules(toy: ToyCLIP) -> dict:
    """Stub modules ``clip`` and ``clip.simple_tokenizer`` over the toy's tokenizer."""

    def tokenize(texts, context_length=None, truncate=False):
        return toy.tokenize([texts] if isinstance(texts, str) else list(texts))

    class SimpleTokenizer:
        def encode(self, text):
            return [toy.ids[w] for w in toy.words(text)]

    simple = stub("clip.simple_tokenizer", SimpleTokenizer=SimpleTokenizer)
    clip = stub("clip", tokenize=tokenize, simple_tokenizer=simple, load=None)
    clip.__path__ = []  # a package, so `from clip.simple_tokenizer import ...` resolves
    return {"clip": clip, "clip.simple_tokenizer": simple}
