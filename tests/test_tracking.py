"""Logging and tracking: TensorBoard event files in every run folder (curve, config as hparams,
final accuracy), ``--logger wandb`` offline, trackers outside the run's identity, resumes that
log no point twice, and the CLI's ``--log-level`` / ``-v``."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbpt import cli
from bbpt.engine import RunInterrupted, identity, make_run_config, run
from bbpt.errors import BadInput
from bbpt.runfolder import RunFolder
from bbpt.sweep import expand, load_sweep

pytest.importorskip("tensorboard", reason="reading event files back needs the tensorboard package")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

REPO = Path(__file__).parent.parent


def tiny(**kw):
    """A zip run of a few curve points that costs seconds."""
    return make_run_config(**{"method": "zip", "dataset": "shapes", "shots": 1, "seed": 2, "test_subset": 60,
                              "eval_batch": 100, "eval_every": 20, "options": {"budget": 60}, **kw})


def events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def scalars(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    return out, run(tiny(), out=out, progress=False)


def test_a_run_writes_its_curve_config_and_accuracy_as_tensorboard_events(finished):
    out, r = finished
    ea = events(out)
    unit = next(k for k, v in r.budget.items() if v is not None)  # the budget's unit: the curve's x axis
    steps = [getattr(p, unit) for p in r.curve]
    assert len(steps) >= 3 and steps == sorted(set(steps))
    assert scalars(ea, "curve/val_accuracy") == [(getattr(p, unit), pytest.approx(p.val_accuracy)) for p in r.curve]
    assert scalars(ea, "curve/train_loss") == [(getattr(p, unit), pytest.approx(p.train_loss, rel=1e-6)) for p in r.curve]
    assert scalars(ea, "curve/api_calls") == [(getattr(p, unit), p.api_calls) for p in r.curve]
    assert [s for s, _ in scalars(ea, "curve/val_loss")] == steps
    end = r.queries[unit]
    assert scalars(ea, "final/test_accuracy") == [(end, pytest.approx(r.accuracy.test))]
    assert scalars(ea, "hparams/test_accuracy") == [(end, pytest.approx(r.accuracy.test))]
    # the configuration as the HParams plugin reads it: run fields and resolved method options
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hp["method"] == "zip" and hp["dataset"] == "shapes" and hp["seed"] == 2 and hp["test_subset"] == 60
    assert hp["options.budget"] == 60 and hp["options.rank"] == r.config["options"]["rank"]
    assert hp["pretrained"] == "none"  # None, which hparams cannot hold, as a string
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hparams/test_accuracy"]


def test_loggers_are_not_part_of_the_runs_identity(tmp_path, monkeypatch):
    plain, both = tiny(), tiny(loggers=["tensorboard", "wandb"])
    assert identity(plain) == identity(both) and "loggers" not in plain.model_dump()
    # stored sweeps keep their run hashes (their folders hold the committed result.json)
    monkeypatch.chdir(REPO)
    spec = load_sweep(REPO / "bench" / "sweeps" / "seed_methods.toml")
    folders = [f for _, f in expand(spec, spec["out"])]
    assert all((f / "result.json").is_file() for f in folders)
    spec["run"] = {**spec.get("run", {}), "loggers": ["none"]}
    again = expand(spec, spec["out"])
    assert [f for _, f in again] == folders and all(c["loggers"] == ["none"] for c, _ in again)  # workers get them
    # a folder with trackers' outputs resumes under other loggers
    folder = RunFolder(tmp_path / "r")
    folder.start({**identity(plain), "options": {}})
    (folder.path / "tb").mkdir()
    (folder.path / "wandb").mkdir()
    assert RunFolder(folder.path).check({**identity(both), "options": {}}) == "resume"


def test_unknown_or_contradictory_loggers_are_one_line():
    with pytest.raises(BadInput, match=r"--loggers \['nope'\] is invalid: --logger 'nope' is not a tracker; use "
                                       r"tensorboard, wandb, none"):
        tiny(loggers=["nope"])
    with pytest.raises(BadInput, match="--logger none turns tracking off; do not combine it with wandb"):
        tiny(loggers=["none", "wandb"])


def test_a_resumed_run_logs_no_point_twice(tmp_path):
    out = tmp_path / "r"
    hook = lambda steps, stats: os.kill(os.getpid(), signal.SIGINT) if steps == 2 else None  # noqa: E731
    with pytest.raises(RunInterrupted):
        run(tiny(), out=out, progress=False, on_step=hook)
    half = json.loads((out / "result.json").read_text())
    unit = next(k for k, v in half["budget"].items() if v is not None)
    ckpt_step = half["curve"][-1][unit]
    # what a process killed after its last checkpoint leaves: a point the checkpoint does not hold
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out / "tb"), filename_suffix=f".{time.time_ns()}") as w:  # before the resume, as a kill is
        w.add_scalar("curve/val_accuracy", 9.0, ckpt_step + 1)
    r = run(tiny(loggers=["tensorboard"]), out=out, progress=False)
    assert r.status == "finished" and len(list((out / "tb").iterdir())) == 3  # one event file per session (+ the kill's)
    ea = events(out)
    got = scalars(ea, "curve/val_accuracy")
    assert got == [(getattr(p, unit), pytest.approx(p.val_accuracy)) for p in r.curve]  # once each, the killed point gone
    assert [s for s, _ in scalars(ea, "final/test_accuracy")] == [r.queries[unit]]


def test_a_method_without_a_budget_logs_its_curve_against_steps(tmp_path):
    r = run(tiny(method="tipadapter", options={}), out=tmp_path / "r", progress=False)
    assert r.budget["api_calls"] is None
    got = scalars(events(tmp_path / "r"), "curve/val_accuracy")
    assert [v for _, v in got] == [pytest.approx(p.val_accuracy) for p in r.curve]
    assert [s for s, _ in got] == sorted({s for s, _ in got})  # one point per step, in order
    assert [s for s, _ in scalars(events(tmp_path / "r"), "final/test_accuracy")] == [r.steps]


def test_loggers_none_writes_no_events_and_a_finished_run_needs_no_tracker(tmp_path):
    r = run(tiny(loggers=["none"], options={"budget": 20}), out=tmp_path / "r", progress=False)
    assert r.status == "finished" and not (tmp_path / "r" / "tb").exists() and "loggers" not in r.config


def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="--logger wandb needs wandb (pip install 'bbpt[trackers]')")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    r = run(tiny(loggers=["wandb"], options={"budget": 20}), out=tmp_path / "r", progress=False)
    assert r.status == "finished" and not (tmp_path / "r" / "tb").exists()
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data, = runs[0].glob("run-*.wandb")
    assert data.stat().st_size > 0
    blob = data.read_bytes()  # the records are protobuf: the logged keys and config appear verbatim
    assert b"curve/val_accuracy" in blob and b"final/test_accuracy" in blob and b"options.budget" in blob
    assert os.environ.get("WANDB_MODE") is None  # set for wandb.init only


def test_wandb_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(BadInput, match=r"^--logger wandb needs the wandb package: pip install 'bbpt\[trackers\]'$"):
        run(tiny(loggers=["wandb"]), out=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # refused before any query: the folder is as it was


def cli_main(args, capsys):
    old = sys.argv
    sys.argv = ["bbpt", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_log_level_and_verbose_set_what_reaches_stderr(capsys):
    note = logging.getLogger("bbpt.engine")
    try:
        code, out, err = cli_main(["datasets"], capsys)  # default INFO: notices as bare lines
        assert code == 0 and not err
        note.info("resuming x")
        note.debug("hidden")
        note.warning("careful")
        assert capsys.readouterr().err == "resuming x\nwarning: careful\n"
        cli_main(["--log-level", "warning", "datasets"], capsys)
        note.info("resuming x")
        note.error("broken")
        assert capsys.readouterr().err == "error: broken\n"
        cli_main(["-v", "datasets"], capsys)
        note.debug("details")
        assert capsys.readouterr().err == "debug [bbpt.engine]: details\n"
        assert len(logging.getLogger("bbpt").handlers) == 2  # the NullHandler and one CLI handler, not one per call
        code, _, err = cli_main(["--log-level", "LOUD", "datasets"], capsys)
        assert code == 2 and err == "error: --log-level 'LOUD': use one of DEBUG, INFO, WARNING, ERROR\n"
    finally:
        cli.configure_logging("INFO")


def test_cli_resume_notice_is_one_line_on_stderr_unless_the_level_hides_it(tmp_path, capsys):
    args = ["run", "--method", "zeroshot", "--dataset", "shapes", "--shots", "1", "--test-subset", "30", "--quiet"]
    cfg = make_run_config(method="zeroshot", dataset="shapes", shots=1, test_subset=30)
    from bbpt.methods import METHODS, make_config

    cls = METHODS.get("zeroshot")
    config = {**identity(cfg), "options": cls.resolve_config(make_config(cls, {}), 1).model_dump()}
    for name in ("a", "b"):
        f = RunFolder(tmp_path / name)
        f.start(config)  # an unfinished run that wrote no checkpoint yet
        f.unlock()
    code, out, err = cli_main([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and err.splitlines() == [f"resuming {tmp_path / 'a'}: no checkpoint was written yet, starting "
                                              "the run from step 0"], err
    assert out.startswith("zeroshot on shapes")
    code, out, err = cli_main(["--log-level", "WARNING", *args, "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and err == "" and out.startswith("zeroshot on shapes")
    cli.configure_logging("INFO")


def test_importing_bbpt_configures_no_logging():
    code = ("import logging, bbpt.engine, bbpt.cli; r = logging.getLogger(); b = logging.getLogger('bbpt'); "
            "print(len(r.handlers), [type(h).__name__ for h in b.handlers], b.level)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "['NullHandler']", "0"]
