"""A CoOp data root (``$DATA`` in CoOp's DATASETS.md): the papers' 11 datasets in the folders
and with the split files every official implementation reads, and ``bbpt data check ROOT``.

Each dataset is one folder under the root holding its images and (for nine of them) CoOp's
``split_zhou_*.json``, whose image paths are relative to ``images``. ImageNet keeps
``images/train``, ``images/val`` (the test set) and ``classnames.txt``; FGVCAircraft the
``images_variant_*.txt`` files of its release.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput

SPLITS_FROM = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp), which links every split_zhou_*.json"


@dataclass(frozen=True)
class CoopDataset:
    name: str  # CoOp's dataset class name
    folder: str  # under the data root
    images: str  # the folder the split's image paths are relative to, under ``folder`` ("" = folder itself)
    split: str | None  # CoOp's split file under ``folder``
    source: str  # where the images come from
    needs: tuple[str, ...] = field(default=())  # other files / folders the loaders read, under ``folder``


COOP_DATASETS: tuple[CoopDataset, ...] = (
    CoopDataset("ImageNet", "imagenet", "images", None, "image-net.org (ILSVRC-2012 train and val)",
                ("images/train", "images/val", "classnames.txt")),
    CoopDataset("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                "101_ObjectCategories.tar.gz (vision.caltech.edu)"),
    CoopDataset("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                "images.tar.gz (robots.ox.ac.uk/~vgg/data/pets)"),
    CoopDataset("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
                "cars_train.tgz and cars_test.tgz (ai.stanford.edu/~jkrause/cars)"),
    CoopDataset("OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                "102flowers.tgz (robots.ox.ac.uk/~vgg/data/flowers/102)"),
    CoopDataset("Food101", "food-101", "images", "split_zhou_Food101.json",
                "food-101.tar.gz (data.vision.ee.ethz.ch)"),
    CoopDataset("FGVCAircraft", "fgvc_aircraft", "images", None,
                "fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft), its data/ folder renamed",
                ("images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt", "variants.txt")),
    CoopDataset("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "SUN397.tar.gz (vision.princeton.edu)"),
    CoopDataset("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
                "dtd-r1.0.1.tar.gz (robots.ox.ac.uk/~vgg/data/dtd)"),
    CoopDataset("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "EuroSAT.zip (RGB, the 2750/ folder)"),
    CoopDataset("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                "UCF-101-midframes.zip (linked from CoOp's DATASETS.md)"),
)


def coop_dataset(name: str) -> CoopDataset:
    key = name.lower().replace("-", "").replace("_", "")
    for d in COOP_DATASETS:
        if key in (d.name.lower(), d.folder.replace("-", "").replace("_", "")):
            return d
    raise BadInput(f"unknown CoOp dataset {name!r}; one of {', '.join(d.name for d in COOP_DATASETS)}")


@dataclass
class Report:
    dataset: CoopDataset
    present: bool
    problems: list[str]  # each: what is wrong, then how to fix it
    summary: str = ""

    @property
    def ok(self) -> bool:
        return self.present and not self.problems


def check_dataset(root: Path, d: CoopDataset) -> Report:
    base = root / d.folder
    if not base.is_dir():
        return Report(d, False, [f"{base} does not exist: create it and extract {d.source} into it"])
    problems = [f"{base / n} is missing: {_fix(d, n)}" for n in d.needs if not (base / n).exists()]
    images = base / d.images if d.images else base
    if d.images and not images.is_dir():
        problems.append(f"{images} is missing: extract {d.source} so that {d.folder}/{d.images}/ holds the images")
    if d.split is not None and not (base / d.split).is_file():
        problems.append(f"{base / d.split} is missing: download {d.split} from {SPLITS_FROM} into {base}")
    if problems:
        return Report(d, True, problems)
    if d.split is not None:
        return _check_split(d, base / d.split, images)
    if d.name == "ImageNet":
        return _check_imagenet(d, base)
    return _check_aircraft(d, base, images)


def _fix(d: CoopDataset, need: str) -> str:
    if need == "classnames.txt":
        return f"download classnames.txt (CLIP's ImageNet class names) from {SPLITS_FROM}"
    return f"extract {d.source}; it holds {need}"


def _check_split(d: CoopDataset, split: Path, images: Path) -> Report:
    from .imagefolder import load_coop_split

    try:
        data = json.loads(split.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return Report(d, True, [f"{split} is not valid JSON ({e}); download it again from {SPLITS_FROM}"])
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "val", "test")):
        return Report(d, True, [f"{split} lacks its train / val / test lists; download it again from {SPLITS_FROM}"])
    missing = [e[0] for s in ("train", "val", "test") for e in data[s]
               if isinstance(e, list) and e and isinstance(e[0], str) and not (images / e[0]).is_file()]
    if missing:
        total = sum(len(data[s]) for s in ("train", "val", "test"))
        return Report(d, True, [f"{len(missing)} of the {total} images the split names are not under {images} "
                                f"(first: {images / missing[0]}); extract {d.source} there"])
    try:
        task = load_coop_split(split, images, d.name)
    except BadInput as e:
        return Report(d, True, [str(e)])
    sizes = "/".join(str(len(getattr(task, s))) for s in ("train", "val", "test"))
    return Report(d, True, [], f"{len(task.classnames)} classes, {sizes} train/val/test images")


def _check_imagenet(d: CoopDataset, base: Path) -> Report:
    rows = [ln.split(maxsplit=1) for ln in (base / "classnames.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not rows or any(len(r) != 2 for r in rows):
        return Report(d, True, [f"{base / 'classnames.txt'} must hold one 'wnid class name' line per class; "
                                f"download it again from {SPLITS_FROM}"])
    problems = []
    for split in ("train", "val"):
        absent = [w for w, _ in rows if not (base / "images" / split / w).is_dir()]
        if absent:
            problems.append(f"{len(absent)} of the {len(rows)} classes have no folder in {base / 'images' / split} "
                            f"(first: {absent[0]}); extract ImageNet's {split} set into class folders named by wnid")
    if problems:
        return Report(d, True, problems)
    n = {s: sum(1 for w, _ in rows for f in (base / "images" / s / w).iterdir() if f.is_file()) for s in ("train", "val")}
    return Report(d, True, [], f"{len(rows)} classes, {n['train']} train and {n['val']} val (test) images")


def _check_aircraft(d: CoopDataset, base: Path, images: Path) -> Report:
    variants = [ln.strip() for ln in (base / "variants.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    problems, sizes = [], []
    for split in ("train", "val", "test"):
        rows = [ln.split(maxsplit=1) for ln in (base / f"images_variant_{split}.txt").read_text(encoding="utf-8").splitlines()
                if ln.strip()]
        bad = [r for r in rows if len(r) != 2 or r[1] not in variants]
        absent = [r[0] for r in rows if len(r) == 2 and not (images / f"{r[0]}.jpg").is_file()]
        if bad:
            problems.append(f"{base / f'images_variant_{split}.txt'}: {len(bad)} lines are not 'id variant' with a variant "
                            f"of variants.txt (first: {' '.join(bad[0])!r}); extract {d.source} again")
        if absent:
            problems.append(f"{len(absent)} {split} images are not in {images} (first: {absent[0]}.jpg); extract {d.source}")
        sizes.append(str(len(rows)))
    if problems:
        return Report(d, True, problems)
    return Report(d, True, [], f"{len(variants)} classes, {'/'.join(sizes)} train/val/test images")


def check_root(root: str | Path, names: list[str] | None = None) -> list[Report]:
    """One report per dataset: the named ones, or every dataset of the layout (absent ones
    are reported as such, and are problems only when named)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInput(f"data root {root} does not exist; give the folder that holds the dataset folders "
                       f"({', '.join(d.folder for d in COOP_DATASETS[:3])}, ...)")
    wanted = [coop_dataset(n) for n in names] if names else list(COOP_DATASETS)
    return [check_dataset(root, d) for d in wanted]
