"""Protocols (base-to-new, cross-dataset, distribution shift) and the NAME@SHIFT test splits."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bbpt import protocols
from bbpt.data import load_task, subsample_classes
from bbpt.engine import make_run_config, run
from bbpt.errors import BadInput, UnknownName
from test_cli import cli_run
from bbpt.protocols import harmonic_mean

FAST = dict(shots=2, seeds=(1,), progress=False)




def pct(v):
    return f"{100 * v:.2f}"


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.0) == 0.0


def test_shifted_pixels_and_ids():
    clean, inv, noi = load_task("shapes"), load_task("shapes@inverted"), load_task("shapes@noised")
    idx = [0, 5, 17]
    x = clean.test.pixels(idx, size=32)
    assert inv.name == "shapes@inverted" and inv.classnames == clean.classnames
    assert torch.equal(inv.test.pixels(idx, size=32), 1 - x)
    n1, n2 = noi.test.pixels(idx, size=32), noi.test.subset(idx).pixels(size=32)
    assert torch.equal(n1, n2) and not torch.equal(n1, x)  # seeded per image id, not per call
    assert 0 <= n1.min() and n1.max() <= 1 and 0.05 < (n1 - x).abs().mean() < 0.2
    assert noi.test.subset(idx).shift == "noised"  # subset keeps the shift
    for t, name in ((inv, "inverted"), (noi, "noised")):
        assert list(t.test.ids[:2]) == [f"{i}@{name}" for i in clean.test.ids[:2]]
        assert not set(t.test.ids) & set(clean.test.ids)
        assert t.train.shift is None and t.val.shift is None  # train / val untouched
        assert np.array_equal(t.train.ids, clean.train.ids) and np.array_equal(t.val.ids, clean.val.ids)
        assert torch.equal(t.train.pixels([0, 1], 32), clean.train.pixels([0, 1], 32))
    for name in ("rotated", "blurred"):
        px = load_task(f"shapes@{name}").test.pixels(idx, size=32)
        assert px.shape == x.shape and not torch.equal(px, x) and 0 <= px.min() and px.max() <= 1


def test_unknown_shift_lists_valid_names():
    with pytest.raises(UnknownName) as e:
        load_task("shapes@invertd")
    msg = str(e.value)
    assert "did you mean 'inverted'" in msg and all(s in msg for s in ("inverted", "rotated", "noised"))
    with pytest.raises(UnknownName, match="unknown dataset"):
        load_task("nope@inverted")
    with pytest.raises(UnknownName, match="unknown shift"):
        protocols.distribution_shift("zeroshot", "shapes", ["inverted", "sheared"], **FAST)


def test_base_to_new_records_and_summary(tmp_path):
    s = protocols.base_to_new("zosgd", "shapes", options={"budget": 40}, out=tmp_path / "b2n", **FAST)
    r = json.loads((tmp_path / "b2n" / "seed1" / "result.json").read_text())
    b2n = r["base_to_new"]
    assert r["dataset"] == "shapes-base" and r["queries"]["api_calls"] == 40
    assert b2n["base"] == r["accuracy"]["test"] and b2n["H"] == harmonic_mean(b2n["base"], b2n["new"])
    assert b2n["targets"]["new"]["eval_queries"]["images_forwarded"] > 0  # evaluation, apart from the budget
    assert s["rows"] == [{"seed": 1, "base": b2n["base"], "new": b2n["new"], "H": b2n["H"]}]
    assert json.loads((tmp_path / "b2n" / "summary.json").read_text())["mean"] == s["mean"]
    md = (tmp_path / "b2n" / "summary.md").read_text()
    assert f"| 1 | {pct(b2n['base'])} | {pct(b2n['new'])} | {pct(b2n['H'])} |" in md
    assert f"{pct(b2n['H'])} ± 0.00" in md


def test_base_to_new_zeroshot_equals_direct_evaluation(tmp_path):
    s = protocols.base_to_new("zeroshot", "shapes", out=tmp_path / "z", **FAST)
    direct = run(make_run_config(method="zeroshot", dataset="shapes", shots=2, classes="new"), progress=False)
    assert direct.dataset == "shapes-new"
    assert s["rows"][0]["new"] == direct.accuracy.test
    new = subsample_classes(load_task("shapes"), "new")
    assert s["new_classes"] == new.classnames and len(new.classnames) == 5


def make_folder(root, classes, n=5):
    """A tiny train/test image folder: n seeded random 16x16 images per class and split."""
    rng = np.random.default_rng(len(classes))
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return (make_folder(root / "three", ["red circle", "blue square", "green cross"]),
            make_folder(root / "four", ["cat", "dog", "bird", "fish"]))


def test_cross_dataset_other_class_counts(tmp_path, folders):
    three, four = folders
    s = protocols.cross_dataset("zosgd", four, [three], options={"budget": 20}, out=tmp_path / "xd", **FAST)
    r = json.loads((tmp_path / "xd" / "seed1" / "result.json").read_text())
    t = r["cross_dataset"]["targets"][three]
    assert t["eval_queries"]["images_forwarded"] == 15 and 0 <= t["accuracy"] <= 1
    assert r["queries"]["api_calls"] == 20
    row = s["rows"][0]
    assert row["source"] == r["accuracy"]["test"] and row[three] == t["accuracy"] == row["mean"]
    with pytest.raises(BadInput, match="is the source"):
        protocols.cross_dataset("zeroshot", four, [four], **FAST)


def test_cross_dataset_mnist_to_fashion(tmp_path):
    s = protocols.cross_dataset("zip", "mnist", ["fashion-mnist"], options={"budget": 40}, out=tmp_path / "x", **FAST)
    r = json.loads((tmp_path / "x" / "seed1" / "result.json").read_text())
    t = r["cross_dataset"]["targets"]["fashion-mnist"]
    assert s["rows"][0]["fashion-mnist"] == t["accuracy"] and s["mean"]["mean"] == t["accuracy"]
    assert r["queries"]["api_calls"] == 40 and t["eval_queries"]["images_forwarded"] == 10000
    md = (tmp_path / "x" / "summary.md").read_text()
    assert f"| 1 | {pct(r['accuracy']['test'])} | {pct(t['accuracy'])} | {pct(t['accuracy'])} |" in md


def test_distribution_shift_of_a_folder(tmp_path, folders):
    four = folders[1]
    s = protocols.distribution_shift("zeroshot", four, ["inverted", "noised"], out=tmp_path / "s", **FAST)
    assert s["targets"] == ["inverted", "noised"] and list(s["columns"]) == ["source", "inverted", "noised", "mean"]
    row = s["rows"][0]
    assert row["mean"] == pytest.approx((row["inverted"] + row["noised"]) / 2)
    # the shifted column is the zero-shot accuracy on the shifted test split
    direct = run(make_run_config(method="zeroshot", dataset=f"{four}@inverted", shots=2), progress=False)
    assert direct.dataset == "four@inverted" and direct.accuracy.test == row["inverted"]


def test_cli_protocols_end_to_end(tmp_path, capsys, folders):
    three, four = folders
    code, out, err = cli_run(["base2new", "--method", "zeroshot", "--dataset", four, "--shots", "2", "--seeds", "1",
                              "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0, err
    assert "| seed | base | new | H |" in out and f"summary: {tmp_path / 'b'}/summary.md" in out
    code, out, err = cli_run(["cross-dataset", "--method", "zosgd", "--source", four, "--targets", three, "--shots", "2",
                              "--seeds", "1,2", "--budget", "20", "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert s["seeds"] == [1, 2] and s["options"]["budget"] == 20 and "mean (targets)" in out
    code, out, err = cli_run(["shift", "--method", "zeroshot", "--dataset", three, "--shifts", "rotated,blurred",
                              "--shots", "2", "--seeds", "1", "--out", str(tmp_path / "s"), "--quiet"], capsys)
    assert code == 0, err
    assert "| rotated | blurred |" in out and (tmp_path / "s" / "seed1" / "result.json").exists()
    for args, expected in [
        (["cross-dataset", "--method", "zeroshot", "--source", "shapes", "--targets", "mnist,fashoin"], "did you mean 'fashion-mnist'"),
        (["shift", "--method", "zeroshot", "--dataset", "shapes", "--shifts", "rotatd"], "unknown shift 'rotatd'"),
        (["base2new", "--method", "zeroshot", "--dataset", "shapes", "--seeds", "1,x"], "--seeds"),
    ]:
        code, out, err = cli_run([*args, "--shots", "2", "--out", str(tmp_path / "e"), "--quiet"], capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
    assert not (tmp_path / "e").exists()  # bad input fails before any training
