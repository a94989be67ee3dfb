"""Labelled image sets and tasks: what every data source is turned into.

An :class:`ImageSet` holds images either as one uint8 array (the offline tasks) or as file
paths read on demand (ImageFolder / CoOp datasets), with integer labels and a stable string
id per image; the id is the key of the black box's image-feature cache. An optional
``shift`` (:mod:`bbpt.data.shift`) transforms the pixels after resizing. A :class:`Task`
bundles class names, prompt templates and train / val / test image sets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInput
from .shift import SHIFTS, apply_shift


def data_dir() -> Path:
    """Where prepared data and few-shot caches live: ``$BBPT_DATA`` or ``~/.cache/bbpt/data``."""
    return Path(os.environ.get("BBPT_DATA") or Path.home() / ".cache" / "bbpt" / "data")


@dataclass
class ImageSet:
    """N labelled images. Exactly one of ``array`` (N,H,W) / (N,H,W,3) uint8 or ``paths``."""

    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) str, unique within a task: the feature-cache key
    array: np.ndarray | None = None
    paths: Sequence[str] | None = None
    shift: str | None = None  # a name in bbpt.data.shift.SHIFTS, applied by pixels()

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=str)
        if (self.array is None) == (self.paths is None):
            raise ValueError("ImageSet needs exactly one of array= or paths=")
        n = len(self.array) if self.array is not None else len(self.paths)
        if len(self.labels) != n or len(self.ids) != n:
            raise ValueError(f"ImageSet: {n} images but {len(self.labels)} labels, {len(self.ids)} ids")
        if self.shift is not None:
            SHIFTS.get(self.shift)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(
            labels=self.labels[idx],
            ids=self.ids[idx],
            array=None if self.array is None else self.array[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            shift=self.shift,
        )

    def with_shift(self, name: str) -> "ImageSet":
        """The same images shifted by ``name``, with ids ``"<id>@<name>"``."""
        if self.shift is not None:
            raise BadInput(f"images are already shifted ({self.shift}); apply one shift at a time")
        return ImageSet(labels=self.labels, ids=np.char.add(self.ids, f"@{name}"), array=self.array,
                        paths=self.paths, shift=name)

    def pixels(self, idx=None, size: int = 224) -> torch.Tensor:
        """Images ``idx`` as float RGB in [0, 1], (n, 3, size, size).

        Arrays are resized whole (bicubic, antialiased); files get CLIP's test transform
        (shorter side to ``size``, centre crop). Then the shift, if any.
        """
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        if self.array is not None:
            x = _array_to_pixels(self.array[idx], size)
        elif len(idx):
            x = torch.stack([_read_image(self.paths[i], size) for i in idx])
        else:
            x = torch.zeros(0, 3, size, size)
        return x if self.shift is None else apply_shift(self.shift, x, self.ids[idx])


def _array_to_pixels(a: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0)
    if x.ndim == 3:  # (n, H, W) gray -> (n, 3, H, W)
        x = x[:, None].expand(-1, 3, -1, -1)
    else:  # (n, H, W, 3)
        x = x.permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0).contiguous()


def _read_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            # torchvision's Resize(size) + CenterCrop(size), as in CLIP's test transform
            im = im.resize((max(size, int(w * s)), max(size, int(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise BadInput(f"image file {path} does not exist; check the dataset folder or split file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read image {path} ({e}); remove or replace the file") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


@dataclass
class Task:
    """A classification task: class names, prompt templates, and its splits."""

    name: str
    classnames: list[str]
    templates: list[str]  # templates[0] is the zero-shot template, "{}" marks the class
    train: ImageSet
    val: ImageSet
    test: ImageSet
    description: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __post_init__(self):
        for split in ("train", "val", "test"):
            s: ImageSet = getattr(self, split)
            if len(s) and (s.labels.min() < 0 or s.labels.max() >= len(self.classnames)):
                raise BadInput(
                    f"task {self.name}: {split} labels span {s.labels.min()}..{s.labels.max()} "
                    f"but there are {len(self.classnames)} classes; fix the labels or the class list"
                )
            if len(np.unique(s.ids)) != len(s.ids):
                raise BadInput(f"task {self.name}: {split} image ids are not unique; every image needs its own id")
