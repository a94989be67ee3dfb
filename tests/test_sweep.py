"""`bbpt sweep` and `bbpt report`: hash-named runs, skipping, resume after kill -9, Ray, intervals."""
import json
import statistics
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbpt.errors import BadInput
from bbpt.report import build, holds, interval, markdown, report, t975
from bbpt.sweep import expand, load_sweep, sweep

BBPT = [sys.executable, "-m", "bbpt.cli"]
SPEC = """
methods = ["zip", "bbt"]
datasets = ["fashion-mnist"]
seeds = [1, 2]
[run]
test_subset = 40
eval_every = 20
[options]
budget = 60
"""


def write(tmp_path, text=SPEC, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_grid_expands_to_hash_named_folders(tmp_path):
    spec = load_sweep(write(tmp_path, SPEC + "[grid]\nview_pool = [2, 4]\n[options.bbt]\npopsize = 10\n"))
    runs = expand(spec, tmp_path / "out")
    assert len(runs) == 2 * 2 * 2  # methods x seeds x grid
    folders = [f for _, f in runs]
    assert len(set(folders)) == 8 and all(len(f.name) == 12 and f.parent.name == "fashion-mnist" for f in folders)
    bbt = [c for c, f in runs if c["method"] == "bbt"]
    assert all(c["options"]["popsize"] == 10 and c["options"]["budget"] == 60 for c in bbt)
    again = expand(spec, tmp_path / "out")
    assert [f for _, f in again] == folders  # the hash is of the configuration alone
    base = {f for _, f in expand(load_sweep(write(tmp_path)), tmp_path / "out")}
    other = {f for _, f in expand(load_sweep(write(tmp_path, SPEC.replace("budget = 60", "budget = 70"), "t.toml")),
                                  tmp_path / "out")}
    assert len(base) == len(other) == 4 and not base & other  # a changed option never reuses a folder


def test_retrained_weights_never_reuse_a_folder(tmp_path):
    """The hash holds the weights file's SHA-256: other weights under the same name, other folders."""
    from bbpt.models.backbone import WEIGHTS_DIR

    shipped = WEIGHTS_DIR / "mini.safetensors"
    w = tmp_path / "w.safetensors"

    def folders():
        text = SPEC.replace("[run]\n", f"[run]\npretrained = '{w}'\n")
        return {f for _, f in expand(load_sweep(write(tmp_path, text, "w.toml")), tmp_path / "out")}

    w.write_bytes(shipped.read_bytes())
    first = folders()
    assert folders() == first  # the same bytes: the same runs
    w.write_bytes(shipped.read_bytes()[:-1] + b"x")  # retrained in place, same path
    assert len(folders()) == len(first) and not folders() & first


@pytest.mark.parametrize("text,needle", [
    ("datasets = ['mnist']\n", "needs methods = [...]"),
    ("methods = 'zip'\ndatasets = ['mnist']\n", "methods must be a non-empty list"),
    ("methods = ['zip']\ndatasets = ['mnist']\nbudget = 3\n", "unknown key 'budget'"),
    ("methods = ['zip']\ndatasets = ['mnist']\n[grid]\nview_pool = 4\n", "grid.view_pool must be a non-empty list"),
    ("methods = ['zip'\n", "is not valid TOML"),
    ("methods = ['zip']\ndatasets = ['mnist']\nshots = [0]\n", "shots must be a non-empty list of training images "
     "per class, integers >= 1, got [0]"),
    ("methods = ['zip']\ndatasets = ['mnist']\nseeds = ['1']\n", "seeds must be a non-empty list of seeds, "
     "integers >= 0, got ['1']"),
    ("methods = ['zip']\ndatasets = ['mnist']\nrun = 3\n", "[run] must be a table"),
    ("methods = ['zip']\ndatasets = ['mnist']\nprotocol = 'cross'\n", "protocol must be 'base_to_new'"),
    ("methods = ['zip']\ndatasets = ['mnist']\nprotocol = 'base_to_new'\n[run]\nclasses = 'new'\n",
     "protocol base_to_new trains on the base classes; drop run.classes"),
    ("methods = ['zip']\ndatasets = ['mnist']\n[report]\ncompare = ['zip']\n",
     'report.compare must be a list of "A,B" method pairs'),
    ("methods = ['zip']\ndatasets = ['mnist']\n[report]\nbaselin = 'a.toml'\n",
     "unknown key report.baselin; [report] takes compare"),
])
def test_bad_sweep_files_are_one_line(tmp_path, text, needle):
    with pytest.raises(BadInput, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_sweep(write(tmp_path, text))
    p = subprocess.run([*BBPT, "sweep", str(write(tmp_path, text))], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_every_committed_sweep_file_loads():
    """bench/sweeps/*.toml against SweepSpec: each loads, with its axes filled in and its keys as written."""
    from bbpt._compat import tomllib

    files = sorted((Path(__file__).parents[1] / "bench" / "sweeps").glob("*.toml"))
    assert len(files) >= 10
    for f in files:
        spec = load_sweep(f)
        raw = tomllib.loads(f.read_text())
        assert all(spec[k] == raw.get(k, spec[k]) for k in raw) and list(spec)[:len(raw)] == list(raw), f
        assert all(isinstance(spec[a], list) and spec[a] for a in ("methods", "datasets", "shots", "seeds")), f


def test_a_rerun_skips_every_finished_run_and_spends_nothing(tmp_path):
    out = tmp_path / "out"
    s1 = sweep(load_sweep(write(tmp_path)), out, log=lambda m: None)
    assert len(s1["runs"]) == 4 and all(r["status"] == "finished" and not r.get("skipped") for r in s1["runs"])
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "sweep.json"
              and p.name != "sweep_results.json"}
    s2 = sweep(load_sweep(write(tmp_path)), out, log=lambda m: None)
    assert all(r.get("skipped") for r in s2["runs"]) and [r["test"] for r in s2["runs"]] == [r["test"] for r in s1["runs"]]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no run touched
    rep = report(out, ("bbt", "zip"))
    assert "| bbt |" in rep["markdown"] and "| bbt − zip | fashion-mnist | 1,2 |" in rep["markdown"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 1
    assert (out / "curve_fashion-mnist.png").read_bytes().startswith(b"\x89PNG")  # the same plot as a file
    # a sweep file as the report's root: exactly its grid's runs (not a stray run beside them),
    # rows in the file's order, its [report] compare, and how many of its runs are finished
    _fake_run(out, "zeroshot", "fashion-mnist", 1, 0.5, [(0, 0.5)])
    f = write(tmp_path, f"out = '{out}'\n" + SPEC + '[report]\ncompare = ["zip,bbt"]\n', name="f.toml")
    md = report(f, out=tmp_path / "rep")["markdown"]
    assert "(4 of the sweep's 4 runs finished)" in md and "zeroshot" not in md
    assert md.index("| zip |") < md.index("| bbt |") and "| zip − bbt | fashion-mnist | 1,2 |" in md
    assert "| zeroshot |" in report(out, out=tmp_path / "rep2")["markdown"]  # a folder: every run under it


def test_an_unfinished_record_without_its_checkpoint_is_run_afresh(tmp_path):
    """A clone carries only each run's committed result.json: one that says "interrupted" has no
    run.json or checkpoint beside it, so the sweep starts that run over (the same result)."""
    spec = load_sweep(write(tmp_path, SPEC.replace('["zip", "bbt"]', '["zip"]').replace("seeds = [1, 2]", "seeds = [1]")))
    out = tmp_path / "out"
    first = sweep(spec, out, log=lambda m: None)["runs"][0]
    folder = Path(first["folder"])
    rec = json.loads((folder / "result.json").read_text())
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # tb/: the run's TensorBoard events
    (folder / "result.json").write_text(json.dumps({**rec, "status": "interrupted"}))
    again = sweep(spec, out, log=lambda m: None)["runs"][0]
    assert again["status"] == "finished" and not again.get("skipped") and again["test"] == first["test"]
    assert (folder / "run.json").is_file()


def test_bbpt_errors_survive_pickling_whatever_their_init_takes():
    """A worker's error crosses a process boundary by pickle; BudgetExhausted's three-argument
    __init__ once broke the whole pool on the way back (BrokenProcessPool)."""
    import pickle

    from bbpt.errors import BudgetExhausted, UnknownName

    e = BudgetExhausted({"api_calls": 0, "prompt_evals": 0}, {"api_calls": 5000, "prompt_evals": None},
                        {"api_calls": 5120, "prompt_evals": 1024})
    u = UnknownName("dataset", "mnsit", ["mnist", "shapes"])
    for x in (e, u):
        y = pickle.loads(pickle.dumps(x))
        assert type(y) is type(x) and str(y) == str(x) and y.__dict__ == x.__dict__


def test_a_run_whose_first_step_does_not_fit_is_recorded_as_failed_and_the_pool_goes_on(tmp_path):
    """SharpZO's first step (a CGE of 2 x 512 whole-set candidates) needs 1024 prompt_evals: at
    60 it is refused, uncharged. The refusal comes back from a pool worker as the run's outcome,
    the other runs finish, the sweep exits 1 naming it, and a rerun retries only it."""
    f = write(tmp_path, SPEC.replace('["zip", "bbt"]', '["zip", "sharpzo"]').replace("seeds = [1, 2]", "seeds = [1]"))
    out = tmp_path / "out"
    cmd = BBPT + ["sweep", str(f), "--out", str(out), "--workers", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "1 failed" in p.stdout and "failed: 1 run(s) could not run" in p.stderr and "BudgetExhausted" in p.stderr
    zip_run, = (out / "zip").rglob("result.json")
    sz, = (out / "sharpzo").rglob("result.json")
    assert json.loads(zip_run.read_text())["status"] == "finished"
    rec = json.loads(sz.read_text())
    assert rec["status"] == "failed" and "prompt_evals=1024" in rec["error"] and rec["seed"] == 1
    assert rec["config"]["options"]["budget"] == 60  # resolved options, as a finished run stores them
    md = report(out, out=tmp_path / "rep")["markdown"]  # the report says which cell failed, and why
    assert "| sharpzo | failed | - |" in md and "| zip | " in md
    assert f"- sharpzo on fashion-mnist, seed 1: {rec['error']}" in md
    p2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 1 and "1 already finished, 1 failed" in p2.stdout and "no run.json" not in p2.stderr


def _killed_then_resumed(tmp_path, extra: list[str], ctrl_c: bool = False):
    """Start `bbpt sweep`; once a run has checkpointed, kill -9 its whole process group (or,
    ``ctrl_c``, send its process one SIGINT and check the stop); rerun."""
    spec = write(tmp_path, SPEC.replace("budget = 60", "budget = 400"))
    out = tmp_path / "out"
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        p = subprocess.Popen([*BBPT, "sweep", str(spec), "--out", str(out), *extra], stdout=subprocess.DEVNULL,
                             stderr=f, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.rglob("checkpoint.safetensors")):
            time.sleep(0.2)
        assert list(out.rglob("checkpoint.safetensors")), "no run checkpointed in time"
        if ctrl_c:
            os.kill(p.pid, signal.SIGINT)
            assert p.wait(timeout=180) == 130, err.read_text()[-2000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    if ctrl_c:  # every running run checkpointed and said so; the queued ones never started
        last = err.read_text().strip().splitlines()[-1]
        assert last.startswith("interrupted (SIGINT): ") and f"resume with: bbpt sweep {spec}" in last, last
        runs = json.loads((out / "sweep_results.json").read_text())["runs"]
        assert {r["status"] for r in runs} <= {"finished", "interrupted", "not started"}
        assert sum(r["status"] != "finished" for r in runs) >= 2 and any(r["status"] == "interrupted" for r in runs)
        assert all(not Path(r["folder"]).exists() for r in runs if r["status"] == "not started")
        for r in runs:
            if r["status"] == "interrupted":
                assert json.loads((Path(r["folder"]) / "result.json").read_text())["status"] == "interrupted"
                with pytest.raises(ProcessLookupError):  # the worker is gone with the sweep
                    os.kill(r["pid"], 0)
    unfinished = [f.parent for f in out.rglob("checkpoint.safetensors")]
    assert unfinished
    r = subprocess.run([*BBPT, "sweep", str(spec), "--out", str(out), *extra], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads((out / "sweep_results.json").read_text())["runs"]
    assert len(done) == 4 and all(x["status"] == "finished" for x in done)
    # every run equals the same run made without interruption
    ref = sweep(load_sweep(spec), tmp_path / "ref", log=lambda m: None)
    by_name = {Path(x["folder"]).name: x["test"] for x in ref["runs"]}
    assert {Path(x["folder"]).name: x["test"] for x in done} == by_name
    for f in unfinished:
        a = (f / "prompt.safetensors").read_bytes()
        b = (tmp_path / "ref" / f.relative_to(out) / "prompt.safetensors").read_bytes()
        assert a == b
    return done


def test_a_sweep_killed_with_kill_9_restarts_where_it_stopped(tmp_path):
    _killed_then_resumed(tmp_path, ["--workers", "2"])


def test_ctrl_c_stops_a_pool_sweep_after_each_runs_current_step_and_a_rerun_resumes(tmp_path):
    _killed_then_resumed(tmp_path, ["--workers", "2"], ctrl_c=True)


def test_a_ray_sweep_runs_the_same_grid_and_resumes_after_its_driver_is_killed(tmp_path):
    """A local Ray instance (2 CPUs) started by the sweep itself; the driver and Ray's own
    processes are killed together, then the sweep is rerun on a fresh instance."""
    pytest.importorskip("ray")
    done = _killed_then_resumed(tmp_path, ["--ray", "local", "--ray-cpus", "2"])
    assert len({x["pid"] for x in done if x.get("pid")}) >= 1


def test_intervals_are_students_t():
    assert t975(1) == 12.706 and t975(4) == 2.776 and t975(100) == 1.96
    iv = interval([60.0, 62.0, 64.0])
    assert iv["mean"] == 62.0 and iv["std"] == 2.0
    assert iv["ci95"] == pytest.approx([62 - 4.303 * 2 / 3**0.5, 62 + 4.303 * 2 / 3**0.5])
    assert interval([5.0])["ci95"] is None


def _fake_run(root: Path, method: str, dataset: str, seed: int, test: float, curve: list[tuple[int, float]],
              b2n: tuple[float, float] | None = None) -> None:
    """A finished run's result.json as the engine writes it (the fields a report reads)."""
    r = {"method": method, "dataset": dataset, "shots": 16, "seed": seed, "status": "finished",
         "accuracy": {"test": test, "val": curve[-1][1]}, "queries": {"api_calls": curve[-1][0]},
         "curve": [{"api_calls": x, "val_accuracy": y} for x, y in curve], "config": {"options": {"budget": 9}}}
    if b2n:
        from bbpt.protocols import harmonic_mean

        r["base_to_new"] = {"base": b2n[0], "new": b2n[1], "H": harmonic_mean(*b2n)}
    d = root / method / dataset / f"s{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(r))


def test_report_pairs_averages_and_queries_to_reach(tmp_path):
    """Paired differences per dataset and on average over seeds, '*' pairs, and where A's mean
    validation curve first reaches B's final one, against hand computation."""
    acc = {("a", "d1"): [0.70, 0.72, 0.74], ("b", "d1"): [0.60, 0.66, 0.66],
           ("a", "d2"): [0.50, 0.50, 0.56], ("b", "d2"): [0.52, 0.54, 0.50], ("z", "d1"): [0.5] * 3, ("z", "d2"): [0.4] * 3}
    curves = {"a": [(100, 0.3), (200, 0.6), (300, 0.8)], "b": [(500, 0.5), (1000, 0.6)], "z": [(0, 0.1)]}
    for (m, d), xs in acc.items():
        for seed, x in enumerate(xs, 1):
            _fake_run(tmp_path, m, d, seed, x, curves[m])
    rep = build(tmp_path, [("a", "b"), ("*", "z")])
    assert [(p["a"], p["b"]) for p in rep["paired"]] == [("a", "b"), ("a", "z"), ("b", "z")]
    ab = rep["paired"][0]
    d1 = next(q for q in ab["datasets"] if q["dataset"] == "d1")
    assert d1["diff"]["mean"] == pytest.approx(8.0)
    assert d1["diff"]["ci95"] == pytest.approx(list(interval([10.0, 6.0, 8.0])["ci95"]))
    assert ab["average"]["diff"]["mean"] == pytest.approx(statistics.mean([(10 - 2) / 2, (6 - 4) / 2, (8 + 6) / 2]))
    assert d1["reach"] == {"at": 200, "b_spent": 1000, "target": pytest.approx(60.0)}  # a reaches 60 % at 200 calls
    assert holds(interval([8.0, 4.0, 8.0])) == "yes" and holds(interval([-1.0, 1.0])) == "unclear"
    md = markdown(rep)
    assert "| a − b | d1 | 1,2,3 |" in md and "| yes | 200 (1000) |" in md and "| a − b | average | 1,2,3 |" in md
    assert "| a | 72.0 ± 2.0" in md and "| 62.0 |" in md  # the average column: (72 + 52) / 2 for a


def test_report_against_a_baseline_sweep_pairs_each_run_with_its_twin(tmp_path):
    """[report] baseline: each method x task against the same method, task and seeds in another
    sweep (e.g. the same grid without training views), against hand computation."""
    from bbpt.report import against

    now = {("a", "d1"): [0.70, 0.74], ("a", "d2"): [0.50, 0.60], ("b", "d1"): [0.8, 0.8]}
    was = {("a", "d1"): [0.60, 0.70, 0.9], ("a", "d2"): [0.55, 0.55], ("z", "d1"): [0.5, 0.5]}
    for root, acc in (("now", now), ("was", was)):
        for (m, d), xs in acc.items():
            for seed, x in enumerate(xs, 1):
                _fake_run(tmp_path / root, m, d, seed, x, [(10, x)])
    rep = build(tmp_path / "now")
    a = against(rep, build(tmp_path / "was"), "was")
    row, = [r for r in a["rows"] if r["label"] == "a"]
    assert row["datasets"]["d1"]["seeds"] == [1, 2] and row["datasets"]["d1"]["diff"]["mean"] == pytest.approx(7.0)
    assert row["datasets"]["d1"]["baseline"] == pytest.approx(65.0)  # seed 3 of the baseline has no twin
    assert row["average"]["diff"]["mean"] == pytest.approx(statistics.mean([(10 - 5) / 2, (4 + 5) / 2]))
    assert [r["label"] for r in a["rows"]] == ["a"]  # b has no twin in the baseline
    rep["against"] = a
    md = markdown(rep)
    assert "Against was" in md and "| a | 65.0 → 72.0 (+7.0 [" in md
    with pytest.raises(BadInput, match="report.baseline must be another sweep file"):
        load_sweep(write(tmp_path, SPEC + "[report]\nbaseline = 3\n", "b.toml"))


def test_report_base_to_new_pairs_on_h(tmp_path):
    for seed in (1, 2):
        _fake_run(tmp_path, "a", "d", seed, 0.9, [(10, 0.9)], b2n=(0.9, 0.6 + 0.1 * seed))
        _fake_run(tmp_path, "b", "d", seed, 0.8, [(10, 0.8)], b2n=(0.8, 0.6))
    rep = build(tmp_path, [("a", "b")])
    assert rep["metric"] == "H"
    from bbpt.protocols import harmonic_mean

    want = [100 * (harmonic_mean(0.9, 0.6 + 0.1 * s) - harmonic_mean(0.8, 0.6)) for s in (1, 2)]
    assert rep["paired"][0]["datasets"][0]["diff"]["mean"] == pytest.approx(statistics.mean(want))
    assert "Base-to-new: base / new / H" in markdown(rep)


def test_a_base_to_new_sweep_equals_the_protocol(tmp_path):
    """protocol = "base_to_new": trained on the base half, the new half tested after, H in
    result.json, and the same numbers as `bbpt protocol base-to-new` gives."""
    from bbpt.protocols import base_to_new

    spec = write(tmp_path, 'protocol = "base_to_new"\n'
                 + SPEC.replace('methods = ["zip", "bbt"]', 'methods = ["zip"]').replace("seeds = [1, 2]", "seeds = [1]"))
    s = sweep(load_sweep(spec), tmp_path / "out", log=lambda m: None)
    r = json.loads((Path(s["runs"][0]["folder"]) / "result.json").read_text())
    assert r["config"]["classes"] == "base" and set(r["base_to_new"]) == {"base", "new", "H", "targets"}
    ref = base_to_new("zip", "fashion-mnist", seeds=(1,), options={"budget": 60}, out=tmp_path / "ref", progress=False,
                      test_subset=40, eval_every=20)
    assert r["base_to_new"]["new"] == ref["rows"][0]["new"] and r["base_to_new"]["H"] == ref["rows"][0]["H"]
    again = sweep(load_sweep(spec), tmp_path / "out", log=lambda m: None)
    assert again["runs"][0].get("skipped")
    assert "Base-to-new" in report(tmp_path / "out")["markdown"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "bench" / "sweeps").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_the_repos_sweep_files_expand(path, monkeypatch):
    """Every sweep file behind a README table loads and expands, its runs under bench/results."""
    monkeypatch.chdir(path.parent.parent.parent)  # paths in the files are relative to the repository
    spec = load_sweep(path)
    runs = expand(spec, spec["out"])
    assert spec["out"].startswith("bench/results/sweeps/") and len(runs) == len({f for _, f in runs}) > 0
    assert len(runs) == len(spec["methods"]) * len(spec["datasets"]) * len(spec["shots"]) * len(spec["seeds"])


def test_a_sweep_files_order_holds_for_renamed_tasks_and_an_unswept_file_is_one_line(tmp_path):
    """Columns follow the file's datasets even where a run records another task name
    (classes = "base" records mnist-base); a sweep file not yet swept is a one-line error."""
    for d in ("zz", "aa"):
        _fake_run(tmp_path, "m", d + "-base", 1, 0.5, [(10, 0.5)])
        f = next((tmp_path / "m" / (d + "-base")).glob("*/result.json"))
        r = json.loads(f.read_text())
        r["config"]["dataset"] = d
        f.write_text(json.dumps(r))
    assert build(tmp_path, datasets=["zz", "aa"])["datasets"] == ["zz-base", "aa-base"]
    assert build(tmp_path)["datasets"] == ["aa-base", "zz-base"]
    f = write(tmp_path, f"out = '{tmp_path / 'never'}'\n" + SPEC, name="n.toml")
    with pytest.raises(BadInput, match=r"does not exist; run `bbpt sweep .*n\.toml` first"):
        report(f)


def test_a_methods_revision_renames_only_its_runs(tmp_path, monkeypatch):
    """A fidelity fix in a method's code bumps its ``revision``: its runs get new folders (a sweep
    runs them again), every other method's keep theirs (their finished results stay valid)."""
    from bbpt.methods import METHODS

    spec = {"methods": ["zip", "bar"], "datasets": ["shapes"], "shots": [1], "seeds": [1]}
    before = {Path(f).parent.parent.name: Path(f).name for _, f in expand(spec, tmp_path)}
    monkeypatch.setattr(METHODS.get("bar"), "revision", METHODS.get("bar").revision + 1)
    after = {Path(f).parent.parent.name: Path(f).name for _, f in expand(spec, tmp_path)}
    assert after["zip"] == before["zip"] and after["bar"] != before["bar"]


def test_report_on_test_subset_runs_says_they_are_not_comparable(tmp_path):
    for seed in (1, 2):
        _fake_run(tmp_path, "a", "d1", seed, 0.7, [(10, 0.7)])
    md = markdown(build(tmp_path))
    assert md.startswith("Test accuracy (%)") and "Not comparable" not in md  # full-test runs: no note
    f = tmp_path / "a" / "d1" / "s2" / "result.json"
    r = json.loads(f.read_text())
    r["test_subset"] = {"n": 300, "of": 10000, "seed": 0, "comparable_to_full_test": False}
    f.write_text(json.dumps(r))
    rep = build(tmp_path)
    assert rep["test_subset"] == [300] and rep["test_subset_runs"] == 1
    md = markdown(rep)
    assert md.startswith("**Not comparable to full-test numbers**: 1 of these 2 runs were evaluated on a seeded, "
                         "stratified subset of the test split (--test-subset 300 images)")
    assert "Test-subset accuracy (%), mean ± std" in md and "\nTest accuracy" not in md
