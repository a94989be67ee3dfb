"""WHITE-BOX access to the model: the CoOp reference alone receives it.

Black-box methods get a :class:`bbpt.models.BlackBox` and may only query it. The white-box
reference (``black_box = False``, CoOp) back-propagates through the text tower, so it needs
the model itself; the engine hands this object only to such a method (``Env.white_box``).
Its training forwards are charged to the run's meter, for comparison with the black-box
methods' query counts, though they are not black-box queries.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .backbone import Backbone
from .localbox import BlackBox, encode_chunk, encode_pixels
from .meter import QueryMeter
from .prompts import SoftPrompt
from .texts import PromptTexts, text_features


class WhiteBox:
    def __init__(self, backbone: Backbone, classnames: Sequence[str], meter: QueryMeter):
        self._box = BlackBox(backbone, classnames, meter)  # the black box on the same classes: its input checks
        self._texts = PromptTexts(backbone, classnames)  # the black box's prompt assembly, with gradients here
        self._bb, self.meter = backbone, meter

    @property
    def logit_scale(self) -> float:
        return self._bb.logit_scale

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, 3, S, S) -> normalised image features (N, E), frozen tower,
        as many images per forward as the black box's default (:func:`encode_chunk`)."""
        return encode_pixels(self._bb, pixels, encode_chunk(self._bb.image_size)).cpu()

    def text_features(self, prompt: SoftPrompt) -> torch.Tensor:
        """(P, C, E) normalised text features with gradients to ``prompt.ctx``."""
        self._box.check_prompt(prompt)
        self._texts.ids(prompt)
        with torch.enable_grad():
            return text_features([(self._texts, prompt)])[0]

    def charge(self, num_prompts: int, num_images: int) -> None:
        """Count a training forward as the equivalent query (for comparison only)."""
        self.meter.charge(num_prompts, num_images)
