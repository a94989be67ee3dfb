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
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .errors import BadInput, BBPTError

logger = logging.getLogger(__name__)


class SweepInterrupted(Exception):
    """A sweep stopped by SIGINT / SIGTERM; ``summary`` is every run's outcome so far."""

    def __init__(self, signum: int, summary: dict):
        self.signum, self.summary, self.exit_code = signum, summary, 128 + signum
        super().__init__(f"sweep interrupted by {signal.Signals(signum).name}")


AXES = ("methods", "datasets", "shots", "seeds")  # the grid's run axes (SweepSpec's lists)
PROTOCOLS = ("base_to_new",)  # a protocol sweep adds its evaluations to each run's result.json


DEFAULT_OUT = "runs/sweep"  # a sweep file without out = "..."

Pair = Annotated[str, StringConstraints(pattern=r"^[^,]+,[^,]+$")]  # "A,B"
_GRID_AXIS = "a non-empty list of values"  # what each [grid] entry must be


class ReportSpec(BaseModel):
    """A sweep file's ``[report]``: what ``bbpt report FILE`` adds by default. Each field's
    description says what its value must be (the errors quote it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    compare: list[Pair] = Field([], description='a list of "A,B" method pairs (paired differences A - B; '
                                                '"*,B": every method against B)')
    baseline: Annotated[str, StringConstraints(pattern=r"\.toml$")] | None = Field(
        None, description='another sweep file\'s path ("....toml"): each run against its twin there (same '
                          'method, task and seed)')


class SweepSpec(BaseModel):
    """A sweep file (see the module's docstring): every list is one axis of the grid. Each
    field's description says what its value must be (the errors quote it); the run fields and
    method options are checked as each run's configuration is built (:func:`expand`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    out: str | None = Field(None, min_length=1, description=f"a folder for the runs (default {DEFAULT_OUT}; "
                                                            "--out wins)")
    methods: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="a non-empty list of method names (`bbpt methods`)")
    datasets: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="a non-empty list of tasks (`bbpt datasets`) or image-folder paths")
    shots: list[Annotated[int, Field(ge=1)]] = Field(
        [16], min_length=1, description="a non-empty list of training images per class, integers >= 1")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        [1, 2, 3], min_length=1, description="a non-empty list of seeds, integers >= 0")
    run: dict[str, Any] = Field({}, description="a table of run fields for every run (model, test_subset, ...)")
    options: dict[str, Any] = Field({}, description="a table of method options for every method, and "
                                                    "[options.METHOD] tables for one method")
    grid: dict[str, Annotated[list, Field(min_length=1)]] = Field(
        {}, description=f"a table of option axes, each {_GRID_AXIS}")
    protocol: Literal[PROTOCOLS] | None = Field(
        None, description=" or ".join(repr(x) for x in PROTOCOLS) + " (cross-dataset and shift runs: "
                          "`bbpt protocol`)")
    report: ReportSpec = Field(ReportSpec(), description='a table: compare = ["A,B", ...] and/or '
                                                         'baseline = "OTHER.toml"')

    @model_validator(mode="after")
    def _base_classes(self):
        if self.protocol == "base_to_new" and self.run.get("classes", "base") != "base":
            raise ValueError("protocol base_to_new trains on the base classes; drop run.classes")
        return self


_EXAMPLE = {"methods": '["zip", "craft"]', "datasets": '["mnist"]'}
_REPORT_KEYS = 'compare = ["A,B", ...] and baseline = "OTHER.toml"'  # ReportSpec's keys, as written


def load_sweep(path: str | Path) -> dict:
    """A sweep file, checked against :class:`SweepSpec`, as a dict: the file's own keys and
    values (in its order: ``sweep.json`` holds them), then the defaults of the axes it leaves
    out. Any fault is one :class:`BadInput` line naming the key and the fix."""
    from ._compat import tomllib

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"sweep file {p} does not exist; pass a TOML file with methods = [...] and datasets = [...]")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"sweep file {p} is not valid TOML: {str(e).splitlines()[0]}") from None
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise BadInput(f"sweep file {p}{_why(e.errors()[0], raw)}") from None
    return {**raw, **{k: list(getattr(spec, k)) for k in AXES if k not in raw}}  # strict: raw's values are checked


def _why(err: dict, raw: dict) -> str:
    """One pydantic error as the rest of a one-line message: the key, what it must be, the value."""
    loc = tuple(str(x) for x in err["loc"])
    if err["type"] == "missing":
        return f" needs {loc[0]} = [...], e.g. {loc[0]} = {_EXAMPLE.get(loc[0], '[...]')}"
    if err["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f": unknown key {loc[0]!r}; its keys: {', '.join(sorted(SweepSpec.model_fields))}"
        return f": unknown key {'.'.join(loc)}; [{loc[0]}] takes {_REPORT_KEYS}"
    if not loc:  # a check across keys (the model validator): its own message
        return f": {err['ctx']['error']}" if "error" in err.get("ctx", {}) else f": {err['msg']}"
    # the key the fault is in: a top-level key, or one level down in [grid] / [report]
    key = loc[:2] if loc[0] in ("grid", "report") and len(loc) > 1 else loc[:1]
    value = raw
    for k in key:
        value = value.get(k) if isinstance(value, dict) else None
    if key[0] == "grid" and len(key) == 2:
        must = _GRID_AXIS
    elif key[0] == "report" and len(key) == 2:
        must = ReportSpec.model_fields[key[1]].description
    else:
        must = SweepSpec.model_fields[key[0]].description
    name = f"[{key[0]}]" if len(key) == 1 and key[0] in ("run", "options", "grid", "report") else ".".join(key)
    return f": {name} must be {must}, got {value!r}"


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
