"""Image datasets on disk -> :class:`Task`: class-folder trees and split files, CoOp-style.

Accepted layouts of ``load_imagefolder(path)``:

(a) ``path/train/<class>/*.jpg``, ``path/test/<class>/...`` and optionally ``path/val/<class>/...``
    (without val/, a seeded 20% per class of train becomes val);
(b) ``path/<class>/*.jpg`` plus ``path/split.json`` = {"train": [relpath, ...], "val": [...],
    "test": [...]}, relpaths relative to ``path``, the label taken from the class folder;
(c) a CoOp split ``path/split_zhou_*.json`` (or that file itself) = {"train": [[impath, label,
    classname], ...], "val": [...], "test": [...]}, impaths relative to the image folder
    (``path/images`` or ``path`` or one of its subfolders, whichever holds the first image);
(d) CoOp's ImageNet: ``path/images/{train,val}/<wnid>/`` and ``path/classnames.txt`` ("wnid
    name" lines); val is the test set, as in every paper, and val is carved from train;
(e) CoOp's FGVCAircraft: ``path/images/<id>.jpg``, ``path/variants.txt`` and
    ``path/images_variant_{train,val,test}.txt`` ("id variant" lines).

Class names are cleaned as in CoOp (``_`` -> space, Caltech101's renames); with folders the
classes are sorted by folder name and label = index. Image ids are the relative paths.
A dataset needs at least 2 classes.
"""
from __future__ import annotations

import json
import posixpath
import random
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import BadInput
from .core import ImageSet, Task
from .templates import flip_keeps_label, template_for

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DROPPED_CLASSES = {"BACKGROUND_Google", "Faces_easy"}  # Caltech101, as in CoOp
RENAMED_CLASSES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
VAL_FRACTION = 0.2  # of train, per class, when a dataset has no val split
LAYOUTS_HINT = "expected train/ and test/ class folders, <class>/ folders with split.json, or a split_zhou_*.json"

Items = list[tuple[Path, int, str]]  # (absolute image path, label, id)


def clean_classname(name: str) -> str:
    """CoOp's class-name cleaning: Caltech101's renames, then "_" -> " "."""
    return RENAMED_CLASSES.get(name, name).replace("_", " ")


def load_imagefolder(path: str | Path, name: str | None = None) -> Task:
    """Load an image dataset in one of the layouts (a), (b), (c) above."""
    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise BadInput(f"dataset path {root} does not exist; check the path ({LAYOUTS_HINT})")
    if root.is_file():  # a split file given directly
        if root.name == "split.json":
            return _load_split_json(root.parent, name)
        return load_coop_split(root, _find_image_dir(root.parent, root), name)
    if (root / "classnames.txt").is_file() and (root / "images" / "train").is_dir():
        return _load_imagenet(root, name)
    if (root / "variants.txt").is_file() and (root / "images_variant_train.txt").is_file():
        return _load_aircraft(root, name)
    if (root / "train").is_dir():
        return _load_split_folders(root, name)
    if (root / "split.json").is_file():
        return _load_split_json(root, name)
    split_files = sorted(root.glob("split_*.json"))
    if len(split_files) > 1:
        names = ", ".join(f.name for f in split_files)
        raise BadInput(f"{root} holds several split files ({names}); pass the one to use as the path")
    if split_files:
        return load_coop_split(split_files[0], _find_image_dir(root, split_files[0]), name)
    if _class_dirs(root):
        raise BadInput(
            f"{root} has class folders but no split; add {root}/split.json or move them under train/ and test/"
        )
    raise BadInput(f"{root} has no class folders; {LAYOUTS_HINT}")


