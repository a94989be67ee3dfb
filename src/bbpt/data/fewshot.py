"""Few-shot sampling and base-to-new class splits, with CoOp / Dassl semantics.

``fewshot_split`` mirrors Dassl's ``generate_fewshot_dataset`` as CoOp calls it: one RNG
seeded with ``seed``; train items grouped by label in order of first appearance and
``rng.sample(items, k)`` per class; then val the same way with min(k, 4) shots (all items of
a smaller class), continuing the same RNG. Unlike Dassl, a train class with fewer than k
images is refused rather than silently under-sampled. The chosen indices are
cached as JSON (CoOp caches a pickle) at ``<cache_dir>/<task>/shot_{k}-seed_{seed}.json``.

``subsample_classes`` is CoOp's base-to-new split: sorted labels, the first ceil(n/2) are
"base", the rest "new", each relabelled from 0.

``stratified_subset`` draws a seeded, class-stratified subset, e.g. of a test split for a
quick look on CPU.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np

from ..errors import BadInput
from .core import ImageSet, Task, data_dir

logger = logging.getLogger(__name__)
MAX_VAL_SHOTS = 4  # CoOp: val gets min(k, 4) shots per class


def fewshot_split(task: Task, shots: int, seed: int, cache_dir: Path | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, val) with ``shots`` and min(shots, 4) images per class, chosen by ``seed``."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise BadInput(f"shots must be a positive integer, got {shots!r}; use e.g. 1, 2, 4, 8 or 16")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise BadInput(f"seed must be an integer, got {seed!r}; use e.g. 1, 2 or 3")
    shots, seed = int(shots), int(seed)
    _check_shots(task, shots)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir() / "split_fewshot"
    cache = cache_dir / task.name.replace("/", "_") / f"shot_{shots}-seed_{seed}.json"
    idx = _read_cache(cache, task)
    if idx is None:
        rng = random.Random(seed)
        idx = {"train": _sample_per_class(task.train.labels, shots, rng),
               "val": _sample_per_class(task.val.labels, min(shots, MAX_VAL_SHOTS), rng)}
        _write_cache(cache, task, idx)
    return task.train.subset(idx["train"]), task.val.subset(idx["val"])


def _check_shots(task: Task, shots: int) -> None:
    """Refuse ``shots`` above the smallest train class (ties: the first class)."""
    counts = np.bincount(task.train.labels, minlength=task.num_classes)  # (C,)
    if not len(counts) or counts.min() >= shots:
        return
    y = int(counts.argmin())
    name, n = task.classnames[y], int(counts[y])
    if n == 0:
        raise BadInput(f"class {name!r} has no images in the train split; add train images of it or remove the class")
    raise BadInput(
        f"--shots {shots} is more than class {name!r} has in the train split ({n} image{'s' * (n != 1)}); "
        f"use --shots {n} or fewer, or add images"
    )


def _sample_per_class(labels: np.ndarray, k: int, rng: random.Random) -> list[int]:
    """Dassl: per label (in order of first appearance) rng.sample(items, k), or all if fewer."""
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_label.setdefault(y, []).append(i)
    out: list[int] = []
    for items in by_label.values():
        out += rng.sample(items, k) if len(items) >= k else items
    return out


# cache file: {"train": [i, ...], "val": [...], "n_train": N, "n_val": M, "train_ids": [...], "val_ids": [...]}
def _read_cache(cache: Path, task: Task) -> dict | None:
    """The cached indices if the file is readable and matches the task's current splits, else None."""
    try:
        c = json.loads(cache.read_text(encoding="utf-8"))
        out = {}
        for s in ("train", "val"):
            split: ImageSet = getattr(task, s)
            idx = [int(i) for i in c[s]]
            if c[f"n_{s}"] != len(split) or any(not 0 <= i < len(split) for i in idx):
                return None
            if list(split.ids[idx]) != list(c[f"{s}_ids"]):  # the data changed under the cache
                return None
            out[s] = idx
        return out
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # corrupt: recompute and overwrite
        return None


def _write_cache(cache: Path, task: Task, idx: dict) -> None:
    c = {"train": idx["train"], "val": idx["val"], "n_train": len(task.train), "n_val": len(task.val),
         "train_ids": task.train.ids[idx["train"]].tolist(), "val_ids": task.val.ids[idx["val"]].tolist()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(c), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as e:  # a read-only data dir should not stop training
        logger.warning("could not write the few-shot cache %s (%s); set $BBPT_DATA to a writable folder", cache, e)


def subsample_classes(task: Task, which: str) -> Task:
    """CoOp's base-to-new split: "base" = first ceil(n/2) classes, "new" = the rest, "all" = task."""
    which = which.lower() if isinstance(which, str) else which
    if which not in ("all", "base", "new"):
        raise BadInput(f"subsample_classes: unknown class subset {which!r}; use 'all', 'base' or 'new'")
    if which == "all":
        return task
    n = task.num_classes
    if n < 2:
        raise BadInput(f"task {task.name} has {n} class(es); base-to-new needs at least 2 classes")
    m = math.ceil(n / 2)
    keep = list(range(m)) if which == "base" else list(range(m, n))
    relabel = np.full(n, -1, dtype=np.int64)
    relabel[keep] = np.arange(len(keep))

    def sub(s: ImageSet) -> ImageSet:
        out = s.subset(np.flatnonzero(relabel[s.labels] >= 0))
        out.labels = relabel[out.labels]
        return out

    return Task(
        name=f"{task.name}-{which}", classnames=[task.classnames[y] for y in keep], templates=list(task.templates),
        train=sub(task.train), val=sub(task.val), test=sub(task.test), description=task.description,
        meta={**task.meta, "subsample": which, "classes": keep}, flip=task.flip,
        views=task.views,
    )


def stratified_subset(images: ImageSet, n: int, seed: int = 0) -> ImageSet:
    """``n`` of ``images``, per class in proportion to its size, drawn with ``seed``.

    Per-class counts: largest remainder (ties: lower label first). Each class's images are
    drawn with one ``np.random.default_rng(seed)``, classes in label order; the result keeps
    the original order. ``n >= len(images)`` returns ``images`` itself.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BadInput(f"--test-subset must be >= 1, got {n!r}; pass a number of images such as 500")
    n, total = int(n), len(images)
    if n >= total:
        return images
    classes, counts = np.unique(images.labels, return_counts=True)  # (C,), (C,) sorted by label
    quota, rem = np.divmod(n * counts, total)  # exact integer shares: quota + rem / total
    order = np.lexsort((np.arange(len(classes)), -rem))  # largest remainder first, then label order
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.default_rng(int(seed))
    chosen = [rng.choice(np.flatnonzero(images.labels == y), k, replace=False) for y, k in zip(classes, quota)]
    return images.subset(np.sort(np.concatenate(chosen)))
