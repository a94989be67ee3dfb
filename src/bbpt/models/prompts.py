"""What a query sends: candidate prompts (hard templates, soft context vectors, visual prompt
tokens) and images, as plain value types (:mod:`bbpt.models.blackbox` says what the black box
does with them).

This module imports nothing of bbpt but :mod:`bbpt.errors`: the few-shot data staging
(:mod:`bbpt.data.staging`) builds :class:`Images` without reaching into the box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import BadInput


def preview(text: str, n: int = 40) -> str:
    """``text`` cut to about ``n`` characters for an error message."""
    return text if len(text) <= n else text[:n].rstrip() + " ..."


@dataclass(frozen=True)
class TextPrompt:
    """P hard prompts: templates with ``{}`` where the class name goes."""

    templates: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.templates, str):
            object.__setattr__(self, "templates", (self.templates,))
        elif not isinstance(self.templates, tuple):
            try:
                object.__setattr__(self, "templates", tuple(self.templates))
            except TypeError:
                raise BadInput(
                    f"TextPrompt takes a template string or a sequence of them, got {type(self.templates).__name__}"
                ) from None
        if not self.templates:
            raise BadInput("TextPrompt needs at least one template, e.g. TextPrompt('a photo of a {}.')")
        for t in self.templates:
            if not isinstance(t, str):
                raise BadInput(f"templates must be strings, got {type(t).__name__}; e.g. 'a photo of a {{}}.'")
            if "{}" not in t:
                raise BadInput(f"template {t!r} has no '{{}}' for the class name, e.g. 'a photo of a {{}}.'")
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                raise BadInput(
                    f"template {t!r} must have exactly one '{{}}' for the class name and no other fields; "
                    "write literal braces as '{{{{' and '}}}}'"
                ) from None

    @property
    def num_prompts(self) -> int:
        return len(self.templates)


@dataclass
class SoftPrompt:
    """P soft prompts: context vectors ``ctx`` (P, m, D), or class-specific (P, C, m, D)."""

    ctx: torch.Tensor
    suffix: str = "."

    @property
    def num_prompts(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def num_ctx(self) -> int:
        return int(self.ctx.shape[-2])


@dataclass
class VisualPrompt:
    """P sets of n visual prompt tokens (P, n, W), W the ViT's width (``BlackBox.visual_width``)."""

    tokens: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Images:
    """A batch of images as float RGB in [0, 1], (B, 3, S, S), with optional cache keys; or
    prompted images, one batch per candidate, (P, B, 3, S, S), never cached; or, with
    ``pixels=None``, images by key alone: ones uploaded earlier (:meth:`BlackBox.upload`).

    ``keys[i]`` names image i *as sent* (its id plus augmentation view): equal keys promise
    equal pixels, which lets the black box reuse the image features. None: never cached.
    """

    pixels: torch.Tensor | None
    keys: Sequence[str] | None = None

    def __post_init__(self):
        if self.pixels is None and self.keys is None:
            raise BadInput("Images: give pixels, or the keys of uploaded images")
        check_keys(self)

    @property
    def per_candidate(self) -> bool:
        return self.pixels is not None and self.pixels.ndim == 5

    @property
    def num_prompts(self) -> int:
        return int(self.pixels.shape[0]) if self.per_candidate else 1

    def __len__(self) -> int:
        """B, the images scored under each candidate."""
        if self.pixels is None:
            return len(self.keys)
        return int(self.pixels.shape[-4]) if self.pixels.ndim >= 4 else len(self.pixels)


def check_keys(images: Images) -> None:
    """Keys, when given: one string per image, and only on a single (4-d) batch."""
    keys, px = images.keys, images.pixels
    if keys is None:
        return
    if torch.is_tensor(px) and px.ndim == 5:
        raise BadInput("Images: per-candidate (prompted) pixels (P, B, 3, S, S) cannot carry cache keys")
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__") or not hasattr(keys, "__getitem__"):
        raise BadInput(
            f"Images: keys must be a list of strings, one per image, got {type(keys).__name__}; "
            "e.g. keys=[f'{image_id}:{view}' for ...]"
        )
    for i, k in enumerate(keys):
        if not isinstance(k, str):
            raise BadInput(
                f"Images: keys must be strings, got {type(k).__name__} at position {i}; "
                "convert them, e.g. keys=[str(k) for k in keys]"
            )
    if px is not None and len(keys) != len(images):
        raise BadInput(f"Images: {len(images)} images but {len(keys)} keys; pass one key per image")
    if px is None and len(keys) == 0:
        raise BadInput("a query needs at least one image")
