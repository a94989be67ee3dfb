"""``bbpt sweep FILE.toml``: a grid of runs, each in a folder named by its configuration's hash.

A sweep file names the grid; every list is one axis, and the grid is their product:

    out = "runs/sweep"                  # optional; --out wins
    methods = ["zip", "craft"]
    datasets = ["mnist", "fashion-mnist"]
    shots = [16]                        # default [16]
    seeds = [1, 2, 3]                   # default [1, 2, 3]

    [run]                               # RunConfig fields for every run (model, test_subset, ...)
    test_subset = 500

    [options]                           # method options for every method ...
    budget = 5000
    [options.craft]                     # ... and per method (a table named after the method)
    budget = 8000

    [grid]                              # option axes: every value, for every method
    view_pool = [4, 16]

    protocol = "base_to_new"            # optional: train on the base classes, add the new-class test
    [report]                            # what `bbpt report OUT` adds by default
    compare = ["zip,bar", "craft,bbt"]  # paired differences A - B
    baseline = "other.toml"             # optional: each run against the same method, task and seed there

A run's folder is ``OUT/<method>/<dataset>/<hash>``, the hash of its full resolved
configuration (run fields, every method option with defaults included, and the SHA-256 of
the weights file where a file holds them, and the method's ``revision`` once a fix in its code
bumped it), so a changed option, retrained weights or a fixed method never reuse a stale result. Rerun, a finished run is skipped without building anything, an
unfinished one resumes from its checkpoint (a sweep killed with kill -9 restarts where it
stopped), and the rest run. ``OUT/sweep.json`` lists every run with its folder.

Runs go to a local process pool (``workers``; 1: in this process) or, with ``ray``, to Ray
tasks; either way each worker process builds a backbone once and reuses it across its runs.

Ctrl-C / SIGTERM to a local sweep stop it as they stop one run: every running run checkpoints
after its current step, no further run starts, and :class:`SweepInterrupted` says how far it
got (a second signal exits at once). Pool workers live in their own process group, so a
terminal's Ctrl-C reaches them once, forwarded by the sweep, and they exit when the sweep's
process dies (kill -9), so a rerun never races an orphan.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

from .errors import BadInput, BBPTError

logger = logging.getLogger(__name__)


class SweepInterrupted(Exception):
    """A sweep stopped by SIGINT / SIGTERM; ``summary`` is every run's outcome so far."""

    def __init__(self, signum: int, summary: dict):
        self.signum, self.summary, self.exit_code = signum, summary, 128 + signum
        super().__init__(f"sweep interrupted by {signal.Signals(signum).name}")

AXES = {"methods": None, "datasets": None, "shots": [16], "seeds": [1, 2, 3]}
PROTOCOLS = ("base_to_new",)  # a protocol sweep adds its evaluations to each run's result.json


DEFAULT_OUT = "runs/sweep"  # a sweep file without out = "..."


def load_sweep(path: str | Path) -> dict:
    from ._compat import tomllib

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"sweep file {p} does not exist; pass a TOML file with methods = [...] and datasets = [...]")
    try:
        spec = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"sweep file {p} is not valid TOML: {str(e).splitlines()[0]}") from None
    known = set(AXES) | {"out", "run", "options", "grid", "protocol", "report"}
    extra = sorted(set(spec) - known)
    if extra:
        raise BadInput(f"sweep file {p}: unknown key {extra[0]!r}; its keys: {', '.join(sorted(known))}")
    for axis, default in AXES.items():
        v = spec.get(axis, default)
        if v is None:
            raise BadInput(f"sweep file {p} needs {axis} = [...], e.g. {axis} = "
                           + ('["zip", "craft"]' if axis == "methods" else '["mnist"]'))
        if not isinstance(v, list) or not v:
            raise BadInput(f"sweep file {p}: {axis} must be a non-empty list, got {v!r}")
        spec[axis] = v
    for key in ("run", "options", "grid", "report"):
        if not isinstance(spec.get(key, {}), dict):
            raise BadInput(f"sweep file {p}: [{key}] must be a table")
    for k, v in spec.get("grid", {}).items():
        if not isinstance(v, list) or not v:
            raise BadInput(f"sweep file {p}: grid.{k} must be a non-empty list of values, got {v!r}")
    proto = spec.get("protocol")
    if proto is not None and proto not in PROTOCOLS:
        raise BadInput(f"sweep file {p}: protocol {proto!r} is not one of {', '.join(PROTOCOLS)} "
                       "(cross-dataset and shift runs: `bbpt protocol`)")
    if proto and spec.get("run", {}).get("classes", "base") != "base":
        raise BadInput(f"sweep file {p}: protocol base_to_new trains on the base classes; drop run.classes")
    rep = spec.get("report", {})
    extra = sorted(set(rep) - {"compare", "baseline"})
    if extra:
        raise BadInput(f"sweep file {p}: unknown key report.{extra[0]}; [report] takes compare = [\"A,B\", ...] "
                       "and baseline = \"OTHER.toml\"")
    base = rep.get("baseline")
    if base is not None and not (isinstance(base, str) and base.endswith(".toml")):
        raise BadInput(f"sweep file {p}: report.baseline must be another sweep file's path (\"....toml\"), got {base!r}")
    pairs = rep.get("compare", [])
    if not isinstance(pairs, list) or not all(isinstance(x, str) and len(x.split(",")) == 2 for x in pairs):
        raise BadInput(f"sweep file {p}: report.compare must be a list of \"A,B\" method pairs, got {pairs!r}")
    return spec