def load_coop_split(split_json: str | Path, image_dir: str | Path, name: str | None = None) -> Task:
    """A CoOp split file {"train"/"val"/"test": [[impath, label, classname], ...]} -> Task."""
    split_json, image_dir = Path(split_json).absolute(), Path(image_dir).absolute()
    if not image_dir.is_dir():
        raise BadInput(
            f"image folder {image_dir} does not exist; pass the folder the split's image paths are relative to"
        )
    data = _read_split_file(split_json)
    names: dict[int, tuple[str, str]] = {}  # label -> (classname, first entry that named it)
    raw: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "val", "test"):
        if split not in data:
            continue
        raw[split] = []
        for i, e in enumerate(_entries(data, split, split_json)):
            ok = isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[2], str)
            if not (ok and isinstance(e[1], int) and not isinstance(e[1], bool)):
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] is {_short(e)}, "
                    "expected [impath, label, classname]; fix the entry"
                )
            impath, label, cname = e
            first = names.setdefault(label, (cname, f"{split}[{i}]"))
            if first[0] != cname:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] names label {label} {cname!r} but {first[1]} "
                    f"named it {first[0]!r}; give each label one class name"
                )
            raw[split].append((impath, label))
    n = len(names)
    splits: dict[str, Items] = {}
    for split, entries in raw.items():
        splits[split] = []
        for i, (impath, label) in enumerate(entries):
            if not 0 <= label < n:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] has label {label}, out of range 0..{n - 1} "
                    f"for its {n} distinct labels; number the labels 0..{n - 1}"
                )
            rel = _relative_inside(impath)
            if rel is None:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] {impath!r} points outside the image folder {image_dir}; "
                    "give image paths relative to it, without leaving it"
                )
            f = image_dir / rel
            if not f.is_file():
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] image {f} does not exist; fix the path or the image folder"
                )
            splits[split].append((f, label, impath))
    classnames = [clean_classname(names[y][0]) for y in range(n)]
    folder = split_json.parent.name  # CoOp keeps one split file per dataset folder
    return _make_task(splits, classnames, name or folder, [name, folder, split_json.stem], source=split_json,
                      layout="coop", where=split_json, fix="add entries of other classes to the split file")


# ----------------------------------------------------------------------------- layouts (a), (b)

def _load_split_folders(root: Path, name: str | None) -> Task:
    """Layout (a): root/{train,val,test}/<class>/*."""
    classes = [d.name for d in _class_dirs(root / "train")]
    if not classes:
        raise BadInput(f"{root / 'train'} has no class folders; put images in {root}/train/<class>/")
    label_of = {c: y for y, c in enumerate(classes)}
    if not (root / "test").is_dir():
        raise BadInput(f"test split missing: {root / 'test'} does not exist; add test/<class>/ folders next to train/")
    splits: dict[str, Items] = {}
    for split in ("train", "val", "test"):
        d = root / split
        if not d.is_dir():
            continue
        dirs = _class_dirs(d)
        if not dirs:
            raise BadInput(f"{d} has no class folders; put images in {d}/<class>/ or remove it")
        splits[split] = []
        for cd in dirs:
            if cd.name not in label_of:
                raise BadInput(
                    f"class folder {cd} has no counterpart in {root / 'train'}; add {cd.name}/ to train or remove it"
                )
            splits[split] += [(f, label_of[cd.name], f.relative_to(root).as_posix()) for f in _images(cd)]
    return _make_task(splits, [clean_classname(c) for c in classes], name or root.name, [name, root.name],
                      source=root, layout="folders", where=root)


def _load_imagenet(root: Path, name: str | None) -> Task:
    """Layout (d): labels by sorted wnid folder (Dassl's rule), names from classnames.txt."""
    names: dict[str, str] = {}
    for i, line in enumerate((root / "classnames.txt").read_text(encoding="utf-8").splitlines()):
        if line.strip():
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise BadInput(f"{root / 'classnames.txt'} line {i + 1} is {line!r}, expected 'wnid class name'")
            names[parts[0]] = parts[1]
    wnids = [d.name for d in _class_dirs(root / "images" / "train")]
    missing = [w for w in wnids if w not in names]
    if missing:
        raise BadInput(f"{root / 'classnames.txt'} has no name for {len(missing)} train folders (first: {missing[0]}); "
                       "download CoOp's classnames.txt again")
    label_of = {w: y for y, w in enumerate(wnids)}
    splits: dict[str, Items] = {}
    for split, as_ in (("train", "train"), ("val", "test")):
        splits[as_] = []
        for cd in _class_dirs(root / "images" / split):
            if cd.name not in label_of:
                raise BadInput(f"class folder {cd} has no counterpart in {root / 'images' / 'train'}")
            splits[as_] += [(f, label_of[cd.name], f.relative_to(root).as_posix()) for f in _images(cd)]
    return _make_task(splits, [names[w] for w in wnids], name or root.name, [name, "imagenet"], source=root,
                      layout="coop-imagenet", where=root)


