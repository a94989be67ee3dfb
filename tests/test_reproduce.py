"""`bbpt reproduce`: the papers' tables as data, and one command per table row."""
import json
import statistics
import subprocess
import sys

import pytest
from coop_tree import make_coop_root

from bbpt.data.coop import COOP_DATASETS
from bbpt.methods import METHODS
from bbpt.methods.craft import PRESETS
from bbpt.reproduce import EXTRA_FOLDERS, find, load_tables, plan

BBPT = [sys.executable, "-m", "bbpt.cli"]
FOLDERS = {d.folder for d in COOP_DATASETS} | set(EXTRA_FOLDERS)
TABLES = load_tables()


@pytest.mark.parametrize("table", TABLES, ids=[t.id for t in TABLES])
def test_each_shipped_row_agrees_with_the_papers_average_column(table):
    """A mistyped number moves the row's mean off the paper's own Avg. column."""
    assert set(table.datasets) <= FOLDERS and len(set(table.datasets)) == len(table.datasets)
    for m, row in table.rows.items():
        assert m in METHODS.names()
        assert list(row.accuracy) == list(table.datasets)
        decimals = len(str(row.average).split(".")[1]) if "." in str(row.average) else 0
        mean = statistics.mean(row.accuracy.values())
        assert abs(mean - row.average) <= 0.5 * 10**-decimals + 1e-9, (m, mean, row.average)
        assert all(0 <= a <= 100 for a in row.accuracy.values())


def test_the_shipped_configs_are_the_papers():
    zip_t = next(t for t in TABLES if t.id == "zip-fewshot")
    assert (zip_t.model, zip_t.pretrained, zip_t.shots, zip_t.seeds) == ("ViT-B-16", "openai", 16, (1, 2, 3))
    assert len(zip_t.datasets) == 13
    assert zip_t.rows["zip"].accuracy["svhn"] == 47.8 and zip_t.rows["zip"].accuracy["imagenet"] == 66.2
    for m in ("zip", "bar", "blackvip", "bptvlm"):  # ZIP's re-implementation: every method at 5000 api_calls
        assert zip_t.rows[m].options["budget"] == 5000
    assert zip_t.rows["bptvlm"].options["preset"] == "zip"
    for m in ("zip", "bar", "blackvip"):  # the official loaders flip SVHN; bbpt's digit default would not
        assert zip_t.rows[m].options_for("svhn") == {"budget": 5000, "flip": True}
    crafts = [t for t in TABLES if t.id.startswith("craft-")]
    assert sorted(t.model for t in crafts) == ["RN101", "RN50", "ViT-B-16", "ViT-B-32"]
    for t in crafts:
        assert (t.shots, t.seeds) == (16, (1, 2, 3)) and len(t.datasets) == 11
        per = t.rows["craft"].per_dataset
        assert set(per) == set(t.datasets) and all(o["preset"] in PRESETS for o in per.values())
        assert per["dtd"]["preset"] == "dtd" and per["food-101"]["preset"] == "food101"
        assert per["imagenet"] == {"preset": "imagenet", "budget": 4000}  # the ImageNet script's budget
    rn50 = next(t for t in crafts if t.model == "RN50")
    assert rn50.rows["craft"].accuracy["oxford_flowers"] == 92.04 and rn50.rows["bbt"].accuracy["fgvc_aircraft"] == 12.07
    # a different backbone picks that backbone's table; the default is the first with the method
    assert find("craft", "dtd", model="ViT-B-32")[0].id == "craft-vit-b-32"
    assert plan_model("craft", "ViT-B/32") == "craft-vit-b-32"  # the papers' spelling
    assert find("craft", "dtd")[0].id == "craft-rn50"
    assert find("blackvip", "svhn")[0].id == "zip-fewshot"


def plan_model(method, model):
    import tempfile
    from pathlib import Path

    root = make_coop_root(Path(tempfile.mkdtemp()) / "DATA")
    return plan(method, "dtd", root, model=model, pretrained="random").table.id


def test_a_plan_resolves_the_per_dataset_preset(tmp_path):
    root = make_coop_root(tmp_path / "DATA")
    p = plan("craft", "DescribableTextures", root)
    assert p.table.id == "craft-rn50" and p.dataset == "dtd" and [c.seed for c in p.configs] == [1, 2, 3]
    c = p.configs[0]
    assert (c.model, c.pretrained, c.shots, c.dataset) == ("RN50", "openai", 16, str(root / "dtd"))
    assert c.options == {"preset": "dtd"}
    cls = METHODS.get("craft")
    from bbpt.methods import make_config

    resolved = cls.resolve_config(make_config(cls, c.options), c.shots)
    v = {k: val for k, (val, _) in PRESETS["dtd"].values.items()}
    assert (resolved.sigma, resolved.bound, resolved.proj_std, resolved.lam, resolved.beta) == (0.02, 5, 1, 0.001, 0.001)
    assert all(getattr(resolved, k) == val for k, val in v.items())
    assert resolved.budget == 8000


