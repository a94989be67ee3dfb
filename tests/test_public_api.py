"""The Python API (``import bbpt``): the README's example runs as written, RunResult reads
every committed result.json back byte for byte, and ``import bbpt`` stays cheap."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bbpt
from bbpt.errors import BadInput
from bbpt.run_result import RunResult

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Use from Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(readme_example(), "README.md: Use from Python", "exec"), ns)
    r = ns["result"]
    assert isinstance(r, bbpt.RunResult) and r.status == "finished" and (r.method, r.dataset) == ("zip", "mnist")
    assert 0.0 <= r.accuracy.test <= 1.0 and 0.0 <= r.accuracy.val <= 1.0
    assert r.queries["api_calls"] == r.budget["api_calls"] == 200 and r.stopped_by == "budget"  # a hard stop, all spent
    assert r.eval_queries["api_calls"] > 0  # evaluation metered apart, never charged
    xs = [p.api_calls for p in r.curve]
    assert xs[0] == 0 and xs[-1] == 200 and xs == sorted(xs) and r.accuracy.val == r.curve[-1].val_accuracy
    assert r.test_subset.n == 200 and not r.test_subset.comparable_to_full_test
    stored = tmp_path / "runs/zip-mnist/result.json"
    assert stored.read_text() == r.to_json() and RunResult.load(stored.parent) == r
    assert 0.0 <= ns["inverted"]["accuracy"] <= 1.0 and ns["inverted"]["dataset"] == "mnist@inverted"
    out = capsys.readouterr().out
    assert f"test {100 * r.accuracy.test:.1f}%" in out and "200 of 200 api_calls, stopped by budget" in out

    # the same run from keyword arguments, without a folder: the same trajectory
    again = bbpt.run(method="zip", dataset="mnist", shots=4, test_subset=200, options={"budget": 200}, progress=False)
    assert again.curve == r.curve and again.accuracy == r.accuracy and again.config == r.config


def test_run_takes_a_config_a_dict_or_fields_and_refuses_in_one_line():
    with pytest.raises(BadInput, match=r"unknown run field 'budget'"):
        bbpt.run(method="zip", budget=5)
    with pytest.raises(BadInput, match=r"--shots 0 is out of range"):
        bbpt.run({"method": "zip", "shots": 0})
    with pytest.raises(BadInput, match=r"--shots 0 is out of range"):  # fields override the config's
        bbpt.run(bbpt.RunConfig(method="zip"), shots=0)
    with pytest.raises(BadInput, match=r"takes a RunConfig or a dict of run fields, not a str"):
        bbpt.run("zip")


def test_every_committed_result_json_reads_back_byte_identical():
    files = sorted((ROOT / "bench").rglob("result.json"))
    assert len(files) > 100  # the committed sweeps
    statuses = set()
    for f in files:
        r = RunResult.load(f)
        assert r.to_json() == f.read_text(), f
        statuses.add(r.status)
    assert {"finished", "failed"} <= statuses


def test_a_result_keeps_its_fields_and_order_and_reads_like_the_old_dict():
    d = {"method": "zip", "dataset": "mnist", "model": "mini", "shots": 1, "seed": 1, "status": "finished",
         "stopped_by": "key_budget", "key": {"used": {"api_calls": 3}}, "steps": 2, "black_box": True,
         "budget": {"api_calls": 10}, "queries": {"api_calls": 3}, "eval_queries": {"api_calls": 1},
         "accuracy": {"test": 0.5, "val": None}, "curve": [{"api_calls": 0, "prompt_evals": 0, "train_loss": float("nan"),
                                                           "val_accuracy": 1}], "wall_seconds": 2, "config": {},
         "newer_key": [1]}
    r = RunResult.from_dict(d)
    assert list(r.to_dict()) == list(d) and r.to_json() == json.dumps(d, indent=1) + "\n"  # ints stay ints, NaN stays
    assert r.key == {"used": {"api_calls": 3}} and r.accuracy.val is None and r.test_accuracy == 0.5
    b = r.with_fields(base_to_new={"H": 0.4})
    assert list(b.to_dict())[-2:] == ["base_to_new", "newer_key"]  # the known fields first, in their order
    assert b.base_to_new["H"] == 0.4 and r.base_to_new is None
    # the old dict reads still work for one release, each one warning
    with pytest.warns(DeprecationWarning, match=r"reading a run's result as a dict .* use its attributes \(r\.key\)"):
        assert r["accuracy"]["test"] == 0.5
    with pytest.warns(DeprecationWarning, match="use its attributes"):
        assert "test_subset" not in r and "steps" in r
    with pytest.warns(DeprecationWarning, match="use its attributes"):
        assert r.get("steps") == 2 and r.get("test_subset", "none") == "none"
    with pytest.raises(Exception):  # frozen
        r.status = "failed"


def test_import_bbpt_is_cheap_and_exports_the_api():
    code = ("import sys, bbpt; heavy = [m for m in ('torch', 'numpy', 'pydantic', 'bbpt.engine') if m in sys.modules]; "
            "print(heavy, sorted(bbpt.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['BlackBox', 'METHODS', 'RunConfig', 'RunResult', 'evaluate', 'evaluate_prompt', 'run']"
    from bbpt.engine import evaluate, run
    from bbpt.methods import METHODS
    from bbpt.models import BlackBox

    assert (bbpt.METHODS, bbpt.BlackBox, bbpt.evaluate) == (METHODS, BlackBox, evaluate) and "zip" in bbpt.METHODS.names()
    assert bbpt.run is not run and run.__module__ == "bbpt.engine"  # the engine's run takes a RunConfig only
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bbpt.nope  # noqa: B018


def test_the_backbone_cache_builds_each_backbone_once_while_keeping():
    from bbpt.models.cache import BackboneCache

    cache = BackboneCache()
    assert cache.get("mini") is not cache.get("mini") and len(cache) == 0  # off: a fresh backbone per run
    cache.keep()
    a = cache.get("mini")
    assert cache.get("mini") is a and cache.get("mini", "random") is not a and len(cache) == 2
    cache.clear(stop=True)
    assert not cache.keeping and cache.get("mini") is not a


def test_build_run_gives_a_loop_that_runs_as_run_does():
    """build_run builds the run's parts from its config; its Loop steps them as run() does."""
    from bbpt.engine import build_run, make_run_config, run
    from bbpt.loop import Loop

    cfg = make_run_config(method="zip", dataset="shapes", shots=1, seed=2, test_subset=60, eval_batch=60,
                          options={"budget": 40})
    loop = build_run(cfg, progress=False)
    assert isinstance(loop, Loop) and loop.method.__class__.name == "zip" and loop.unit == "api_calls"
    assert loop.meter.counts["api_calls"] == 0 and loop.state.steps == 0 and loop.state.every == 2  # 40 // 20
    built = loop.run()
    direct = run(cfg, progress=False)
    assert built.queries == direct.queries == {**direct.queries, "api_calls": 40}
    assert built.curve == direct.curve and built.accuracy == direct.accuracy and loop.state.stopped_by == "budget"


def test_the_suite_turns_a_dict_read_of_a_result_into_an_error():
    """pyproject's filterwarnings makes the deprecation an error in the tests, so no test (or
    code it runs) reads a RunResult as a dict again."""
    r = RunResult(method="zip", dataset="mnist", shots=1, seed=1, status="finished")
    with pytest.raises(DeprecationWarning, match="reading a run's result as a dict"):
        r["status"]
    assert r.status == "finished"
