"""Data: offline tasks, image folders, CoOp splits, few-shot sampling, templates.

``load_task(name_or_path)`` is the one entry point: a registered offline task name
(``bbpt datasets``), or a path to an image folder / CoOp split file, optionally followed by
``@SHIFT`` (``fashion-mnist@inverted``): the same task with a shifted test split
(:mod:`bbpt.data.shift`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UnknownName
from .core import ImageSet, Task, check_images, data_dir
from .fewshot import fewshot_split, stratified_subset, subsample_classes
from .offline import TASKS, load_offline
from .shift import SHIFTS, shift_task


def load_task(name_or_path: str) -> Task:
    if name_or_path in TASKS:
        return load_offline(name_or_path)
    p = Path(name_or_path).expanduser()
    if "@" in name_or_path and not p.exists():  # NAME@SHIFT
        base, shift = name_or_path.rsplit("@", 1)
        SHIFTS.get(shift)  # before loading the data: an unknown shift fails fast
        return shift_task(load_task(base), shift)
    if p.exists():
        from .imagefolder import load_imagefolder

        return load_imagefolder(p)
    if any(sep in name_or_path for sep in ("/", "\\")) or name_or_path.startswith("."):
        from ..errors import BadInput

        raise BadInput(f"dataset path {name_or_path} does not exist; pass an existing image folder or a registered name")
    raise UnknownName("dataset", name_or_path, TASKS.names(), TASKS.hint)


def list_datasets() -> list[str]:
    return TASKS.names()


__all__ = ["ImageSet", "SHIFTS", "Task", "TASKS", "check_images", "data_dir", "fewshot_split", "list_datasets",
           "load_task", "stratified_subset", "subsample_classes"]
