"""Training views: the papers' random resized crop and horizontal flip, from a seeded pool.

Every official implementation trains on augmented images (Dassl's ``random_resized_crop`` +
``random_flip``, bicubic): ZIP, BlackVIP, BAR and ZO-SGD draw a fresh view for every query
batch; CraFT and SharpZO encode one augmented pass of the training set once and reuse it.

A fresh view per query defeats a feature cache, so bbpt draws views from a finite pool:
view ``v`` of image ``i`` is a pure function of (run seed, image id, v), and its cache key
is ``"<id>~<tag>.<v>"`` (the tag hashes seed, spec and size), so the black box encodes each
view once and the fast path holds. Views are encoded in fixed blocks (view v of 32
consecutive images, :data:`VIEW_BLOCK`) whatever the order they are first drawn in, so a
resumed run gets bit-identical features. With
``pool = 0`` every draw is a new view sent without a key (re-encoded, as the official
loaders do); ``bench/view_pool.py`` measures how large the pool must be to match that.

Crops follow torchvision's ``RandomResizedCrop.get_params`` (scale, ratio (3/4, 4/3), ten
tries, then a centre crop) on the *source* image (the file at full resolution, or the
task's array), resized to the model's S with bicubic antialiasing, then flipped with p = ½.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadInput
from .core import ImageSet, _array_to_pixels, _decode_guard, _open_image, _reason, to_rgb

RATIO = (3 / 4, 4 / 3)  # torchvision's and Dassl's default aspect-ratio range
VIEW_BLOCK = 32  # views encoded together: view v of images [32 j, 32 j + 32)
MEMO_BYTES = 1 << 30  # view pixels kept in memory up to this size, else recomputed per request


@dataclass(frozen=True)
class ViewSpec:
    """How training views are drawn: crop scale range, flip, pool size (0: unbounded)."""

    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    pool: int = 16


class TrainViews:
    """Seeded augmented views of an :class:`ImageSet` at size S.

    ``pixels(idx, views)`` gives (n, 3, S, S) in [0, 1]; ``keys(idx, views)`` their cache keys
    (None when the pool is unbounded). ``draw(rng, n)`` picks n view numbers from ``rng``
    (the caller's RNG, whose state it saves), so a resumed run draws the same views.
    """

    def __init__(self, images: ImageSet, size: int, spec: ViewSpec, seed: int):
        self.images, self.size, self.spec, self.seed = images, size, spec, seed
        self._params: dict[tuple[int, int], tuple[int, int, int, int, bool]] = {}
        self._dims: dict[int, tuple[int, int]] = {}
        self._memo: dict[tuple[int, int], torch.Tensor] = {}
        self._memo_max = MEMO_BYTES // (3 * size * size * 4) if spec.pool else 0
        # in every key: equal keys promise equal pixels, so the views' seed, spec and size are part of it
        self.tag = hashlib.blake2b(f"{seed}:{spec}:{size}".encode(), digest_size=4).hexdigest()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) view numbers: uniform over the pool, or new ones when the pool is unbounded."""
        return rng.integers(0, self.spec.pool or 2**62, size=n)

    def keys(self, idx, views) -> list[str] | None:
        if not self.spec.pool:
            return None
        return [f"{self.images.ids[i]}~{self.tag}.{int(v)}" for i, v in zip(idx, views)]

    def view_seed(self, i: int, v: int) -> int:
        """The torch seed that draws view v of image i (run seed, image id and v, hashed)."""
        digest = hashlib.blake2b(f"{self.seed}:{self.images.ids[i]}:{v}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    def params(self, i: int, v: int) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flipped) of view v of image i on its source image."""
        key = (int(i), int(v))
        if key not in self._params:
            from torchvision.transforms import RandomResizedCrop

            H, W = self._dim(int(i))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.view_seed(int(i), int(v)))
                t, left, h, w = RandomResizedCrop.get_params(torch.empty(1, H, W), list(self.spec.scale), list(RATIO))
                flipped = self.spec.flip and bool(torch.rand(1).item() < 0.5)
            if not self.spec.pool:  # an unbounded pool: every view is new, nothing worth keeping
                return (t, left, h, w, flipped)
            self._params[key] = (t, left, h, w, flipped)
        return self._params[key]

    def pixels(self, idx, views) -> torch.Tensor:
        out = [self._view(int(i), int(v)) for i, v in zip(idx, views)]
        if not out:
            return torch.zeros(0, 3, self.size, self.size)
        x = torch.stack(out)
        return x if self.images.shift is None else _shift(self.images, x, idx)

    def _view(self, i: int, v: int) -> torch.Tensor:
        hit = self._memo.get((i, v))
        if hit is not None:
            return hit
        import torchvision.transforms.functional as TF

        t, left, h, w, flipped = self.params(i, v)
        S = self.size
        if self.images.array is not None:
            a = self.images.array[i : i + 1, t : t + h, left : left + w]  # (1, h, w[, 3]) uint8
            x = _array_to_pixels(a, S)[0]  # crop, then bicubic antialiased resize to S
        else:
            from PIL import Image

            with _opened(self.images.paths[i]) as im, _decode_guard(im):  # crop, then resize: torchvision's order
                im = to_rgb(im).crop((left, t, left + w, t + h)).resize((S, S), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        if flipped:
            x = TF.hflip(x)
        if len(self._memo) < self._memo_max:
            self._memo[(i, v)] = x
        return x

    def _dim(self, i: int) -> tuple[int, int]:
        """(H, W) of image i's source."""
        if self.images.array is not None:
            return tuple(self.images.array.shape[1:3])
        if i not in self._dims:
            with _opened(self.images.paths[i]) as im:
                self._dims[i] = (im.size[1], im.size[0])
        return self._dims[i]


@contextlib.contextmanager
def _opened(path: str):
    """``_open_image`` whose failures (a file gone or broken since the split was checked) are
    one-line BadInput errors, as for the test transform's reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_image(path) as im:
            yield im
    except FileNotFoundError:
        raise BadInput(f"image file {path} does not exist; check the dataset folder or split file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadInput(f"cannot read image {path} ({_reason(e, path)}); remove or replace the file") from None


def _shift(images: ImageSet, x: torch.Tensor, idx) -> torch.Tensor:
    from .shift import apply_shift

    return apply_shift(images.shift, x, images.ids[np.asarray(idx, dtype=np.int64)])