def config_hash(config: dict) -> str:
    """12 hex digits of the SHA-256 of a resolved configuration (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


_FINGERPRINTS: dict[tuple, str] = {}


def weights_fingerprint(model: str, pretrained: str | None) -> str | None:
    """12 hex digits of the SHA-256 of the weights file a run would load, where a file names
    them (the shipped ``mini`` weights, a local checkpoint); None for a tag, a hub id or
    ``random``, whose name is their identity. Part of each run's hash, so retrained weights
    never reuse a stale result."""
    from .models.backbone import WEIGHTS_DIR, embedded_models

    path = None
    if pretrained not in (None, "random") and Path(pretrained).is_file():
        path = Path(pretrained)
    elif pretrained is None and model in embedded_models():
        path = WEIGHTS_DIR / f"{model}.safetensors"
    if path is None or not path.is_file():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()[:12]
    return _FINGERPRINTS[key]


def expand(spec: dict, out: str | Path) -> list[tuple[dict, Path]]:
    """Every run of the grid as (RunConfig fields, folder); the folder named by the hash of the
    configuration the engine would store (run fields + resolved method options)."""
    from .engine import identity, make_run_config
    from .methods import METHODS, make_config

    out = Path(out)
    opts_all = {k: v for k, v in spec.get("options", {}).items() if not isinstance(v, dict)}
    grid = spec.get("grid", {})
    names, values = list(grid), [grid[k] for k in grid]
    runs, seen = [], set()
    for method, dataset, shots, seed, combo in itertools.product(
            spec["methods"], spec["datasets"], spec["shots"], spec["seeds"], itertools.product(*values)):
        cls = METHODS.get(method)
        per = spec.get("options", {}).get(method, {})
        options = {**opts_all, **(per if isinstance(per, dict) else {}), **dict(zip(names, combo))}
        run = {**spec.get("run", {}), **({"classes": "base"} if spec.get("protocol") == "base_to_new" else {})}
        cfg = make_run_config(**{**run, "method": method, "dataset": dataset, "shots": shots, "seed": seed,
                                 "options": options})
        resolved = {**identity(cfg), "options": cls.resolve_config(make_config(cls, cfg.options), shots).model_dump(),
                    "weights": weights_fingerprint(cfg.model, cfg.pretrained),
                    **({"revision": cls.revision} if cls.revision else {})}
        h = config_hash(resolved)
        if h in seen:
            continue
        seen.add(h)
        fields = {**cfg.model_dump(), **({"loggers": cfg.loggers} if "loggers" in run else {})}  # not stored: not hashed
        runs.append((fields, out / method / dataset.replace("/", "_").strip("_") / h))
    return runs


_STOP = None  # a pool worker's view of the sweep's stop flag (a multiprocessing Event)
_MISSED: list[int] = []  # a forwarded signal that came while no run's handler was installed


def _worker_init(parent: int, stop, pids) -> None:
    """A pool worker: its own process group (the sweep forwards signals, once each), a signal
    between runs or during a run's set-up kept for that run (see ``_run_one``), and an exit
    when the sweep dies."""
    global _STOP
    _STOP = stop
    os.setpgrp()
    signal.signal(signal.SIGINT, lambda signum, frame: _MISSED.append(signum))
    pids.put(os.getpid())

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # the sweep was killed: the last checkpoint is on disk; its rerun resumes it

    threading.Thread(target=orphaned, daemon=True, name="bbpt-orphan-watch").start()


def _run_one(fields: dict, folder: str, threads: int | None = None, protocol: str | None = None) -> dict:
    """One run in a worker (the backbone cache is the worker's own). ``threads``: torch's
    intra-op threads, so that parallel workers share the cores instead of oversubscribing."""
    from . import engine

    if _STOP is not None and _STOP.is_set():  # queued before the sweep was stopped
        return {"folder": folder, "status": "not started", "test": None, "queries": None, "wall_seconds": 0.0,
                "pid": os.getpid()}
    if threads:
        import torch

        torch.set_num_threads(threads)
    if engine.BACKBONE_CACHE is None:
        engine.BACKBONE_CACHE = {}
    cfg = engine.make_run_config(**fields)

    def redeliver(steps: int, stats: dict) -> None:  # the run's handler is installed by its first step
        if _MISSED:
            os.kill(os.getpid(), _MISSED.pop())

    record = Path(folder) / "result.json"
    try:
        status = json.loads(record.read_text()).get("status")
    except (OSError, ValueError):
        status = None
    if status == "failed":  # an earlier attempt's failure record: the sweep's own, so the run starts from what was there before
        record.unlink()
    # an unfinished run's record without its run.json and checkpoint (a clone carries only the
    # committed result.json): nothing to resume, so the sweep, which owns the hash-named folder, starts it afresh
    stale = status not in (None, "failed", "finished") and not (Path(folder) / "run.json").exists()
    try:
        r = engine.run(cfg, out=folder, progress=False, force=stale, keep_finished=True, log=lambda m: None,
                       on_step=redeliver)
    except engine.RunInterrupted as e:  # checkpointed; a rerun of the sweep resumes it
        return {"folder": folder, "status": "interrupted", "signal": e.signum, "test": None,
                "queries": e.result["queries"], "wall_seconds": e.result["wall_seconds"], "pid": os.getpid()}
    except BBPTError as e:  # this configuration cannot run (e.g. its first step does not fit the budget)
        return _failed(cfg, Path(folder), e)
    if protocol == "base_to_new":
        from .protocols import add_new_classes

        r = add_new_classes(cfg, Path(folder), r)
    return {"folder": folder, "status": r["status"], "test": r["accuracy"]["test"], "queries": r["queries"],
            "wall_seconds": r["wall_seconds"], "pid": os.getpid()}


def _failed(cfg, folder: Path, e: BBPTError) -> dict:
    """Record a run that bbpt refused (one-line reason in result.json, status "failed") so that
    the sweep goes on, and its folder says why. Nothing was charged:
    a refused query is never counted. A rerun of the sweep tries the run again."""
    from .methods import METHODS, make_config

    try:  # the options as a finished run's result.json stores them (resolved), so the report groups them alike
        cls = METHODS.get(cfg.method)
        options = cls.resolve_config(make_config(cls, cfg.options), cfg.shots).model_dump()
    except (BBPTError, KeyError):
        options = dict(cfg.options)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"method": cfg.method, "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed, "status": "failed",
              "error": f"{type(e).__name__}: {e}", "config": {**cfg.model_dump(), "options": options}}
    (folder / "result.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return {"folder": str(folder), "status": "failed", "error": record["error"], "test": None, "queries": None,
            "wall_seconds": 0.0, "pid": os.getpid()}


def _finished(folder: Path, protocol: str | None = None) -> dict | None:
    """A finished run's outcome (with its protocol's evaluations, when the sweep has one)."""
    try:
        r = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if r.get("status") != "finished" or (protocol and protocol not in r):
        return None
    return {"folder": str(folder), "status": "finished", "test": r["accuracy"]["test"], "queries": r["queries"],
            "wall_seconds": r["wall_seconds"], "pid": None, "skipped": True}


def sweep(spec: dict, out: str | Path, workers: int = 1, ray: str | None = None, ray_cpus: int | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Run the grid; returns (and writes to ``out/sweep.json``) every run's outcome."""
    log = log or logger.info
    if workers < 1:
        raise BadInput(f"--workers {workers}: give 1 or more worker processes")
    out = Path(out)
    runs = expand(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"spec": spec, "runs": [{"folder": str(f), "config": c} for c, f in runs]},
                                               indent=1, default=str) + "\n")
    results: dict[str, dict] = {}
    todo = []
    for fields, folder in runs:  # a finished run is skipped here: nothing built, nothing spent
        done = _finished(folder, spec.get("protocol"))
        if done is not None:
            results[str(folder)] = done
        else:
            todo.append((fields, str(folder)))
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run"
        + (f" on Ray ({ray})" if ray else f" with {workers} worker{'s' * (workers > 1)}") + f" -> {out}")
    t0 = time.time()

    def note(r: dict) -> None:
        results[r["folder"]] = r
        test = "     -" if r["test"] is None else f"{100 * r['test']:5.1f}%"
        log(f"  [{len(results)}/{len(runs)}] {r['status']:11s} test {test}  "
            f"{r['wall_seconds']:6.1f}s  {r['folder']}")
        if r.get("error"):
            log(f"      {r['error']}")

    proto = spec.get("protocol")
    stopped = None
    if todo and ray:
        _sweep_ray(todo, ray, ray_cpus, note, proto)
    elif todo and workers == 1:
        for fields, folder in todo:
            note(r := _run_one(fields, folder, None, proto))
            if r["status"] == "interrupted":  # the run's own handler caught the signal
                stopped = r["signal"]
                break
    elif todo:
        stopped = _sweep_pool(todo, workers, note, proto, log)
    not_started = {"status": "not started", "test": None, "queries": None, "wall_seconds": 0.0, "pid": None}
    summary = {"out": str(out), "runs": [results.get(str(f), {"folder": str(f), **not_started}) for _, f in runs],
               "wall_seconds": round(time.time() - t0, 2)}
    (out / "sweep_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if stopped is not None:
        raise SweepInterrupted(stopped, summary)
    return summary


def _sweep_pool(todo: list, workers: int, note: Callable[[dict], None], protocol: str | None,
                log: Callable[[str], None]) -> int | None:
    """``todo`` on a pool of spawned workers; returns the signal that stopped it, if any."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop, pids, known, signals = ctx.Event(), ctx.SimpleQueue(), set(), []

    def forward(signum, frame) -> None:  # the main thread, between its polls
        signals.append(signum)
        stop.set()
        while not pids.empty():
            known.add(pids.get())
        for pid in known:  # SIGINT: a run's handler treats it as SIGTERM's equal
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        name = signal.Signals(signum).name
        if len(signals) == 1:
            log(f"\n{name}: stopping the sweep; running runs checkpoint after their current step, no new run "
                f"starts (again to exit at once)")
        else:
            log(f"\n{name} again: exiting now; every run's last checkpoint is on disk, rerun the sweep to resume")
            os._exit(128 + signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(), stop, pids)) as pool:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pending = {pool.submit(_run_one, f, d, threads, protocol) for f, d in todo}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    if not fut.cancelled() and (r := fut.result())["status"] != "not started":
                        note(r)
                if signals:
                    for fut in pending:
                        fut.cancel()  # not yet handed to a worker; a handed-on one sees `stop`
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return signals[0] if signals else None


def _sweep_ray(todo: list, address: str, cpus: int | None, note: Callable[[dict], None], protocol: str | None) -> None:
    """``address``: "local" starts a Ray instance here (``cpus`` CPUs), "auto" joins the running
    cluster, anything else is a cluster address."""
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs Ray: pip install 'bbpt[ray]'") from None
    if not ray.is_initialized():
        local = address == "local"
        ray.init(address=None if local else address, num_cpus=cpus if local else None, include_dashboard=False,
                 log_to_driver=False)
    task = ray.remote(num_cpus=1, max_calls=0)(_run_one)  # workers live on: one backbone per worker process
    pending = [task.remote(f, d, 1, protocol) for f, d in todo]  # one CPU per task, one thread
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        note(ray.get(ready[0]))