def test_reproduce_runs_end_to_end_on_a_coop_tree_with_random_vit_b_16(tmp_path):
    root = make_coop_root(tmp_path / "DATA")
    cmd = [*BBPT, "reproduce", "zip", "--dataset", "EuroSAT", "--root", str(root), "--pretrained", "random",
           "--shots", "3", "--seeds", "1", "--budget", "20", "--set", "view_pool=2", "--out", str(tmp_path / "rep"),
           "--quiet"]  # a pool of 2 views: a tiny run need not encode 16 views of every image
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "zip on eurosat: bbpt " in p.stdout and "paper 64.60 (ZIP, ViT-B-16)" in p.stdout
    assert ("not comparable: another backbone or weights; 3 shots; seeds 1 (the paper's: 1,2,3); options over the "
            "paper's (budget, view_pool)") in p.stdout
    s = json.loads((tmp_path / "rep" / "reproduce.json").read_text())
    assert s["table"] == "zip-fewshot" and s["paper"]["accuracy"] == 64.6 and s["comparable"] is False
    assert s["config"]["model"] == "ViT-B-16" and s["config"]["pretrained"] == "random"
    assert s["runs"][0]["queries"]["api_calls"] == 20
    r = json.loads((tmp_path / "rep" / "seed1" / "result.json").read_text())
    assert r["status"] == "finished" and r["config"]["options"]["budget"] == 20
    # rerun: the finished seed is kept, nothing is spent again
    mtime = (tmp_path / "rep" / "seed1" / "result.json").stat().st_mtime
    p2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and (tmp_path / "rep" / "seed1" / "result.json").stat().st_mtime == mtime


@pytest.mark.parametrize("args,needle", [
    (["sharpzo", "--dataset", "dtd"], "no paper table has sharpzo on dtd"),
    (["zip", "--dataset", "pets2"], "unknown dataset 'pets2'; the papers' tables cover:"),
    (["zip", "--dataset", "dtd", "--table", "nope"], "no table 'nope'"),
    (["zip", "--dataset", "stanford_cars"], "no paper table has zip on stanford_cars"),
    (["zip", "--dataset", "oxford_pets"], "split_zhou_OxfordPets.json is missing: download"),
    (["zip", "--dataset", "svhn"], "svhn does not exist: put SVHN there with its split_mlai_SVHN.json"),
    (["zip", "--dataset", "dtd", "--model", "ViT-L/14"], "--model ViT-L-14 is not the table's backbone (ViT-B-16): pass"),
])
def test_bad_reproduce_requests_are_one_line(tmp_path, args, needle):
    root = make_coop_root(tmp_path / "DATA")
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    p = subprocess.run([*BBPT, "reproduce", *args, "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr


def test_reproduce_lists_its_tables():
    p = subprocess.run([*BBPT, "reproduce", "--list"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and all(t.id in p.stdout for t in TABLES) and "source: CraFT (Wang et al., ICML 2024)" in p.stdout


def test_craft_bbt_and_sharpzo_run_on_dtd_whose_template_has_no_words_before_the_class(tmp_path):
    """DTD's template is '{} texture.': the three start from 'a photo of a' (the official CraFT
    code's p0), so none refuses there (they did while they took the template's words)."""
    root = make_coop_root(tmp_path / "DATA")
    common = ["--root", str(root), "--pretrained", "random", "--shots", "2", "--seeds", "1", "--quiet",
              "--set", "intrinsic_dim=16", "--set", "popsize=4"]
    for method, budget in (("craft", 8), ("bbt", 8)):
        out = tmp_path / method
        p = subprocess.run([*BBPT, "reproduce", method, "--dataset", "dtd", "--model", "RN50", "--budget", str(budget),
                            *common, "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"{method} on dtd: bbpt " in p.stdout and f"({'CraFT' if method == 'craft' else 'BBT'}, RN50)" in p.stdout
        r = json.loads((out / "seed1" / "result.json").read_text())
        assert r["status"] == "finished" and r["config"]["options"]["ctx_init"] == "a photo of a"
        assert r["queries"]["prompt_evals"] == budget
    out = tmp_path / "sharpzo"
    p = subprocess.run([*BBPT, "run", "--method", "sharpzo", "--dataset", str(root / "dtd"), "--model", "RN50",
                        "--pretrained", "random", "--shots", "2", "--budget", "80", "--set", "intrinsic_dim=16",
                        "--set", "popsize=4", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "finished" and r["queries"]["prompt_evals"] == 80
