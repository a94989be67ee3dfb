"""The checks every black box makes before it charges a query, from its public metadata alone."""
from __future__ import annotations

import math

import torch

from ..errors import BadInput
from .prompts import Images, SoftPrompt, TextPrompt, VisualPrompt, check_keys


def _is_numpy(x) -> bool:
    return type(x).__module__.split(".")[0] == "numpy"


def _fmt(v: float) -> str:
    """Two decimals, unless that would round a value just outside [0, 1] back into it."""
    s = f"{v:.2f}"
    return s if (0.0 <= float(s) <= 1.0) == (0.0 <= v <= 1.0) else f"{v:.8g}"


class QueryChecks:
    """The checks every black box makes before it charges (types, shapes, dtypes, ranges,
    NaN/Inf), from its public metadata alone: shared by :class:`BlackBox` and the HTTP
    client :class:`bbpt.serve.client.RemoteBlackBox`.

    Each ``check_*`` raises :class:`~bbpt.errors.BadInput` (one line) or returns; the part
    checks return the number of candidates they carry (P or 1)."""

    def check_shapes(self, prompt, images: Images, visual: VisualPrompt | None = None) -> int:
        """Every refusal that needs no tokenizer; returns P, the number of candidates."""
        self.check_images(images)
        Pt = self.check_prompt(prompt)
        Pv = self.check_visual(visual)
        P = max(Pt, Pv, images.num_prompts)
        for what, n in (("text prompts", Pt), ("visual prompts", Pv), ("per-candidate image batches", images.num_prompts)):
            if n not in (1, P):
                raise BadInput(f"{n} {what} for {P} candidates: each part of a query comes in P or 1")
        if images.pixels is None and visual is not None:
            raise BadInput("visual prompt tokens re-encode the images: send their pixels, not uploaded ids")
        return P

    def check_images(self, images) -> None:
        if not isinstance(images, Images):
            raise BadInput(f"images must be bbpt.models.Images, got {type(images).__name__}")
        if images.pixels is not None:
            self.check_pixels(images.pixels)
        check_keys(images)  # again: the keys may have been replaced since construction

    def check_pixels(self, px: torch.Tensor) -> None:
        S = self.image_size
        if _is_numpy(px):
            raise BadInput(
                "images are a numpy array; pass a torch tensor: torch.from_numpy(x).float() / 255 for uint8, "
                "torch.from_numpy(x) for floats in [0, 1]"
            )
        if torch.is_tensor(px) and not torch.is_floating_point(px):
            fix = "pixels.float()" if px.dtype == torch.bool else "pixels.float() / 255"
            raise BadInput(f"images are {px.dtype}; bbpt expects float RGB in [0, 1]: use {fix}")
        if not torch.is_tensor(px) or px.ndim not in (4, 5) or tuple(px.shape[-3:]) != (3, S, S):
            shape = tuple(px.shape) if torch.is_tensor(px) else type(px).__name__
            raise BadInput(
                f"images must be (B, 3, {S}, {S}) RGB in [0, 1] for {self.model_name} "
                f"(or (P, B, 3, {S}, {S}) prompted per candidate); got {shape}"
            )
        if px.numel() == 0:
            raise BadInput("a query needs at least one image")
        lo, hi = (float(v) for v in torch.aminmax(px))  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise BadInput("images contain NaN or inf")
        if lo < 0.0 or hi > 1.0:
            raise BadInput(
                f"images have values in [{_fmt(lo)}, {_fmt(hi)}], outside [0, 1]; pass unnormalised RGB "
                "in [0, 1] (bbpt applies the model's mean/std itself)"
            )

    def check_visual(self, visual) -> int:
        if visual is None:
            return 1
        if not isinstance(visual, VisualPrompt):
            raise BadInput(f"visual must be a bbpt.models.VisualPrompt, got {type(visual).__name__}")
        W = self.visual_width
        if W is None:
            raise BadInput(f"{self.model_name} has no ViT image tower: visual prompt tokens are not supported")
        t = visual.tokens
        if not torch.is_tensor(t):
            raise BadInput(f"visual prompt tokens must be a torch tensor (P, n, {W}), got {type(t).__name__}")
        if not torch.is_floating_point(t):
            raise BadInput(f"visual prompt tokens are {t.dtype}; they must be floating point, e.g. tokens.float()")
        if t.ndim != 3 or t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] != W:
            raise BadInput(f"visual prompt tokens must be (P, n, {W}) with P, n >= 1; got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise BadInput("visual prompt tokens contain NaN or inf")
        return visual.num_prompts

    def check_prompt(self, prompt) -> int:
        if isinstance(prompt, TextPrompt):
            return prompt.num_prompts
        if not isinstance(prompt, SoftPrompt):
            raise BadInput(f"prompt must be a TextPrompt or SoftPrompt, got {type(prompt).__name__}")
        ctx, D, C = prompt.ctx, self.ctx_dim, self.num_classes
        if not torch.is_tensor(ctx):
            raise BadInput(f"soft prompt ctx must be a torch tensor (P, m, {D}), got {type(ctx).__name__}")
        if not torch.is_floating_point(ctx):
            raise BadInput(f"soft prompt ctx is {ctx.dtype}; context vectors must be floating point, e.g. ctx.float()")
        if not isinstance(prompt.suffix, str):
            raise BadInput(f"soft prompt suffix must be a string such as '.', got {type(prompt.suffix).__name__}")
        ok = ctx.ndim == 3 and ctx.shape[-1] == D or ctx.ndim == 4 and ctx.shape[1] == C and ctx.shape[-1] == D
        if not ok or ctx.shape[0] == 0 or ctx.shape[-2] == 0:
            raise BadInput(
                f"soft prompt ctx must be (P, m, {D}) or class-specific (P, {C}, m, {D}) with P, m >= 1; "
                f"got {tuple(ctx.shape)}"
            )
        if not torch.isfinite(ctx).all():
            raise BadInput("soft prompt ctx contains NaN or inf")
        return prompt.num_prompts