def _load_aircraft(root: Path, name: str | None) -> Task:
    """Layout (e): labels in variants.txt order (CoOp's FGVCAircraft)."""
    variants = [ln.strip() for ln in (root / "variants.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    label_of = {v: y for y, v in enumerate(variants)}
    splits: dict[str, Items] = {}
    for split in ("train", "val", "test"):
        f = root / f"images_variant_{split}.txt"
        if not f.is_file():
            raise BadInput(f"{f} is missing; extract fgvc-aircraft-2013b.tar.gz again")
        splits[split] = []
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            iid, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise BadInput(f"{f} line {i + 1}: variant {variant!r} is not in variants.txt")
            if _relative_inside(f"{iid}.jpg") is None:
                raise BadInput(f"{f} line {i + 1}: image id {iid!r} points outside {root / 'images'}; "
                               "extract fgvc-aircraft-2013b.tar.gz again")
            img = root / "images" / f"{iid}.jpg"
            if not img.is_file():
                raise BadInput(f"{f} line {i + 1}: image {img} does not exist; extract the images into {root / 'images'}")
            splits[split].append((img, label_of[variant], f"images/{iid}.jpg"))
    return _make_task(splits, variants, name or root.name, [name, "fgvc_aircraft"], source=root,
                      layout="coop-aircraft", where=root)


def _load_split_json(root: Path, name: str | None) -> Task:
    """Layout (b): root/<class>/* and root/split.json with relative paths."""
    split_json = root / "split.json"
    data = _read_split_file(split_json)
    dirs = _class_dirs(root)
    if not dirs:
        raise BadInput(f"{root} has no class folders; put the images of split.json in {root}/<class>/")
    for cd in dirs:
        _images(cd)  # raises on an empty class folder
    label_of = {d.name: y for y, d in enumerate(dirs)}
    splits: dict[str, Items] = {}
    for split in ("train", "val", "test"):
        if split not in data:
            continue
        splits[split] = []
        for i, rel in enumerate(_entries(data, split, split_json)):
            if not isinstance(rel, str) or not rel:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] is {_short(rel)}, "
                    "expected a path like 'cat/001.jpg'; fix the entry"
                )
            inside = _relative_inside(rel)
            if inside is None:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] {rel!r} points outside the dataset folder {root}; "
                    "use paths like '<class>/<file>', relative to it"
                )
            top = inside.parts
            if len(top) >= 2 and top[0] in DROPPED_CLASSES:
                continue
            if len(top) < 2 or top[0] not in label_of:
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] {rel!r} is not inside a class folder of {root}; "
                    f"use paths like '<class>/<file>'"
                )
            f = root / inside
            if not f.is_file():
                raise BadInput(
                    f"split file {split_json}: {split}[{i}] image {f} does not exist; fix the path or add the file"
                )
            splits[split].append((f, label_of[top[0]], inside.as_posix()))
    return _make_task(splits, [clean_classname(d.name) for d in dirs], name or root.name, [name, root.name],
                      source=split_json, layout="split.json", where=root)


# ----------------------------------------------------------------------------- helpers

def _make_task(splits: dict[str, Items], classnames: list[str], name: str, template_keys: list, source: Path,
               layout: str, where: Path, fix: str = "add class folders") -> Task:
    if len(classnames) < 2:  # here, not in Task: a base-to-new half may have 1 class
        n, listed = len(classnames), ", ".join(map(repr, classnames))
        raise BadInput(
            f"dataset {where} has {n} class{'es' * (n != 1)} ({listed}); classification needs at least 2 classes: {fix}"
        )
    if not splits.get("test"):
        raise BadInput(f"test split missing or empty in {source}; add test images")
    carved = "val" not in splits
    if carved:
        splits["train"], splits["val"] = _carve_val(splits.get("train", []))
    template = next((t for t in map(template_for, filter(None, template_keys)) if t), "a photo of a {}.")
    sets = {
        s: ImageSet(labels=[y for _, y, _ in it], ids=[i for _, _, i in it], paths=[str(f) for f, _, _ in it])
        for s, it in splits.items()
    }
    return Task(
        name=name, classnames=classnames, templates=[template], train=sets["train"], val=sets["val"],
        test=sets["test"], description=f"image dataset from {source}",
        meta={"source": str(source), "layout": layout, "val_from_train": carved},
        flip=all(flip_keeps_label(k) for k in filter(None, template_keys)),
    )


