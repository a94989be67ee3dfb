"""Data staging: the few-shot images a method may send to the black box, as black-box inputs.

:class:`FewShotData` holds a labelled few-shot set (plain, or as training views, uploaded to
the run's black box block by block); :class:`BatchStream` (endless shuffled batches, with
explicit state) and :class:`WholeSet` (the whole set every step) are what a method draws its
training batches from. The engine builds them; the methods read them.

The batches are :class:`bbpt.models.prompts.Images`, the box's input value type (a module
that imports nothing of bbpt but :mod:`bbpt.errors`); the box itself is only a type here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..models.prompts import Images
from .core import ImageSet

if TYPE_CHECKING:
    from ..models.protocol import BlackBoxAPI

PRELOAD_BYTES = 1 << 30  # few-shot pixels are kept in memory up to this size, else decoded per request


class FewShotData:
    """The labelled few-shot images a method may send to the black box, plain (CLIP's test
    transform) or, with ``views`` (:class:`bbpt.data.views.TrainViews`), as training views."""

    def __init__(self, images: ImageSet, image_size: int, preload: bool = True, views=None):
        self.set, self.views = images, views
        self._box: BlackBoxAPI | None = None
        self._uploaded: set[tuple[int, int]] = set()  # (view, block) uploaded to the box
        self.labels = torch.from_numpy(images.labels)  # (N,)
        self.keys = [str(k) for k in images.ids]
        self.image_size = image_size
        small = len(images) * 3 * image_size**2 * 4 <= PRELOAD_BYTES
        self._pixels = images.pixels(size=image_size) if preload and small else None  # (N, 3, S, S), or per call

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, idx=None, views=None) -> Images:
        """Images ``idx`` (all if None) as a black-box input, keyed by image id; with ``views``
        (view numbers, one per image) their training views, keyed by id and view. Keyed views
        are first uploaded to the attached black box in their fixed blocks (free)."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        if views is not None:
            if self._box is not None and self.views.spec.pool:
                self.encode_blocks(idx, views, self._uploaded, lambda im: self._box.upload(im))
            return Images(self.views.pixels(idx, views), self.views.keys(idx, views))
        px = self._pixels[idx] if self._pixels is not None else self.set.pixels(idx, self.image_size)
        return Images(px, [self.keys[i] for i in idx])

    def attach(self, box: BlackBoxAPI) -> None:
        """The run's black box: training views are uploaded to it block by block before use."""
        self._box = box

    def draw_views(self, rng: np.random.Generator, n: int):
        """n fresh view numbers from ``rng``, or None without training views (the RNG untouched,
        so a run without views draws exactly what it drew before views existed)."""
        return None if self.views is None else self.views.draw(rng, n)

    def one_pass(self) -> Images:
        """The whole set as one augmented pass (view 0 of every image), or plain."""
        if self.views is None:
            return self.images()
        zeros = np.zeros(len(self), dtype=np.int64)
        images = self.images(None, zeros)
        if images.keys is None:  # an unbounded pool: the one pass is still one fixed view, so it is keyed
            images = Images(images.pixels, [f"{k}~{self.views.tag}.0" for k in self.keys])
        return images

    def encode_blocks(self, idx, views, done: set, encode: Callable[[Images], object]) -> None:
        """Call ``encode`` on each fixed block (view v of images [B j, B j + B)) holding one of
        the views ``idx``/``views`` and not yet in ``done``, so every view is encoded with the
        same companions whatever the order views are drawn in (bit-exact across a resume)."""
        from .views import VIEW_BLOCK

        for v, j in sorted({(int(v), int(i) // VIEW_BLOCK) for i, v in zip(idx, views)} - done):
            ii = np.arange(j * VIEW_BLOCK, min((j + 1) * VIEW_BLOCK, len(self)))
            vv = np.full(len(ii), v)
            encode(Images(self.views.pixels(ii, vv), self.views.keys(ii, vv)))
            done.add((v, j))

    def chunks(self, size: int):
        """All images in order, ``size`` at a time (uploads, whole-set encodes)."""
        for i in range(0, len(self), size):
            yield self.images(np.arange(i, min(i + size, len(self))))

    def batches(self, batch_size: int, rng: np.random.Generator, drop_last: bool = True):
        """One epoch of shuffled batches (Images, labels). With ``drop_last`` the last partial
        batch is dropped when there are at least ``batch_size`` images (Dassl's loaders);
        without, it is kept (CraFT's, ``datasets/utils.py`` build_data_loader)."""
        order = rng.permutation(len(self))
        stop = epoch_stop(len(self), batch_size) if drop_last else len(self)
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield self.images(idx, self.draw_views(rng, len(idx))), self.labels[idx]


def epoch_stop(n: int, batch_size: int) -> int:
    """Where an epoch's batches stop: full batches only when n >= batch_size (drop_last)."""
    return n - n % batch_size if n >= batch_size else n


class BatchStream:
    """Endless epochs of shuffled training batches, with explicit state (RNG, order, position):
    with training views, a fresh view of each image per batch (ZIP, BlackVIP, BAR, ZO-SGD)."""

    def __init__(self, data: FewShotData, batch_size: int, seed: int):
        self.data, self.batch_size = data, batch_size
        self.rng = np.random.default_rng(seed)
        self.order: np.ndarray | None = None  # this epoch's permutation
        self.pos = 0

    def next(self) -> tuple[Images, torch.Tensor]:
        if self.order is None or self.pos >= epoch_stop(len(self.data), self.batch_size):
            self.order, self.pos = self.rng.permutation(len(self.data)), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data.images(idx, self.data.draw_views(self.rng, len(idx))), self.data.labels[idx]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.order, self.pos = s["order"], int(s["pos"])


class WholeSet:
    """The whole few-shot set, every step (BBT, CraFT, SharpZO, BPT-VLM): no state. With
    training views, one augmented pass, drawn once and encoded once (CraFT, SharpZO)."""

    def __init__(self, data: FewShotData):
        self.images, self.labels = data.one_pass(), data.labels

    def next(self) -> tuple[Images, torch.Tensor]:
        return self.images, self.labels

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, s: dict) -> None:
        pass

