"""Input checks: the pixel limit, check_images, shots vs class sizes, class counts, stratified_subset."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbpt.data import check_images, fewshot_split, stratified_subset
from bbpt.data.core import DEFAULT_MAX_IMAGE_PIXELS, ImageSet, Task, _read_image, max_image_pixels
from bbpt.data.imagefolder import load_coop_split, load_imagefolder
from bbpt.errors import BadInput


def png(path: Path, value: int = 128, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def folders(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    """Layout (a): root/{train,test}/<class>/<i>.png."""
    for split, counts in (("train", train), ("test", test)):
        for c, n in counts.items():
            for i in range(n):
                png(root / split / c / f"{i}.png", value=10 * i)
    return root


def huge_png(path: Path, w: int = 15000, h: int = 15000) -> Path:
    """A real w x h 8-bit grayscale PNG of zeros, compressed row by row (~220 KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, rows = zlib.compressobj(9), b"\x00" * ((w + 1) * 500)  # 500 rows: filter byte 0 + w zero pixels each
    idat = b"".join(z.compress(rows) for _ in range(h // 500)) + z.compress(b"\x00" * ((w + 1) * (h % 500)))
    idat += z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no filter, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb_set(tmp_path_factory):
    root = folders(tmp_path_factory.mktemp("bomb") / "d", {"cat": 2, "dog": 2}, {"cat": 2, "dog": 2})
    big = huge_png(root / "test" / "dog" / "big.png")
    return load_imagefolder(root), str(big)


# ----------------------------------------------------------------------------- pixel limit

def test_huge_png_is_real(bomb_set):
    _, big = bomb_set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
        try:
            with Image.open(big) as im:
                assert im.size == (15000, 15000) and im.mode == "L"
                im.verify()  # chunk CRCs are right
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    assert Path(big).stat().st_size < 2_000_000


def test_bomb_refused_by_check_images_and_read_image(bomb_set):
    task, big = bomb_set
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (DecompressionBombWarning included) fails the test
        assert check_images(task.train, "train") == len(task.train) == 2  # val carved: 1 of each class
        with pytest.raises(BadInput) as e:
            check_images(task.test, "test")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"test image {big} is 15000x15000 (225.0 Mpx)")
        assert "over bbpt's limit of 89.5 Mpx" in msg and "BBPT_MAX_IMAGE_PIXELS" in msg
        with pytest.raises(BadInput, match=r"image .*big\.png is 15000x15000 .*BBPT_MAX_IMAGE_PIXELS") as e:
            _read_image(big, 32)
        assert "\n" not in str(e.value)
        with pytest.raises(BadInput, match="15000x15000"):
            task.test.pixels(size=32)
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global is left as it was


def test_pixel_limit_from_environment(tmp_path, monkeypatch, recwarn):
    root = folders(tmp_path / "d", {"a": 1, "b": 1}, {"a": 1, "b": 1})
    (root / "test" / "b" / "0.png").unlink()
    small = str(png(root / "test" / "b" / "0.png", size=64))
    task = load_imagefolder(root)
    monkeypatch.delenv("BBPT_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert check_images(task.test, "test") == 2 and _read_image(small, 16).shape == (3, 16, 16)
    monkeypatch.setenv("BBPT_MAX_IMAGE_PIXELS", "4000")
    with pytest.raises(BadInput, match=r"test image .*b/0\.png is 64x64 \(4096 px\), over bbpt's limit of 4000 px"):
        check_images(task.test, "test")
    with pytest.raises(BadInput, match=r"is 64x64 .*raise BBPT_MAX_IMAGE_PIXELS"):
        _read_image(small, 16)
    monkeypatch.setenv("BBPT_MAX_IMAGE_PIXELS", "4096")  # the limit itself is allowed
    assert check_images(task.test, "test") == 2
    monkeypatch.setenv("BBPT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(BadInput, match="BBPT_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'"):
        check_images(task.test, "test")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_raised_limit_lets_a_big_image_through(tmp_path, monkeypatch):
    """Between PIL's limit and bbpt's raised one: decoded, and PIL does not warn."""
    f = tmp_path / "wide.png"
    Image.new("L", (2000, 50)).save(f)  # 100 000 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # PIL would warn (raise above 120 000)
    monkeypatch.setenv("BBPT_MAX_IMAGE_PIXELS", "200000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _read_image(str(f), 8).shape == (3, 8, 8)
        assert check_images(ImageSet(labels=[0], ids=["w"], paths=[str(f)]), "test") == 1
    assert Image.MAX_IMAGE_PIXELS == 60_000


# ----------------------------------------------------------------------------- check_images

def test_check_images_reports_broken_files(tmp_path):
    root = folders(tmp_path / "d", {"cat": 3, "dog": 3}, {"cat": 4, "dog": 4})
    task = load_imagefolder(root)
    assert check_images(task.train, "train") == len(task.train) == 3 + 3 - len(task.val)
    assert check_images(task.test, "test", progress=True) == 8

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    good = buf.getvalue()
    truncated, garbage = root / "test" / "dog" / "2.png", root / "test" / "cat" / "3.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(BadInput, match=rf"^test image {truncated} cannot be read \(.+\); remove or replace it"):
        check_images(task.test, "test")
    garbage.write_bytes(b"this is not an image" * 20)  # cat/3 comes before dog/2 in the split
    with pytest.raises(BadInput) as e:
        check_images(task.test, "test")
    assert str(e.value) == (f"test image {garbage} cannot be read (cannot identify image file); "
                            "remove or replace it, then rerun")
    garbage.unlink()
    with pytest.raises(BadInput, match=rf"test image {garbage} does not exist"):
        check_images(task.test, "test")


def test_check_images_decodes_jpegs(tmp_path):
    """verify() reads no JPEG data: a JPEG cut in half must still be found before training."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    ok, cut = tmp_path / "ok.jpg", tmp_path / "cut.jpg"
    ok.write_bytes(buf.getvalue())
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert check_images(ImageSet(labels=[0], ids=["ok"], paths=[str(ok)]), "test") == 1
    with pytest.raises(BadInput, match=rf"test image {cut} cannot be read \(image file is truncated"):
        check_images(ImageSet(labels=[0, 0], ids=["ok", "cut"], paths=[str(ok), str(cut)]), "test")


def test_check_images_first_bad_in_index_order(tmp_path):
    files = [str(png(tmp_path / f"{i:03d}.png")) for i in range(60)]
    for i in (41, 17, 53):
        Path(files[i]).write_bytes(b"junk")
    s = ImageSet(labels=[0] * 60, ids=[str(i) for i in range(60)], paths=files)
    for _ in range(3):
        with pytest.raises(BadInput, match=r"val image .*017\.png cannot be read"):
            check_images(s, "val")


def test_check_images_skips_arrays():
    s = ImageSet(labels=[0, 1], ids=["a", "b"], array=np.zeros((2, 4, 4), np.uint8))
    assert check_images(s, "test") == 0


# ----------------------------------------------------------------------------- shots and classes

def array_task(counts: list[int], names: list[str]) -> Task:
    def imageset(cs, prefix):
        labels = np.random.default_rng(1).permutation([y for y, n in enumerate(cs) for _ in range(n)])
        return ImageSet(labels=labels, ids=[f"{prefix}{i}" for i in range(len(labels))],
                        array=np.zeros((len(labels), 2, 2), np.uint8))

    return Task(name="shots", classnames=names, templates=["a photo of a {}."], train=imageset(counts, "tr"),
                val=imageset([2] * len(counts), "va"), test=imageset([1] * len(counts), "te"))


def test_shots_above_smallest_class(tmp_path):
    task = array_task([20, 5, 7, 5], ["dog", "cat", "cow", "owl"])
    with pytest.raises(BadInput) as e:
        fewshot_split(task, 16, seed=1, cache_dir=tmp_path)
    assert str(e.value) == ("--shots 16 is more than class 'cat' has in the train split (5 images); "
                            "use --shots 5 or fewer, or add images")
    assert not any(tmp_path.rglob("*.json"))  # refused before the cache is written
    with pytest.raises(BadInput, match=r"class 'cat' .*\(5 images\)"):
        fewshot_split(task, 6, seed=1, cache_dir=tmp_path)
    tr, va = fewshot_split(task, 5, seed=1, cache_dir=tmp_path)
    assert Counter(tr.labels.tolist()) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert Counter(va.labels.tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}  # val: min(5, 4) but only 2 each: all


def test_shots_class_without_train_images(tmp_path):
    task = array_task([3, 0], ["dog", "cat"])
    with pytest.raises(BadInput, match="class 'cat' has no images in the train split"):
        fewshot_split(task, 1, seed=1, cache_dir=tmp_path)


ONE_CLASS = r"has 1 class \('cat'\); classification needs at least 2 classes"


def test_one_class_folders(tmp_path):
    root = folders(tmp_path / "d", {"cat": 2}, {"cat": 1})
    with pytest.raises(BadInput, match=rf"^dataset {root} {ONE_CLASS}: add class folders$"):
        load_imagefolder(root)


def test_one_class_split_json(tmp_path):
    root = tmp_path / "d"
    png(root / "cat" / "0.png"), png(root / "cat" / "1.png")
    (root / "split.json").write_text(json.dumps({"train": ["cat/0.png"], "test": ["cat/1.png"]}))
    with pytest.raises(BadInput, match=rf"^dataset {root} {ONE_CLASS}: add class folders$"):
        load_imagefolder(root)


def test_one_class_coop_split(tmp_path):
    root = tmp_path / "d"
    png(root / "images" / "cat" / "0.jpg"), png(root / "images" / "cat" / "1.jpg")
    f = root / "split_zhou_Cats.json"
    f.write_text(json.dumps({"train": [["cat/0.jpg", 0, "cat"]], "val": [], "test": [["cat/1.jpg", 0, "cat"]]}))
    for load in (lambda: load_imagefolder(root), lambda: load_coop_split(f, root / "images")):
        with pytest.raises(BadInput, match=rf"^dataset {f} {ONE_CLASS}"):
            load()
    # two classes load fine
    png(root / "images" / "dog" / "0.jpg")
    f.write_text(json.dumps({"train": [["cat/0.jpg", 0, "cat"], ["dog/0.jpg", 1, "dog"]],
                             "test": [["cat/1.jpg", 0, "cat"]]}))
    assert load_imagefolder(root).classnames == ["cat", "dog"]


# ----------------------------------------------------------------------------- stratified_subset

def labelled(counts: list[int]) -> ImageSet:
    labels = np.random.default_rng(0).permutation([y for y, n in enumerate(counts) for _ in range(n)])
    return ImageSet(labels=labels, ids=[f"i{j}" for j in range(len(labels))],
                    array=np.arange(len(labels), dtype=np.uint8).repeat(4).reshape(-1, 2, 2))


def test_stratified_subset_proportional_and_seeded():
    s = labelled([50, 30, 20])
    sub = stratified_subset(s, 10, seed=0)
    assert len(sub) == 10 and Counter(sub.labels.tolist()) == {0: 5, 1: 3, 2: 2}
    idx = [int(i[1:]) for i in sub.ids]
    assert idx == sorted(idx) and np.array_equal(sub.labels, s.labels[idx])  # original order, labels kept
    assert np.array_equal(sub.array, s.array[idx])
    assert stratified_subset(s, 10, seed=0).ids.tolist() == sub.ids.tolist()
    assert stratified_subset(s, 10, seed=1).ids.tolist() != sub.ids.tolist()
    # largest remainder, ties by class order: 7 of 50/30/20 -> 3.5/2.1/1.4 -> 4/2/1
    assert Counter(stratified_subset(s, 7).labels.tolist()) == {0: 4, 1: 2, 2: 1}
    # 2 of three equal classes -> the first two classes
    assert sorted(stratified_subset(labelled([4, 4, 4]), 2).labels.tolist()) == [0, 1]
    for n in range(1, 100):
        assert len(stratified_subset(s, n, seed=3)) == n


def test_stratified_subset_edges():
    s = labelled([5, 3])
    assert stratified_subset(s, 8) is s and stratified_subset(s, 100) is s
    for bad in (0, -3, 2.5, True):
        with pytest.raises(BadInput, match="--test-subset must be >= 1"):
            stratified_subset(s, bad)


def test_stratified_subset_same_across_processes():
    make = "ImageSet(labels=np.arange(300) % 7, ids=np.arange(300).astype(str), array=np.zeros((300, 1, 1), np.uint8))"
    code = ("import numpy as np; from bbpt.data import ImageSet, stratified_subset; "
            f"print(','.join(stratified_subset({make}, 40, seed=5).ids))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = ImageSet(labels=np.arange(300) % 7, ids=np.arange(300).astype(str), array=np.zeros((300, 1, 1), np.uint8))
    assert out.strip() == ",".join(stratified_subset(here, 40, seed=5).ids)


# ----------------------------------------------------------------------------- full decode before training

BROKEN_KINDS = {"bmp": ".bmp", "gif": ".gif", "tiff": ".tif", "png-idat": ".png"}


def broken_image(path: Path, kind: str, intact: bool = False) -> Path:
    """A 64x64 image whose header opens and whose ``verify()`` passes but whose image data does
    not decode: a BMP, GIF or TIFF cut in half, or a PNG whose IDAT is random bytes under a
    correct CRC. ``intact``: the same image, unbroken."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG" if kind == "png-idat" else kind)
    data = buf.getvalue()
    if intact:
        pass
    elif kind == "png-idat":
        i = data.index(b"IDAT")
        n = struct.unpack(">I", data[i - 4:i])[0]
        junk = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        data = data[:i] + b"IDAT" + junk + struct.pack(">I", zlib.crc32(b"IDAT" + junk)) + data[i + 8 + n:]
    else:
        data = data[: len(data) // 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_check_images_decodes_every_format(tmp_path, kind):
    """verify() passes on all of these; only decoding them finds the damage."""
    ok = broken_image(tmp_path / f"ok{BROKEN_KINDS[kind]}", kind, intact=True)
    bad = broken_image(tmp_path / f"bad{BROKEN_KINDS[kind]}", kind)
    with Image.open(bad) as im:
        im.verify()  # what the check used to rely on
    assert check_images(ImageSet(labels=[0], ids=["ok"], paths=[str(ok)]), "test") == 1
    with pytest.raises(BadInput) as e:
        check_images(ImageSet(labels=[0, 0], ids=["ok", "bad"], paths=[str(ok), str(bad)]), "test")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"test image {bad} cannot be read (")
    assert msg.endswith("); remove or replace it, then rerun")


# ----------------------------------------------------------------------------- 16-bit images

def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale gradient comes out as value / 257 everywhere images are read:
    the test transform, the training views and the server's preprocessing (PIL alone clips
    at 255: almost every pixel white)."""
    import torch

    from bbpt.data.core import preprocess_pil, to_rgb
    from bbpt.data.views import TrainViews, ViewSpec

    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    f = tmp_path / "gradient16.png"
    Image.fromarray(values).save(f)
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)  # round(value / 257): 0..65535 -> 0..255
    with Image.open(f) as im:
        assert im.mode.startswith("I;16")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (64, 64, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert (rgb == 255).mean() < 0.01
    s = ImageSet(labels=[0], ids=["g"], paths=[str(f)])
    assert check_images(s, "test") == 1
    as_bytes = lambda x: (x * 255).round().to(torch.uint8).numpy()  # noqa: E731
    assert np.array_equal(as_bytes(_read_image(str(f), 64))[0], expected)  # test transform at the image's size
    assert np.array_equal(as_bytes(s.pixels(size=64))[0, 1], expected)
    views = TrainViews(s, 64, ViewSpec(scale=(1.0, 1.0), flip=False, pool=1), seed=0)  # whole-image views
    assert np.array_equal(as_bytes(views.pixels([0], [0]))[0, 2], expected)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):  # the byte-order variants
        im = Image.frombytes(mode, (64, 64), values.astype(dtype).tobytes())
        assert np.array_equal(np.asarray(preprocess_pil(im, 64)[0].mul(255).round().byte()), expected)
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I: what older Pillows open a 16-bit PNG as
    assert as_int32.mode == "I" and np.array_equal(np.asarray(to_rgb(as_int32))[..., 0], expected)


# ----------------------------------------------------------------------------- split entries leaving the folder

def escaping_entries(root: Path, outside: Path) -> list[str]:
    """Paths to ``outside`` (an existing image) from split entries relative to ``root``."""
    up = "../" * len(root.relative_to(outside.parent.parent).parts)  # from root up to outside's grandparent
    rel = f"{up}{outside.parent.name}/{outside.name}"
    return [f"cat/../{rel}", f"cat/./../dog/../{rel}", str(outside), rel.replace("/", "\\"), "C:/x.png",
            "//server/share/x.png", "cat/../../x.png"]


def test_split_json_entries_must_stay_inside_the_dataset(tmp_path):
    root, outside = tmp_path / "data" / "d", png(tmp_path / "elsewhere" / "secret.png")
    for c in ("cat", "dog"):
        png(root / c / "0.png"), png(root / c / "1.png")
    f = root / "split.json"
    for bad in escaping_entries(root, outside):
        f.write_text(json.dumps({"train": ["cat/0.png", "dog/0.png"], "test": ["cat/1.png", bad]}))
        with pytest.raises(BadInput) as e:
            load_imagefolder(root)
        assert str(e.value) == (f"split file {f}: test[1] {bad!r} points outside the dataset folder {root}; "
                                "use paths like '<class>/<file>', relative to it"), bad
    # a path that wanders but stays inside is fine, and its id is the normalised path
    f.write_text(json.dumps({"train": ["cat/0.png", "dog/./x/../0.png"], "test": ["cat/1.png", "dog\\1.png"]}))
    task = load_imagefolder(root)
    assert task.train.ids.tolist() == ["cat/0.png", "dog/0.png"] and task.test.ids.tolist() == ["cat/1.png", "dog/1.png"]
    assert task.train.paths[1] == str(root / "dog" / "0.png") and task.test.labels.tolist() == [0, 1]


def test_coop_split_entries_must_stay_inside_the_image_folder(tmp_path):
    root, outside = tmp_path / "data" / "d", png(tmp_path / "elsewhere" / "secret.png")
    images = root / "images"
    for c in ("cat", "dog"):
        png(images / c / "0.jpg"), png(images / c / "1.jpg")
    f = root / "split_zhou_Pets.json"
    for bad in escaping_entries(images, outside):
        f.write_text(json.dumps({"train": [["cat/0.jpg", 0, "cat"], ["dog/0.jpg", 1, "dog"]], "val": [],
                                 "test": [["cat/1.jpg", 0, "cat"], [bad, 1, "dog"]]}))
        for load in (lambda: load_imagefolder(root), lambda: load_coop_split(f, images)):
            with pytest.raises(BadInput) as e:
                load()
            assert str(e.value) == (f"split file {f}: test[1] {bad!r} points outside the image folder {images}; "
                                    "give image paths relative to it, without leaving it"), bad
    f.write_text(json.dumps({"train": [["cat/0.jpg", 0, "cat"], ["dog/../dog/0.jpg", 1, "dog"]], "val": [],
                             "test": [["cat/1.jpg", 0, "cat"], ["dog/1.jpg", 1, "dog"]]}))
    assert load_coop_split(f, images).train.paths[1] == str(images / "dog" / "0.jpg")


def test_aircraft_ids_must_stay_inside_images(tmp_path):
    root, outside = tmp_path / "fgvc_aircraft", png(tmp_path / "secret.jpg")
    (root / "variants.txt").parent.mkdir(parents=True)
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for i in range(4):
        png(root / "images" / f"{i}.jpg")
    for split, lines in (("train", "0 707-320\n1 A300B4"), ("val", "0 707-320\n1 A300B4"), ("test", "2 707-320\n3 A300B4")):
        (root / f"images_variant_{split}.txt").write_text(lines + "\n")
    assert len(load_imagefolder(root).test) == 2
    (root / "images_variant_test.txt").write_text("2 707-320\n../../secret A300B4\n")
    with pytest.raises(BadInput, match=r"images_variant_test\.txt line 2: image id '\.\./\.\./secret' points outside "):
        load_imagefolder(root)
    assert outside.exists()