def _carve_val(items: Items, seed: int = 0) -> tuple[Items, Items]:
    """Move round(20%) of each class's train images (at least 1 if it has >= 2) into val."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for j, (_, y, _) in enumerate(items):
        by_label.setdefault(y, []).append(j)
    to_val: set[int] = set()
    for y in sorted(by_label):
        idx = by_label[y]
        k = max(1, round(VAL_FRACTION * len(idx))) if len(idx) >= 2 else 0
        to_val.update(rng.sample(idx, k))
    return [it for j, it in enumerate(items) if j not in to_val], [it for j, it in enumerate(items) if j in to_val]


def _class_dirs(folder: Path) -> list[Path]:
    """Non-hidden subfolders, sorted by name, minus the classes CoOp drops."""
    dirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted((d for d in dirs if d.name not in DROPPED_CLASSES), key=lambda d: d.name)


def _images(class_dir: Path) -> list[Path]:
    files = sorted(
        f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".") and f.is_file()
    )
    if not files:
        exts = "/".join(sorted(e[1:] for e in IMAGE_EXTS))
        raise BadInput(f"class folder {class_dir} has no images ({exts}); add images or remove the folder")
    return files


def _read_split_file(split_json: Path) -> dict:
    """Parse a split file: a JSON object with "train" and "test" (and maybe "val") lists."""
    if not split_json.is_file():
        raise BadInput(f"split file {split_json} does not exist; check the path")
    try:
        data = json.loads(split_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(
            f"split file {split_json} is not valid JSON ({e.msg}, line {e.lineno}); fix or regenerate it"
        ) from None
    except UnicodeDecodeError:
        raise BadInput(f"split file {split_json} is not UTF-8 text; fix or regenerate it") from None
    if not isinstance(data, dict):
        raise BadInput(f"split file {split_json} must hold a JSON object with 'train' and 'test' lists; fix the file")
    for key in ("train", "test"):
        if key not in data:
            raise BadInput(
                f"split file {split_json} has no {key!r} key; it needs 'train' and 'test' lists (and optionally 'val')"
            )
    return data


def _entries(data: dict, split: str, split_json: Path) -> list:
    if not isinstance(data[split], list):
        kind = type(data[split]).__name__
        raise BadInput(f"split file {split_json}: {split!r} is {kind}, expected a list; fix the file")
    return data[split]


def _relative_inside(rel: str) -> PurePosixPath | None:
    """A split file's image path, normalised ("a/./b/../c.jpg" -> "a/c.jpg", "\\" read as "/"),
    if it is relative and stays inside the folder it is relative to; else None.

    The check is on the path as written: a symlink inside the dataset folder may point
    anywhere (datasets are often linked in from shared storage), an entry may not.
    """
    p = rel.replace("\\", "/")
    if p.startswith("/") or PureWindowsPath(p).drive:  # /x, //host/share, C:/x, C:x
        return None
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../"):
        return None
    return PurePosixPath(norm)


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _find_image_dir(root: Path, split_json: Path) -> Path:
    """The folder the split's impaths are relative to: images/, root, or a subfolder of root."""
    default = root / "images" if (root / "images").is_dir() else root
    try:
        first = json.loads(split_json.read_text(encoding="utf-8"))["train"][0][0]
    except Exception:  # malformed: let load_coop_split report it precisely
        return default
    if not isinstance(first, str):
        return default
    for cand in [root / "images", root] + _class_dirs(root):
        if (cand / first).is_file():
            return cand
    return default
