"""Image datasets on disk, few-shot sampling, base-to-new splits and templates."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbpt.data import fewshot as fs
from bbpt.data.core import ImageSet, Task
from bbpt.data.fewshot import fewshot_split, subsample_classes
from bbpt.data.imagefolder import clean_classname, load_coop_split, load_imagefolder
from bbpt.data.templates import CUSTOM_TEMPLATES, template_for
from bbpt.errors import BadInput


def png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def tree(root: Path, counts: dict[str, int], ext: str = "png") -> None:
    """root/<class>/<i>.<ext> with counts[class] images each."""
    for c, n in counts.items():
        for i in range(n):
            png(root / c / f"{i}.{ext}", value=10 * i)


# ----------------------------------------------------------------------------- layout (a)

def test_folders_with_val(tmp_path):
    root = tmp_path / "myset"
    tree(root / "train", {"dog": 3, "cat_big": 2})
    tree(root / "val", {"cat_big": 1, "dog": 1})
    tree(root / "test", {"dog": 2, "cat_big": 1}, ext="JPG")
    t = load_imagefolder(root)
    assert t.name == "myset" and t.classnames == ["cat big", "dog"]  # sorted by folder name, "_" cleaned
    assert t.templates == ["a photo of a {}."]
    assert (len(t.train), len(t.val), len(t.test)) == (5, 2, 3)
    assert sorted(t.train.labels.tolist()) == [0, 0, 1, 1, 1]
    assert "train/dog/0.png" in t.train.ids.tolist() and len(set(t.train.ids)) == 5
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in t.test.paths)
    assert t.meta["val_from_train"] is False


def test_folders_carve_val_deterministic(tmp_path):
    root = tmp_path / "d"
    tree(root / "train", {"a": 10, "b": 2, "c": 1})
    tree(root / "test", {"a": 1, "b": 1, "c": 1})
    t1, t2 = load_imagefolder(root), load_imagefolder(root)
    assert Counter(t1.val.labels.tolist()) == {0: 2, 1: 1}  # 20% of 10; >= 1 of 2; none of 1
    assert Counter(t1.train.labels.tolist()) == {0: 8, 1: 1, 2: 1}
    assert not set(t1.val.ids) & set(t1.train.ids)
    assert t1.val.ids.tolist() == t2.val.ids.tolist() and t1.meta["val_from_train"]


def test_folder_name_selects_template(tmp_path):
    root = tmp_path / "OxfordPets"
    tree(root / "train", {"a": 1, "b": 1})
    tree(root / "test", {"a": 1, "b": 1})
    assert load_imagefolder(root).templates == ["a photo of a {}, a type of pet."]
    assert load_imagefolder(root, name="eurosat").templates == ["a centered satellite photo of {}."]


def test_pixels_from_files(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):  # a dataset needs 2 classes
        png(root / "train" / c / "0.png", value=255, size=10)
        png(root / "test" / c / "0.png", value=0, size=12)
    t = load_imagefolder(root)
    x = t.train.pixels(size=16)
    assert x.shape == (2, 3, 16, 16) and x.dtype.is_floating_point
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.mean()) > 0.99
    assert float(t.test.pixels(size=16).max()) < 0.01


# ----------------------------------------------------------------------------- layout (b)

def test_split_json_layout(tmp_path):
    root = tmp_path / "flowers"
    tree(root, {"rose": 3, "tulip": 2, "BACKGROUND_Google": 1})
    split = {"train": ["rose/0.png", "rose/1.png", "tulip/0.png", "BACKGROUND_Google/0.png"],
             "val": ["tulip/1.png"], "test": ["rose/2.png"]}
    (root / "split.json").write_text(json.dumps(split))
    t = load_imagefolder(root)
    assert load_imagefolder(root / "split.json").train.ids.tolist() == t.train.ids.tolist()
    assert t.classnames == ["rose", "tulip"]  # BACKGROUND_Google dropped
    assert t.train.labels.tolist() == [0, 0, 1] and t.val.labels.tolist() == [1] and t.test.labels.tolist() == [0]
    assert t.train.ids.tolist() == ["rose/0.png", "rose/1.png", "tulip/0.png"]
    assert t.templates == ["a photo of a {}, a type of flower."]


# ----------------------------------------------------------------------------- layout (c)

def coop_dataset(root: Path, split: dict | None = None, fname: str = "split_zhou_Caltech101.json") -> Path:
    """root/images/... + a CoOp split file over it."""
    for rel in ["airplanes/a.jpg", "airplanes/b.jpg", "Faces/a.jpg", "cougar_body/a.jpg", "cougar_body/b.jpg"]:
        png(root / "images" / rel)
    split = split or {
        "train": [["airplanes/a.jpg", 0, "airplanes"], ["Faces/a.jpg", 1, "Faces"],
                  ["cougar_body/a.jpg", 2, "cougar_body"]],
        "val": [["airplanes/b.jpg", 0, "airplanes"]],
        "test": [["cougar_body/b.jpg", 2, "cougar_body"]],
    }
    f = root / fname
    f.write_text(json.dumps(split))
    return f


def test_coop_split(tmp_path):
    root = tmp_path / "caltech-101"
    f = coop_dataset(root)
    for t in (load_imagefolder(root), load_imagefolder(f), load_coop_split(f, root / "images")):
        assert t.classnames == ["airplane", "face", "cougar body"]
        assert t.train.labels.tolist() == [0, 1, 2] and t.test.labels.tolist() == [2]
        assert t.train.ids.tolist()[1] == "Faces/a.jpg"
        assert t.templates == ["a photo of a {}."] and t.name == "caltech-101"
    assert template_for("caltech-101") is not None


def test_coop_split_image_dir_is_a_subfolder(tmp_path):
    root = tmp_path / "ds"
    png(root / "101_ObjectCategories" / "x" / "0.jpg")
    png(root / "101_ObjectCategories" / "y" / "0.jpg")
    split = {"train": [["x/0.jpg", 0, "x"], ["y/0.jpg", 1, "y"]], "val": [], "test": [["x/0.jpg", 0, "x"]]}
    (root / "split_zhou_X.json").write_text(json.dumps(split))
    t = load_imagefolder(root)
    assert Path(t.train.paths[0]) == (root / "101_ObjectCategories" / "x" / "0.jpg").absolute()


# ----------------------------------------------------------------------------- errors

def test_error_path_missing(tmp_path):
    with pytest.raises(BadInput, match="nope.*does not exist"):
        load_imagefolder(tmp_path / "nope")


def test_error_no_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="empty has no class folders"):
        load_imagefolder(tmp_path / "empty")
    (tmp_path / "e2" / "train").mkdir(parents=True)
    with pytest.raises(BadInput, match="train has no class folders"):
        load_imagefolder(tmp_path / "e2")


def test_error_class_folder_without_images(tmp_path):
    root = tmp_path / "d"
    tree(root / "train", {"a": 1})
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "notes.txt").write_text("x")
    tree(root / "test", {"a": 1})
    with pytest.raises(BadInput, match=r"class folder .*train/b has no images.*add images or remove"):
        load_imagefolder(root)


def test_error_test_missing(tmp_path):
    root = tmp_path / "d"
    tree(root / "train", {"a": 1})
    with pytest.raises(BadInput, match=r"test split missing.*d/test"):
        load_imagefolder(root)
    f = coop_dataset(tmp_path / "c")
    f.write_text(json.dumps({"train": [["Faces/a.jpg", 0, "Faces"]], "val": []}))
    with pytest.raises(BadInput, match=r"split_zhou_Caltech101.json has no 'test'"):
        load_imagefolder(f)


def test_error_split_not_json(tmp_path):
    root = tmp_path / "d"
    tree(root, {"a": 1})
    (root / "split.json").write_text("{not json")
    with pytest.raises(BadInput, match=r"split.json is not valid JSON"):
        load_imagefolder(root)


@pytest.mark.parametrize("bad, where", [
    (["Faces/a.jpg", 0], r"train\[1\]"),  # too short
    (["Faces/a.jpg", "0", "Faces"], r"train\[1\]"),  # label not an int
    ("Faces/a.jpg", r"train\[1\]"),  # not a list
])
def test_error_coop_entry_shape(tmp_path, bad, where):
    split = {"train": [["airplanes/a.jpg", 0, "airplanes"], bad], "test": [["Faces/a.jpg", 0, "airplanes"]]}
    f = coop_dataset(tmp_path / "c", split)
    with pytest.raises(BadInput, match=where + r".*expected \[impath, label, classname\]"):
        load_imagefolder(f)


def test_error_split_json_entry_shape(tmp_path):
    root = tmp_path / "d"
    tree(root, {"a": 2})
    (root / "split.json").write_text(json.dumps({"train": ["a/0.png", 7], "test": ["a/1.png"]}))
    with pytest.raises(BadInput, match=r"train\[1\] is 7"):
        load_imagefolder(root)
    (root / "split.json").write_text(json.dumps({"train": ["a/0.png"], "test": ["0.png"]}))
    with pytest.raises(BadInput, match=r"test\[0\] '0.png' is not inside a class folder"):
        load_imagefolder(root)


def test_error_split_path_missing(tmp_path):
    root = tmp_path / "d"
    tree(root, {"a": 2})
    (root / "split.json").write_text(json.dumps({"train": ["a/0.png"], "test": ["a/1.png", "a/9.png"]}))
    with pytest.raises(BadInput, match=r"test\[1\] image .*a/9.png does not exist"):
        load_imagefolder(root)
    f = coop_dataset(tmp_path / "c", {"train": [["gone/x.jpg", 0, "x"]], "test": [["Faces/a.jpg", 0, "x"]]})
    with pytest.raises(BadInput, match=r"train\[0\] image .*gone/x.jpg does not exist"):
        load_coop_split(f, tmp_path / "c" / "images")


def test_error_coop_label_out_of_range_and_inconsistent(tmp_path):
    ok = [["airplanes/a.jpg", 0, "airplanes"]]
    f = coop_dataset(tmp_path / "c", {"train": ok, "test": [["Faces/a.jpg", 5, "Faces"]]})
    with pytest.raises(BadInput, match=r"test\[0\] has label 5, out of range 0..1"):
        load_imagefolder(f)
    f.write_text(json.dumps({"train": ok, "test": [["Faces/a.jpg", -1, "Faces"]]}))
    with pytest.raises(BadInput, match=r"test\[0\] has label -1"):
        load_imagefolder(f)
    f.write_text(json.dumps({"train": ok, "test": [["Faces/a.jpg", 0, "Faces"]]}))
    with pytest.raises(BadInput, match=r"test\[0\] names label 0 'Faces' but train\[0\] named it 'airplanes'"):
        load_imagefolder(f)


def test_clean_classname():
    assert clean_classname("Leopards") == "leopard" and clean_classname("Motorbikes") == "motorbike"
    assert clean_classname("sea_lion") == "sea lion" and clean_classname("Faces") == "face"


# ----------------------------------------------------------------------------- few-shot

def make_task(counts: list[int], val_counts: list[int] | None = None, name: str = "toy") -> Task:
    """Array-backed task: class y has counts[y] train images (interleaved), val_counts[y] val images."""
    def imageset(cs, prefix):
        labels = [y for y, n in enumerate(cs) for _ in range(n)]
        order = np.random.default_rng(0).permutation(len(labels))  # interleave classes
        labels = np.asarray(labels)[order]
        return ImageSet(labels=labels, ids=[f"{prefix}{i}" for i in range(len(labels))],
                        array=np.zeros((len(labels), 2, 2), np.uint8))
    val_counts = val_counts if val_counts is not None else counts
    return Task(name=name, classnames=[f"c{y}" for y in range(len(counts))], templates=["a photo of a {}."],
                train=imageset(counts, "tr"), val=imageset(val_counts, "va"), test=imageset([1] * len(counts), "te"))


@pytest.mark.parametrize("k", [1, 4, 5])  # more than 5 is refused: tests/test_data_input.py
def test_fewshot_counts(tmp_path, k):
    task = make_task([20, 20, 5], val_counts=[10, 10, 2])
    tr, va = fewshot_split(task, k, seed=1, cache_dir=tmp_path)
    assert Counter(tr.labels.tolist()) == {0: k, 1: k, 2: k}
    assert Counter(va.labels.tolist()) == {0: min(k, 4), 1: min(k, 4), 2: min(k, 4, 2)}
    assert len(set(tr.ids)) == len(tr) and all(i.startswith("tr") for i in tr.ids)


def test_fewshot_matches_dassl_order(tmp_path):
    """One Random(seed) stream: train classes in order of first appearance, then val."""
    import random

    task = make_task([6, 6], val_counts=[6, 6])
    tr, va = fewshot_split(task, 2, seed=3, cache_dir=tmp_path)
    rng = random.Random(3)
    want = []
    for labels in (task.train.labels, task.val.labels):
        firsts = list(dict.fromkeys(labels.tolist()))
        want.append([j for y in firsts for j in rng.sample(np.flatnonzero(labels == y).tolist(), 2)])
    assert tr.ids.tolist() == task.train.ids[want[0]].tolist()
    assert va.ids.tolist() == task.val.ids[want[1]].tolist()


def test_fewshot_seeds_and_cache(tmp_path, monkeypatch):
    task = make_task([30, 30, 30])
    a, _ = fewshot_split(task, 4, seed=1, cache_dir=tmp_path)
    b, _ = fewshot_split(task, 4, seed=2, cache_dir=tmp_path / "other")
    assert a.ids.tolist() != b.ids.tolist()
    cache = tmp_path / "toy" / "shot_4-seed_1.json"
    assert cache.is_file() and json.loads(cache.read_text())["train_ids"] == a.ids.tolist()

    def boom(*args):
        raise AssertionError("recomputed despite a valid cache")

    monkeypatch.setattr(fs, "_sample_per_class", boom)
    a2, _ = fewshot_split(task, 4, seed=1, cache_dir=tmp_path)  # served from the cache
    assert a2.ids.tolist() == a.ids.tolist()
    monkeypatch.undo()

    # the cache is what is used: edit it (consistently) and the result follows
    c = json.loads(cache.read_text())
    c["train"], c["train_ids"] = c["train"][:1], c["train_ids"][:1]
    cache.write_text(json.dumps(c))
    assert len(fewshot_split(task, 4, seed=1, cache_dir=tmp_path)[0]) == 1


def test_fewshot_same_seed_same_indices_without_cache(tmp_path):
    task = make_task([30, 30])
    a, av = fewshot_split(task, 8, seed=2, cache_dir=tmp_path / "x")
    b, bv = fewshot_split(task, 8, seed=2, cache_dir=tmp_path / "y")
    assert a.ids.tolist() == b.ids.tolist() and av.ids.tolist() == bv.ids.tolist()


@pytest.mark.parametrize("garbage", ["{oops", "[]", json.dumps({"train": [0], "val": []}),
                                     json.dumps({"train": [999], "val": [], "n_train": 60, "n_val": 60,
                                                 "train_ids": ["tr0"], "val_ids": []})])
def test_fewshot_corrupt_cache_recomputed(tmp_path, garbage):
    task = make_task([30, 30])
    fresh, _ = fewshot_split(task, 2, seed=1, cache_dir=tmp_path / "fresh")
    cache = tmp_path / "c" / "toy" / "shot_2-seed_1.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(garbage)
    tr, va = fewshot_split(task, 2, seed=1, cache_dir=tmp_path / "c")
    assert tr.ids.tolist() == fresh.ids.tolist() and len(va) == 4
    assert json.loads(cache.read_text())["train_ids"] == fresh.ids.tolist()  # overwritten


def test_fewshot_stale_cache_recomputed(tmp_path):
    big = make_task([30, 30])
    fewshot_split(big, 2, seed=1, cache_dir=tmp_path)
    small = make_task([3, 3])  # same name, different data
    tr, _ = fewshot_split(small, 2, seed=1, cache_dir=tmp_path)
    assert Counter(tr.labels.tolist()) == {0: 2, 1: 2} and max(int(i[2:]) for i in tr.ids) < 6


def test_fewshot_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BBPT_DATA", str(tmp_path))
    fewshot_split(make_task([3, 3]), 1, seed=1)
    assert (tmp_path / "split_fewshot" / "toy" / "shot_1-seed_1.json").is_file()


@pytest.mark.parametrize("k", [0, -1, 1.5, "4", True])
def test_fewshot_bad_shots(tmp_path, k):
    with pytest.raises(BadInput, match="shots must be a positive integer"):
        fewshot_split(make_task([3]), k, seed=1, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- base-to-new

def test_base_new_split():
    task = make_task([2, 3, 4, 5, 6])
    base, new = subsample_classes(task, "base"), subsample_classes(task, "new")
    assert base.classnames == ["c0", "c1", "c2"] and new.classnames == ["c3", "c4"]
    assert base.name == "toy-base" and new.name == "toy-new"
    assert Counter(base.train.labels.tolist()) == {0: 2, 1: 3, 2: 4}
    assert Counter(new.train.labels.tolist()) == {0: 5, 1: 6}  # c3 -> 0, c4 -> 1
    # every image keeps its class: the relabelled name equals the original name
    orig = {i: y for s in (task.train, task.val, task.test) for i, y in zip(s.ids.tolist(), s.labels.tolist())}
    for sub in (base, new):
        for split in (sub.train, sub.val, sub.test):
            for i, y in zip(split.ids.tolist(), split.labels.tolist()):
                assert sub.classnames[y] == task.classnames[orig[i]]
    assert len(new.test) == 2 and new.test.labels.tolist() in ([0, 1], [1, 0])
    assert subsample_classes(task, "all") is task
    with pytest.raises(BadInput, match="'half'.*use 'all', 'base' or 'new'"):
        subsample_classes(task, "half")


# ----------------------------------------------------------------------------- templates

def test_template_for():
    pets = "a photo of a {}, a type of pet."
    for n in ("OxfordPets", "oxford-pets", "oxford_pets", "pets", "split_zhou_OxfordPets"):
        assert template_for(n) == pets
    assert template_for("DescribableTextures") == template_for("textures") == "{} texture."
    assert template_for("fgvc") == "a photo of a {}, a type of aircraft."
    assert template_for("food-101") == "a photo of {}, a type of food."
    assert template_for("UCF101") == "a photo of a person doing {}."
    assert template_for("imagenet-sketch") == template_for("ImageNet_A") == "a photo of a {}."
    assert template_for("CLEVR") == "This is a photo of {} objects."
    assert template_for("my_cats") is None
    assert len(CUSTOM_TEMPLATES) == 18 and all(t.endswith(".") and "{}" in t for t in CUSTOM_TEMPLATES.values())
