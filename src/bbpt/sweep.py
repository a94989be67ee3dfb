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

A run's folder is ``OUT/<method>/<dataset>/<hash>``, the hash of its full resolved
configuration (run fields and every method option, defaults included), so a changed option
never reuses a stale result. Rerun, a finished run is skipped without building anything, an
unfinished one resumes from its checkpoint (a sweep killed with kill -9 restarts where it
stopped), and the rest run. ``OUT/sweep.json`` lists every run with its folder.

Runs go to a local process pool (``workers``; 1: in this process) or, with ``ray``, to Ray
tasks; either way each worker process builds a backbone once and reuses it across its runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from .errors import BadInput

AXES = {"methods": None, "datasets": None, "shots": [16], "seeds": [1, 2, 3]}


def load_sweep(path: str | Path) -> dict:
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"sweep file {p} does not exist; pass a TOML file with methods = [...] and datasets = [...]")
    try:
        spec = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"sweep file {p} is not valid TOML: {str(e).splitlines()[0]}") from None
    known = set(AXES) | {"out", "run", "options", "grid"}
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
    for key in ("run", "options", "grid"):
        if not isinstance(spec.get(key, {}), dict):
            raise BadInput(f"sweep file {p}: [{key}] must be a table")
    for k, v in spec.get("grid", {}).items():
        if not isinstance(v, list) or not v:
            raise BadInput(f"sweep file {p}: grid.{k} must be a non-empty list of values, got {v!r}")
    return spec


def config_hash(config: dict) -> str:
    """12 hex digits of the SHA-256 of a resolved configuration (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand(spec: dict, out: str | Path) -> list[tuple[dict, Path]]:
    """Every run of the grid as (RunConfig fields, folder); the folder named by the hash of the
    configuration the engine would store (run fields + resolved method options)."""
    from .engine import make_run_config
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
        cfg = make_run_config(**{**spec.get("run", {}), "method": method, "dataset": dataset, "shots": shots,
                                 "seed": seed, "options": options})
        resolved = {**cfg.model_dump(), "options": cls.resolve_config(make_config(cls, cfg.options), shots).model_dump()}
        h = config_hash(resolved)
        if h in seen:
            continue
        seen.add(h)
        runs.append((cfg.model_dump(), out / method / dataset.replace("/", "_").strip("_") / h))
    return runs


def _run_one(fields: dict, folder: str, threads: int | None = None) -> dict:
    """One run in a worker (the backbone cache is the worker's own). ``threads``: torch's
    intra-op threads, so that parallel workers share the cores instead of oversubscribing."""
    from . import engine

    if threads:
        import torch

        torch.set_num_threads(threads)
    if engine.BACKBONE_CACHE is None:
        engine.BACKBONE_CACHE = {}
    cfg = engine.make_run_config(**fields)
    r = engine.run(cfg, out=folder, progress=False, keep_finished=True, log=lambda m: None)
    return {"folder": folder, "status": r["status"], "test": r["accuracy"]["test"], "queries": r["queries"],
            "wall_seconds": r["wall_seconds"], "pid": os.getpid()}


def _finished(folder: Path) -> dict | None:
    try:
        r = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if r.get("status") != "finished":
        return None
    return {"folder": str(folder), "status": "finished", "test": r["accuracy"]["test"], "queries": r["queries"],
            "wall_seconds": r["wall_seconds"], "pid": None, "skipped": True}


def sweep(spec: dict, out: str | Path, workers: int = 1, ray: str | None = None, ray_cpus: int | None = None,
          log: Callable[[str], None] | None = None) -> dict:
    """Run the grid; returns (and writes to ``out/sweep.json``) every run's outcome."""
    log = log or (lambda m: print(m, file=sys.stderr))
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
        done = _finished(folder)
        if done is not None:
            results[str(folder)] = done
        else:
            todo.append((fields, str(folder)))
    log(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run"
        + (f" on Ray ({ray})" if ray else f" with {workers} worker{'s' * (workers > 1)}") + f" -> {out}")
    t0 = time.time()

    def note(r: dict) -> None:
        results[r["folder"]] = r
        log(f"  [{len(results)}/{len(runs)}] {r['status']:9s} test {100 * (r['test'] or 0):5.1f}%  "
            f"{r['wall_seconds']:6.1f}s  {r['folder']}")

    if todo and ray:
        _sweep_ray(todo, ray, ray_cpus, note)
    elif todo and workers == 1:
        for fields, folder in todo:
            note(_run_one(fields, folder))
    elif todo:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            threads = max(1, (os.cpu_count() or 1) // workers)
            for fut in as_completed([pool.submit(_run_one, f, d, threads) for f, d in todo]):
                note(fut.result())
    summary = {"out": str(out), "runs": [results[str(f)] for _, f in runs], "wall_seconds": round(time.time() - t0, 2)}
    (out / "sweep_results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _sweep_ray(todo: list, address: str, cpus: int | None, note: Callable[[dict], None]) -> None:
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
    pending = [task.remote(f, d, 1) for f, d in todo]  # one CPU per task, one thread
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        note(ray.get(ready[0]))
