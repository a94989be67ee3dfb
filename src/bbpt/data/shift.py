"""Distribution-shift variants of a task's test split: ``load_task("NAME@SHIFT")``.

A shift is a deterministic function of an image's pixels and its id, applied by
:meth:`ImageSet.pixels` after resizing, so every backbone resolution sees the same kind of
shift. Only the test split is shifted (train and val stay the source's, as the shift is
what the learned prompt is evaluated on), and shifted images get the id ``"<id>@<shift>"``
so a feature cache keyed by id never mixes them with the clean ones.

| shift    | what it does to pixels x in [0, 1], (n, 3, S, S)                                  |
|----------|------------------------------------------------------------------------------------|
| inverted | 1 - x                                                                              |
| rotated  | rotation by ±[30, 60] degrees (sign and angle seeded by image id), edges replicated |
| noised   | x + N(0, 0.15²) per pixel and channel (seeded by image id), clamped to [0, 1]       |
| blurred  | Gaussian blur, σ = S / 28 (one source pixel of a 28×28 image at any size S)        |
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING, Callable, Sequence

from ..registry import Registry

if TYPE_CHECKING:  # imported by the shifts themselves: naming them (`bbpt datasets`) needs no torch
    import torch

ShiftFn = Callable[["torch.Tensor", Sequence[str]], "torch.Tensor"]  # (pixels (n,3,S,S), ids) -> pixels
SHIFTS: Registry[ShiftFn] = Registry("shift", hint="Use --dataset NAME@SHIFT, e.g. fashion-mnist@inverted.")
NOISE_SIGMA = 0.15
ROTATION_DEGREES = (30.0, 60.0)


def _generator(image_id: str, salt: str) -> torch.Generator:
    """A torch RNG seeded by the image id (stable across processes, unlike ``hash``)."""
    import torch

    digest = hashlib.blake2b(f"{salt}:{image_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@SHIFTS.register("inverted")
def inverted(x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
    return 1.0 - x


@SHIFTS.register("noised")
def noised(x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
    import torch

    noise = torch.stack([torch.randn(x.shape[1:], generator=_generator(i, "noised")) for i in ids]) if len(ids) else 0
    return (x + NOISE_SIGMA * noise).clamp_(0.0, 1.0)


@SHIFTS.register("rotated")
def rotated(x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if not len(ids):
        return x
    lo, hi = ROTATION_DEGREES
    u = torch.stack([torch.rand(2, generator=_generator(i, "rotated")) for i in ids])  # (n, 2)
    angle = torch.deg2rad(lo + (hi - lo) * u[:, 0]) * torch.where(u[:, 1] < 0.5, -1.0, 1.0)  # (n,)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (n, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0.0, 1.0)


@SHIFTS.register("blurred")
def blurred(x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    S = x.shape[-1]
    sigma = S / 28
    r = min(math.ceil(3 * sigma), S - 1)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    n, c = x.shape[:2]
    y = x.reshape(n * c, 1, *x.shape[2:])  # separable: rows, then columns
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(x.shape).clamp_(0.0, 1.0)


def apply_shift(name: str, x: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
    """Shift ``name`` applied to pixels x (n, 3, S, S) in [0, 1] of the images ``ids``."""
    return SHIFTS.get(name)(x, [str(i) for i in ids])


def shift_task(task, name: str):
    """The task with its test split shifted by ``name``; train and val unchanged."""
    SHIFTS.get(name)  # unknown names fail here, with the valid ones listed
    return dataclasses.replace(task, name=f"{task.name}@{name}", test=task.test.with_shift(name),
                               meta={**task.meta, "shift": name})
