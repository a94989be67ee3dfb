"""Labelled image sets and tasks: what every data source is turned into.

An :class:`ImageSet` holds images either as one uint8 array (the offline tasks) or as file
paths read on demand (ImageFolder / CoOp datasets), with integer labels and a stable string
id per image; the id is the key of the black box's image-feature cache. An optional
``shift`` (:mod:`bbpt.data.shift`) transforms the pixels after resizing. A :class:`Task`
bundles class names, prompt templates and train / val / test image sets.

Images on disk are opened through :func:`_open_image`, which enforces bbpt's pixel limit
(:func:`max_image_pixels`) from the header alone, before any decoding; :func:`check_images`
decodes every image of a split (JPEGs at 1/8 scale) before training, so a broken file is
refused before the first query.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit
CHECK_THREADS = 4
PROGRESS_MIN_FILES = 2000  # check_images shows a bar only above this many files


def max_image_pixels() -> int:
    """Largest width*height bbpt will decode: ``$BBPT_MAX_IMAGE_PIXELS`` or PIL's default."""
    raw = os.environ.get("BBPT_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInput(f"BBPT_MAX_IMAGE_PIXELS must be a positive integer, got {raw!r}; unset it or set e.g. 200000000")
    return n


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


# PIL's own bomb check reads the module global Image.MAX_IMAGE_PIXELS; bbpt lifts it (None)
# only while it opens a header or decodes an image its own limit allows, under this lock, so
# threads never see each other's value and PIL never warns or raises on bbpt's behalf.
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit_lifted():
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _mpx(n: int) -> str:
    return f"{n / 1e6:.1f} Mpx" if n >= 100_000 else f"{n} px"


def _open_image(path: str, what: str = "image"):
    """``Image.open`` (header only) that refuses images over :func:`max_image_pixels`."""
    from PIL import Image

    limit = max_image_pixels()
    with _pil_limit_lifted():
        im = Image.open(path)
    w, h = im.size
    if w * h > limit:
        im.close()
        raise BadInput(
            f"{what} {path} is {w}x{h} ({_mpx(w * h)}), over bbpt's limit of {_mpx(limit)} (a guard against "
            "decompression bombs); downscale it or raise BBPT_MAX_IMAGE_PIXELS"
        )
    return im


def _decode_guard(im):
    """Lift PIL's limit while decoding ``im`` only if bbpt's (raised) limit let it past PIL's."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:  # not None mid-way through another thread's open
        pil = Image.MAX_IMAGE_PIXELS
    big = pil is not None and im.size[0] * im.size[1] > pil
    return _pil_limit_lifted() if big else contextlib.nullcontext()


def _read_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_image(path) as im, _decode_guard(im):
            return preprocess_pil(im, size)
    except FileNotFoundError:
        raise BadInput(f"image file {path} does not exist; check the dataset folder or split file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadInput(f"cannot read image {path} ({_reason(e, path)}); remove or replace the file") from None


def to_rgb(im):
    """A PIL image in RGB: ``im`` itself if it is RGB, else converted.

    PIL converts the 16- and 32-bit integer modes (``I;16`` of a 16-bit grayscale PNG or
    TIFF, ``I;16B``, ..., ``I``) by clipping at 255, which turns almost every pixel white;
    here they are scaled instead, value / 257 rounded (0..65535 -> 0..255), with ``I`` read as
    16-bit too (what older Pillows open a 16-bit PNG as) and values outside 0..65535 clipped.
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # native byte order, room for a * 255
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def preprocess_pil(im, size: int) -> torch.Tensor:
    """A PIL image -> (3, size, size) float RGB in [0, 1] by CLIP's test transform:
    torchvision's Resize(size) (shorter side, bicubic) + CenterCrop(size)."""
    from PIL import Image

    im = to_rgb(im)
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, int(w * s)), max(size, int(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    a = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def _reason(e: Exception, path: str) -> str:
    """PIL's complaint about ``path`` in a few words, on one line, without repeating the path."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "cannot identify image file"
    msg = " ".join(str(e).replace(repr(path), "").replace(path, "").split())
    return msg or type(e).__name__


def _check_one(path: str, what: str) -> str | None:
    """None if ``path`` is an image bbpt can read whole, within the pixel limit; else the error.

    ``verify()`` alone misses most broken files: it checks a PNG's chunk CRCs (not whether
    its compressed data decodes) and reads nothing of a BMP, GIF, TIFF or JPEG. So the
    image is decoded completely, as a run will read it (first frame, converted to RGB); a
    JPEG at 1/8 scale (draft mode), which still reads every byte of its data.
    """
    try:
        with _open_image(path, what) as im:
            im.verify()  # PNG: every chunk's CRC, which decoding does not check
        with _open_image(path, what) as im, _decode_guard(im):
            if im.format == "JPEG":
                im.draft("RGB", (1, 1))
            im.load()
            to_rgb(im)  # as the run will: a mode PIL cannot convert fails here
    except BadInput as e:
        return str(e)
    except FileNotFoundError:
        return f"{what} {path} does not exist; restore it or fix the dataset folder or split file, then rerun"
    except Exception as e:  # anything PIL raises on a broken file (OSError, SyntaxError, struct.error, ...)
        return f"{what} {path} cannot be read ({_reason(e, path)}); remove or replace it, then rerun"
    return None


def check_images(images: ImageSet, split: str, progress: bool = False) -> int:
    """Decode every image file of ``images`` once, with the pixel limit; the number checked.

    Every file is decoded whole (a JPEG at 1/8 scale), so a truncated or corrupt image is
    found here, before any query, not when the run reaches it; this runs on a few threads.
    Raises BadInput for the first bad file in index order. Array-held images need no
    check: returns 0.
    """
    if images.paths is None:
        return 0
    paths = list(images.paths)
    max_image_pixels()  # a bad $BBPT_MAX_IMAGE_PIXELS fails here, not as a per-file error
    pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="bbpt-check")
    try:
        results = pool.map(_check_one, paths, [f"{split} image"] * len(paths))
        if progress and len(paths) > PROGRESS_MIN_FILES:
            from ..progress import is_terminal
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=f"checking {split} images", unit="img",
                           disable=not is_terminal())  # off a terminal: no bar lines in the log
        for err in results:  # map yields in input order: the first bad file is the lowest index
            if err is not None:
                raise BadInput(err)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(paths)


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
    flip: bool = True  # whether a horizontal flip keeps the label: the training views' flip default
    views: bool = True  # whether the papers' training views suit the images (the methods' augment default)

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
