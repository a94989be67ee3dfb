"""`bbpt data check` on a generated CoOp data root (the real folder and split-file names)."""
import json
import subprocess
import sys

import pytest
from coop_tree import make_coop_root

from bbpt.data.coop import COOP_DATASETS, check_root

BBPT = [sys.executable, "-m", "bbpt.cli"]


@pytest.fixture()
def root(tmp_path):
    return make_coop_root(tmp_path / "DATA")


def check(*args):
    p = subprocess.run([*BBPT, "data", "check", *map(str, args)], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_a_complete_root_passes(root):
    code, out, err = check(root)
    assert code == 0, out + err
    lines = [ln for ln in out.splitlines() if ln.startswith("ok")]
    assert len(lines) == len(COOP_DATASETS) == 11
    assert "ok       OxfordPets           oxford_pets/: 3 classes, 9/3/6 train/val/test images" in out
    assert "ok       ImageNet             imagenet/: 3 classes, 9 train and 6 val (test) images" in out
    assert "ok       FGVCAircraft         fgvc_aircraft/: 3 classes, 9/3/6 train/val/test images" in out
    assert out.strip().endswith(f"11 complete, 0 with problems, 0 absent ({root})")


def test_each_problem_is_named_with_its_fix(root):
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    next((root / "dtd" / "images").rglob("*.jpg")).unlink()
    (root / "imagenet" / "classnames.txt").unlink()
    (root / "fgvc_aircraft" / "images_variant_val.txt").write_text("xx0000 not-a-variant\n")
    import shutil

    shutil.rmtree(root / "eurosat")
    code, out, _ = check(root)
    assert code == 1
    assert f"{root}/oxford_pets/split_zhou_OxfordPets.json is missing: download split_zhou_OxfordPets.json from CoOp's DATASETS.md" in out
    assert "1 of the 18 images the split names are not under" in out and "extract dtd-r1.0.1.tar.gz" in out
    assert f"{root}/imagenet/classnames.txt is missing: download classnames.txt (CLIP's ImageNet class names)" in out
    assert "images_variant_val.txt: 1 lines are not 'id variant' with a variant of variants.txt" in out
    assert "absent   EuroSAT" in out  # not named: absent is information, not a problem
    assert out.strip().endswith(f"6 complete, 4 with problems, 1 absent ({root})")
    code, out, _ = check(root, "--dataset", "EuroSAT")
    assert code == 1 and f"{root}/eurosat does not exist: create it and extract EuroSAT.zip" in out


def test_bad_arguments_are_one_line(tmp_path, root):
    code, _, err = check(tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and "data root" in err and "does not exist" in err
    code, _, err = check(root, "--dataset", "Pets2")
    assert code == 2 and err.count("\n") == 1 and "unknown CoOp dataset 'Pets2'" in err and "OxfordPets" in err


def test_a_checked_dataset_runs(root, tmp_path):
    assert all(r.ok for r in check_root(root, ["OxfordPets"]))
    p = subprocess.run([*BBPT, "run", "--method", "zip", "--dataset", str(root / "oxford_pets"), "--shots", "2",
                        "--budget", "20", "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert r["queries"]["api_calls"] == 20 and r["dataset"] == "oxford_pets"


def test_imagenet_and_aircraft_load_in_their_own_layouts(root):
    from coop_tree import CLASSES

    from bbpt.data.imagefolder import load_imagefolder

    inet = load_imagefolder(root / "imagenet")
    assert inet.classnames == CLASSES and len(inet.test) == 6  # images/val is the test set
    assert len(inet.train) + len(inet.val) == 9 and len(inet.val) == 3 and inet.meta["val_from_train"]
    assert inet.templates == ["a photo of a {}."]
    air = load_imagefolder(root / "fgvc_aircraft")
    assert air.classnames == CLASSES and (len(air.train), len(air.val), len(air.test)) == (9, 3, 6)
    assert air.templates == ["a photo of a {}, a type of aircraft."]
    (root / "fgvc_aircraft" / "images_variant_test.txt").write_text("te00000 no-such-variant\n")
    with pytest.raises(Exception, match="variant 'no-such-variant' is not in variants.txt"):
        load_imagefolder(root / "fgvc_aircraft")
