"""Runs that survive: exact resume for every registered method, signals, run-folder semantics.

The conformance table runs every method bbpt ships (``METHODS.names()``, not a hand-kept
list) through the same checks: interrupted by a real SIGINT at a random step, by a SIGINT
at a random query (inside a step, at a curve point or during the test split), and crashed at
a random query (the process state lost, as with kill -9), each resumed; each ends with a
prompt file byte-identical to the uninterrupted run's and a result.json equal apart from
wall time, query counts included.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from method_cases import shipped

from bbpt.engine import RunInterrupted, make_run_config, run
from bbpt.errors import BadInput, BudgetExhausted
from bbpt.methods import METHODS
from bbpt.models.meter import QueryMeter

SHIPPED = shipped()
# smaller searches where a method has these options (by field name, so new methods need no entry)
# (and the paths that carry the most state: SharpZO's stage 2, CraFT's re-asked bias)
SMALL = {"intrinsic_dim": 16, "dim_text": 16, "dim_visual": 16, "popsize": 4, "epochs": 6, "n_perturb": 2, "q": 2,
         "sample_size": 4,
         "change_point": 2, "bias": "reask"}


def config(name, **kw):
    fields = METHODS.get(name).Config.model_fields
    opts = {k: v for k, v in SMALL.items() if k in fields}
    kw = {"max_steps": 5, "eval_batch": 100, **kw}  # curve points only at the start and the end: resumes replay steps
    return make_run_config(method=name, dataset="shapes", shots=1, seed=3, test_subset=300, options=opts, **kw)


def outputs(folder):
    r = json.loads((folder / "result.json").read_text())
    r.pop("wall_seconds")
    return r, (folder / "prompt.safetensors").read_bytes()


class Crash(Exception):
    """The process dies here: nothing after this point reaches the disk."""


ORIG_CHARGES = {"charge": QueryMeter.charge, "charge_cost": QueryMeter.charge_cost}


def on_charge(monkeypatch, before) -> None:
    """Call ``before()`` ahead of every charge on any meter: queries (``charge``) and
    embedding requests (``charge_cost``); ``before=None`` restores the meter."""
    for attr, orig in ORIG_CHARGES.items():
        if before is None:
            monkeypatch.setattr(QueryMeter, attr, orig)
        else:
            monkeypatch.setattr(QueryMeter, attr, lambda self, *a, _orig=orig: (before(), _orig(self, *a))[1])


@pytest.mark.parametrize("name", SHIPPED)
def test_resume_is_exact(name, tmp_path, monkeypatch):
    cfg = config(name)
    charges = []
    on_charge(monkeypatch, lambda: charges.append(1))
    ref = run(cfg, out=tmp_path / "ref", progress=False)
    n_charges = len(charges)
    want, want_prompt = outputs(tmp_path / "ref")
    assert ref.status == "finished" and not (tmp_path / "ref" / "checkpoint.safetensors").exists()
    rng = random.Random(name)

    # 1. a real SIGINT at a random step: checkpoint, result.json "interrupted", then resume
    if ref.steps >= 2:
        k = rng.randint(1, ref.steps - 1)
        hook = lambda steps, stats: os.kill(os.getpid(), signal.SIGINT) if steps == k else None  # noqa: E731
        with pytest.raises(RunInterrupted) as e:
            run(cfg, out=tmp_path / "int", progress=False, on_step=hook)
        assert e.value.exit_code == 130
        half = json.loads((tmp_path / "int" / "result.json").read_text())
        assert half["status"] == "interrupted" and half["steps"] == k and half["accuracy"]["test"] is None
        assert (tmp_path / "int" / "checkpoint.safetensors").exists() and (tmp_path / "int" / "prompt.safetensors").exists()
        notes = []
        run(cfg, out=tmp_path / "int", progress=False, log=notes.append)
        assert notes and notes[0].startswith("resuming ") and f"at step {k}" in notes[0]
        assert outputs(tmp_path / "int") == (want, want_prompt)

    # 2. a real SIGINT at a random query: the step finishes (or the test split stops), then resume
    j = rng.randint(1, n_charges)
    seen = []

    def interrupting():
        seen.append(1)
        if len(seen) == j:
            os.kill(os.getpid(), signal.SIGINT)

    on_charge(monkeypatch, interrupting)
    try:
        run(cfg, out=tmp_path / "q", progress=False)
        assert j > n_charges - 2  # only a signal in the last test batch lets the run finish
    except RunInterrupted:
        on_charge(monkeypatch, None)
        run(cfg, out=tmp_path / "q", progress=False, log=lambda m: None)
    on_charge(monkeypatch, None)
    assert outputs(tmp_path / "q") == (want, want_prompt), (name, j, n_charges)

    # 3. a crash at a random query (any meter: training, side or evaluation), then resume
    j = rng.randint(1, n_charges)
    seen.clear()

    def crashing():
        seen.append(1)
        if len(seen) == j:
            raise Crash

    on_charge(monkeypatch, crashing)
    with pytest.raises(Crash):
        run(cfg, out=tmp_path / "crash", progress=False)
    on_charge(monkeypatch, None)
    assert not (tmp_path / "crash" / "result.json").exists()
    run(cfg, out=tmp_path / "crash", progress=False, log=lambda m: None)
    assert outputs(tmp_path / "crash") == (want, want_prompt), (name, j, n_charges)


def test_interrupt_during_the_test_split_resumes_exactly(tmp_path, monkeypatch):
    """Stopped inside the test split: no checkpoint then (the one before it is current), so the
    resumed run's evaluation counts equal an uninterrupted run's."""
    cfg = config("zeroshot", eval_batch=50)
    want = run(cfg, out=tmp_path / "ref", progress=False)
    orig, seen = QueryMeter.charge, []

    def interrupting(self, *a):
        seen.append(1)
        if len(seen) == 3:  # train loss, val, then the first test batch
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self, *a)

    monkeypatch.setattr(QueryMeter, "charge", interrupting)
    with pytest.raises(RunInterrupted):
        run(cfg, out=tmp_path / "t", progress=False)
    monkeypatch.setattr(QueryMeter, "charge", orig)
    got = run(cfg, out=tmp_path / "t", progress=False, log=lambda m: None)
    assert got.eval_queries == want.eval_queries and got.accuracy == want.accuracy


def test_checkpoint_every_60_s_between_curve_points(tmp_path, monkeypatch):
    import bbpt.loop as loop

    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)  # every step
    saved = []
    from bbpt.runfolder import RunFolder

    orig = RunFolder.save_checkpoint
    monkeypatch.setattr(RunFolder, "save_checkpoint", lambda self, s: (saved.append(s["loop"]["steps"]), orig(self, s))[1])
    cfg = make_run_config(method="zip", dataset="shapes", shots=1, seed=1, max_steps=4, test_subset=100,
                          options={"budget": 400})  # curve points every 20 api_calls = 2 steps
    run(cfg, out=tmp_path / "t", progress=False)
    assert saved[:5] == [0, 1, 2, 3, 4]


# ---- run folder semantics ------------------------------------------------------------------
def quick(**kw):
    return make_run_config(**{"method": "zip", "dataset": "shapes", "shots": 1, "seed": 1, "test_subset": 100,
                              "options": {"budget": 40}, **kw})


def test_rerun_refuses_a_finished_run_and_force_replaces_it(tmp_path):
    out = tmp_path / "r"
    run(quick(), out=out, progress=False)
    assert (out / "curve.png").exists()
    with pytest.raises(BadInput, match=r"holds a finished run \(zip on shapes, seed 1, test .*%\); pass --force"):
        run(quick(), out=out, progress=False)
    r = run(quick(method="zeroshot", options={}), out=out, progress=False, force=True)
    assert r.method == "zeroshot"
    assert not (out / "curve.png").exists()  # one curve point: no plot, and the old run's plot is gone
    assert sorted(p.name for p in out.iterdir()) == ["curve.csv", "prompt.safetensors", "result.json", "run.json", "tb"]
    assert len(list((out / "tb").iterdir())) == 1  # the replaced run's event files went with it


def test_unfinished_run_with_another_config_is_refused_naming_the_fields(tmp_path):
    out = tmp_path / "r"
    hook = lambda steps, stats: os.kill(os.getpid(), signal.SIGINT) if steps == 1 else None  # noqa: E731
    with pytest.raises(RunInterrupted):
        run(quick(), out=out, progress=False, on_step=hook)
    with pytest.raises(BadInput) as e:
        run(quick(seed=2, options={"budget": 80}), out=out, progress=False)
    msg = str(e.value)
    assert "another configuration" in msg and "seed: 1 -> 2" in msg and "options.budget: 40 -> 80" in msg
    assert "\n" not in msg
    r = run(quick(seed=2, options={"budget": 80}), out=out, progress=False, force=True)
    assert r.seed == 2 and r.status == "finished"


def test_foreign_files_are_never_removed(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(BadInput, match=r"holds files bbpt did not write \(notes.txt\)"):
            run(quick(), out=out, progress=False, force=force)
    assert (out / "notes.txt").read_text() == "mine"


def test_failed_start_leaves_nothing_and_a_corrected_rerun_starts(tmp_path):
    out = tmp_path / "new" / "r"  # two folders the run creates
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        run(quick(options={"budget": 5}), out=out, progress=False)  # one ZIP step costs 10
    assert not (tmp_path / "new").exists()  # neither folder is left behind
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(BudgetExhausted):
        run(quick(options={"budget": 5}), out=kept, progress=False)
    assert kept.is_dir() and not any(kept.iterdir())  # a folder the user made stays, empty
    assert run(quick(), out=out, progress=False).status == "finished"


@pytest.mark.parametrize("force", [False, True])
def test_a_run_that_finished_in_a_new_folder_while_another_loaded_is_kept(tmp_path, monkeypatch, force):
    """Two runs on one new --out: B checks the folder (new), loads slowly; A starts later,
    finishes first. B must refuse in one line, and A's result must stay (B's --force
    replaces what the folder held when B read it: nothing)."""
    import bbpt.engine as engine

    out = tmp_path / "r"
    real, fired = engine.check_images, []

    def slow_load(images, split, progress=True):  # B's loading, during which A runs to the end
        if not fired:
            fired.append(True)
            run(quick(method="zeroshot", options={}), out=out, progress=False)
        return real(images, split, progress=progress)

    monkeypatch.setattr(engine, "check_images", slow_load)
    with pytest.raises(BadInput) as e:
        run(quick(), out=out, progress=False, force=force)  # B
    expected = "changed while this run was loading" if force else "holds a finished run (zeroshot on shapes"
    assert expected in str(e.value) and "\n" not in str(e.value)
    r = json.loads((out / "result.json").read_text())
    assert r["method"] == "zeroshot" and r["status"] == "finished"


def test_old_outputs_without_run_json_are_refused(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "curve.csv").write_text("api_calls\n0\n")
    with pytest.raises(BadInput, match="cannot be resumed"):
        run(quick(), out=out, progress=False)
    assert run(quick(), out=out, progress=False, force=True).status == "finished"


# ---- real processes: signals, kill -9, progress off a terminal -----------------------------
BBPT = [sys.executable, "-m", "bbpt.cli"]
LONG = ["run", "--method", "zip", "--dataset", "shapes", "--shots", "1", "--seed", "4", "--budget", "1500",
        "--eval-every", "30", "--test-subset", "200"]


def start(out, *extra):
    return subprocess.Popen([*BBPT, *LONG, "--out", str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(out, n, proc, timeout=120.0):
    """Until the run has rewritten its checkpoint ``n`` times (bounded in time)."""
    f, seen, last = out / "checkpoint.safetensors", 0, None
    t_end = time.time() + timeout
    while time.time() < t_end and proc.poll() is None:
        m = f.stat().st_mtime_ns if f.exists() else None
        if m is not None and m != last:
            seen, last = seen + 1, m
            if seen >= n:
                return
        time.sleep(0.01)
    raise AssertionError(f"no {n} checkpoints in {timeout}s (exit {proc.poll()})")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run in its own process."""
    out = tmp_path_factory.mktemp("straight") / "run"
    p = subprocess.run([*BBPT, *LONG, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return outputs(out), p


def test_kill_9_at_any_moment_leaves_a_folder_that_resumes(tmp_path, straight):
    out = tmp_path / "k"
    proc = start(out)
    wait_for_checkpoints(out, 4, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (out / "result.json").exists()
    p = subprocess.run([*BBPT, *LONG, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr
    assert outputs(out) == straight[0]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_says_how_to_resume_and_exits(tmp_path, straight, sig, code):
    out = tmp_path / "s"
    proc = start(out, "--quiet")
    wait_for_checkpoints(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = [l for l in err.strip().splitlines() if l.strip()][-1]
    assert last.startswith(f"interrupted ({sig.name}) after ") and "resume with: bbpt run --method zip" in last
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    p = subprocess.run([*BBPT, *LONG, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert outputs(out) == straight[0]


def test_one_process_per_run_folder(tmp_path):
    out = tmp_path / "busy"
    proc = start(out, "--quiet")
    try:
        wait_for_checkpoints(out, 1, proc)
        with pytest.raises(BadInput, match="another bbpt process is running in --out"):
            run(make_run_config(method="zip", dataset="shapes", shots=1, seed=4), out=out, progress=False, force=True)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (out / "run.json").exists()  # the refused process touched nothing


def test_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "c"
    # SharpZO's stage-1 step (2·512 + 40 candidates) takes over a second on mini
    proc = subprocess.Popen([*BBPT, "run", "--method", "sharpzo", "--dataset", "shapes", "--shots", "1", "--out",
                             str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoints(out, 1, proc)  # the starting point is on disk
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    t = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t < 5 and proc.returncode == 130, err
    assert "again: exiting now" in err and not (out / "result.json").exists()
    assert (out / "checkpoint.safetensors").exists()


def test_progress_off_a_terminal_is_one_plain_line_per_curve_point(tmp_path, straight):
    _, p = straight
    lines = p.stderr.splitlines()
    assert "\r" not in p.stderr
    points = [l for l in lines if l.startswith("zip on shapes: ")]
    assert len(points) == len(straight[0][0]["curve"]) and len(set(points)) == len(points)
    assert len(lines) == len(points)  # nothing else on stderr


def test_config_diff_treats_a_field_added_since_as_off():
    from bbpt.runfolder import config_diff

    old = {"seed": 1, "options": {"budget": 40}}
    assert config_diff(old, {**old, "remote": None}) == []  # a run made before --remote existed still resumes
    assert config_diff(old, {**old, "remote": "http://x"}) == ["remote: None -> 'http://x'"]
    assert config_diff(old, {"seed": 1, "options": {"budget": 40, "n_ctx": 8}}) == ["options.n_ctx: None -> 8"]


# ---- checkpoints: hashed, refused in one line when damaged or another run's; full disks -------
def interrupted_run(out, **kw):
    hook = lambda steps, stats: os.kill(os.getpid(), signal.SIGINT) if steps == 1 else None  # noqa: E731
    with pytest.raises(RunInterrupted):
        run(quick(**kw), out=out, progress=False, on_step=hook)
    return out / "checkpoint.safetensors"


def largest_tensor(path):
    """(start, end) of the largest tensor's bytes in a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = max((v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: o[1] - o[0])
    return 8 + n + a, 8 + n + b


def test_a_damaged_checkpoint_is_refused_in_one_line_and_force_starts_afresh(tmp_path):
    ckpt = interrupted_run(tmp_path / "r")
    data = bytearray(ckpt.read_bytes())
    a, b = largest_tensor(ckpt)
    assert b - a >= 64
    mid = (a + b) // 2 - 32
    data[mid:mid + 64] = bytes(255 - x for x in data[mid:mid + 64])  # 64 bytes flipped inside a tensor
    ckpt.write_bytes(bytes(data))
    with pytest.raises(BadInput) as e:
        run(quick(), out=tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "is damaged: its content does not match the SHA-256" in msg and "pass --force" in msg and "\n" not in msg
    assert run(quick(), out=tmp_path / "r", progress=False, force=True).status == "finished"


def test_a_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = interrupted_run(tmp_path / "r")
    with safe_open(str(ckpt), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(ckpt), metadata={"format": "bbpt-state-1", "state": meta["state"]})  # no whole-file hash
    r = run(quick(), out=tmp_path / "r", progress=False)
    assert r.status == "finished" and r.steps == run(quick(), out=tmp_path / "fresh", progress=False).steps


def test_a_full_disk_is_one_line_leaves_no_temp_file_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    import errno

    import bbpt.state as state
    from test_cli import cli_run

    out = tmp_path / "r"
    args = ["run", "--method", "zip", "--dataset", "shapes", "--shots", "1", "--test-subset", "100", "--set",
            "budget=40", "--out", str(out), "--quiet"]
    real, writes = os.fsync, []

    def fsync(fd):  # the second checkpoint write meets a full disk
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".checkpoint.safetensors.tmp"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(state.os, "fsync", fsync)
    code, _, err = cli_run(args, capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write {out / 'checkpoint.safetensors'}: No space left on device; free space")
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # the failed write cleaned up
    assert (out / "checkpoint.safetensors").exists()  # the previous checkpoint stays
    (out / ".checkpoint.safetensors.tmp99999").write_bytes(b"half")  # what a kill -9 mid-write leaves
    monkeypatch.setattr(state.os, "fsync", real)
    code, _, err = cli_run(args, capsys)
    assert code == 0 and "resuming" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".bbpt.lock") == []


def test_another_runs_checkpoint_is_refused_in_one_line(tmp_path):
    ours = interrupted_run(tmp_path / "zip")
    theirs = interrupted_run(tmp_path / "bbt", method="bbt", options={"budget": 40, "popsize": 4, "intrinsic_dim": 16})
    ours.write_bytes(theirs.read_bytes())  # a folder holding another method's checkpoint
    with pytest.raises(BadInput) as e:
        run(quick(), out=tmp_path / "zip", progress=False)
    msg = str(e.value)
    assert "belongs to another run (method: 'bbt' -> 'zip'" in msg and "pass --force" in msg and "\n" not in msg


def test_a_checkpoint_that_does_not_fit_the_method_is_refused_in_one_line(tmp_path):
    import bbpt.state as state

    ours = interrupted_run(tmp_path / "zip")
    theirs = interrupted_run(tmp_path / "bbt", method="bbt", options={"budget": 40, "popsize": 4, "intrinsic_dim": 16})
    s = state.load_state(theirs)
    s.pop("config")  # as an older bbpt wrote it: nothing says whose it is
    state.save_state(ours, s)
    with pytest.raises(BadInput) as e:
        run(quick(), out=tmp_path / "zip", progress=False)
    msg = str(e.value)
    assert "does not fit this zip run (KeyError" in msg and "pass --force" in msg and "\n" not in msg


@pytest.mark.parametrize("at_batch, finishes, out", [(1, False, "t"), (2, True, "t"), (1, False, None)])
def test_a_signal_during_the_test_evaluation_says_what_happens(tmp_path, monkeypatch, capfd, at_batch, finishes, out):
    """Two test batches: a SIGINT in the first stops after it (and says training is saved);
    one in the last lets the run finish, and says so."""
    cfg = make_run_config(method="zeroshot", dataset="shapes", shots=1, seed=3, test_subset=100, eval_batch=50)
    orig, seen = QueryMeter.charge, []

    def interrupting(self, *a):
        seen.append(1)
        if len(seen) == 2 + at_batch:  # train loss, val, then test batch ``at_batch``
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the watcher thread writes its notice
        return orig(self, *a)

    monkeypatch.setattr(QueryMeter, "charge", interrupting)
    logged, folder = [], None if out is None else tmp_path / out
    if finishes:
        r = run(cfg, out=folder, progress=False, log=logged.append)
        assert r.status == "finished"
        assert logged == [f"SIGINT came during the test evaluation's last batch: the run finished; its result is in "
                          f"{folder}"]
    else:
        with pytest.raises(RunInterrupted):
            run(cfg, out=folder, progress=False, log=logged.append)
    err = capfd.readouterr().err
    then = "training is saved, rerun the command to evaluate" if out else "nothing is saved (no --out)"
    assert f"SIGINT: stopping the test evaluation after its current batch; {then} (again to exit at once)" in err
    assert "stopping after the current step" not in err
