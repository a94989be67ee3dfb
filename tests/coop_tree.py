"""A generated CoOp data root: every dataset folder, image folder and split file under the
names CoOp's DATASETS.md gives, with a few random images per class."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bbpt.data.coop import COOP_DATASETS

CLASSES = ["red_thing", "green thing", "blue-thing"]
PER_SPLIT = {"train": 3, "val": 1, "test": 2}


def _image(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def make_coop_root(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for d in COOP_DATASETS:
        base = root / d.folder
        images = base / d.images if d.images else base
        if d.name == "ImageNet":
            wnids = [f"n0000000{i}" for i in range(len(CLASSES))]
            (base / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
            (base / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, CLASSES)))
            for split, n in (("train", 3), ("val", 2)):
                for w in wnids:
                    for k in range(n):
                        _image(images / split / w / f"{w}_{k}.JPEG", rng)
            continue
        if d.name == "FGVCAircraft":
            (base / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
            (base / "variants.txt").write_text("".join(f"{c}\n" for c in CLASSES))
            for split, n in PER_SPLIT.items():
                lines = []
                for y, c in enumerate(CLASSES):
                    for k in range(n):
                        iid = f"{split[:2]}{y}{k:04d}"
                        _image(images / f"{iid}.jpg", rng)
                        lines.append(f"{iid} {c}\n")
                (base / f"images_variant_{split}.txt").write_text("".join(lines))
            continue
        split_data = {}
        for split, n in PER_SPLIT.items():
            entries = []
            for y, c in enumerate(CLASSES):
                for k in range(n):
                    rel = f"{c.replace(' ', '_')}/{split}_{k}.jpg"
                    _image(images / rel, rng)
                    entries.append([rel, y, c])
            split_data[split] = entries
        (base / d.split).write_text(json.dumps(split_data))
    return root
