"""Benchmark: what the README's suite of sweeps costs on this machine, and where the time goes.

    python bench/suite_cost.py              # tally the committed grids of bench/sweeps/*.toml
    python bench/suite_cost.py --measure    # and one slice run at --workers 1 and 2, side by side
    python bench/suite_cost.py --measure --budget 1000   # a shorter slice
    python bench/suite_cost.py --speedup blackvip=2.1,bar=1.9   # the tally projected after a speed-up

Tally: per sweep file, how many of its runs are finished (committed result.json), and their
recorded wall seconds summed per method. Sweep runs record the seconds of a worker holding
cores / workers torch threads, so the sum over W workers is the suite's wall time at W
workers when the pool stays full.

Speed-up: the runs were timed when they ran; ``--speedup METHOD=FACTOR,...`` divides each
named method's recorded seconds by a measured factor (``bench/image_tower.py``'s step
speed-up at one thread, as sweep workers run), a projection of the suite after a change.

Measure: the slice (``--slice`` methods on ``--task``, seed 1, at ZIP's comparison settings)
as a sweep at --workers 1 (two torch threads per run) and at --workers 2 (one each), each
from scratch in a temporary folder, and the ratio of their wall times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bbpt.sweep import expand, load_sweep, sweep

ROOT = Path(__file__).resolve().parent.parent


def _key(cfg: dict) -> tuple:
    """(method, dataset, the rest of the configuration but the seed and the weights file)."""
    rest = {k: v for k, v in cfg.items() if k not in ("method", "dataset", "seed", "pretrained")}
    return cfg["method"], cfg["dataset"], json.dumps(rest, sort_keys=True, default=str)


def _result(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _scaled(r: dict | None, speedup: dict[str, float]) -> dict | None:
    if r is None or r.get("method") not in speedup or "wall_seconds" not in r:
        return r
    return {**r, "wall_seconds": r["wall_seconds"] / speedup[r["method"]]}


def tally(files: list[Path], speedup: dict[str, float] | None = None) -> list[str]:
    """Finished runs' recorded seconds; each unfinished run estimated from finished runs of the
    same method, dataset and options in any sweep, else of the same method and options on any
    dataset (an underestimate for `union`), else of the same method and dataset with other
    options (budget, classes), else of the same method; "none" where no run of the
    method has finished (counted as 0 s)."""
    specs = [(f, load_sweep(f)) for f in files]
    grids = [(f, [(c, _scaled(_result(d), speedup or {})) for c, d in expand(spec, ROOT / spec["out"])])
             for f, spec in specs]
    exact, loose, near, method_only = {}, {}, {}, {}
    for _, runs in grids:
        for c, r in runs:
            if r and r.get("status") == "finished":
                exact.setdefault(_key(c), []).append(r["wall_seconds"])
                loose.setdefault((c["method"], _key(c)[2]), []).append(r["wall_seconds"])
                near.setdefault((c["method"], c["dataset"]), []).append(r["wall_seconds"])
                method_only.setdefault(c["method"], []).append(r["wall_seconds"])
    lines = ["| sweep | runs finished | CPU-s of finished runs | estimated CPU-s of the rest (how) | "
             "whole sweep, wall min at 2 workers | slowest method: mean s per run |", "|---|---|---|---|---|---|"]
    per_method: dict[str, list[float]] = {}
    total = est_total = 0.0
    for f, runs in grids:
        secs, done, mine, est, how = 0.0, 0, {}, 0.0, {"same": 0, "other dataset": 0, "other options": 0, "method only": 0,
                                                    "none": 0}
        for c, r in runs:
            if r and r.get("status") == "finished":
                done += 1
                secs += r["wall_seconds"]
                mine.setdefault(r["method"], []).append(r["wall_seconds"])
                per_method.setdefault(r["method"], []).append(r["wall_seconds"])
                continue
            for name, table, k in (("same", exact, _key(c)), ("other dataset", loose, (c["method"], _key(c)[2])),
                                   ("other options", near, (c["method"], c["dataset"])),
                                   ("method only", method_only, c["method"])):
                if k in table:
                    est += statistics.mean(table[k])
                    how[name] += 1
                    break
            else:
                how["none"] += 1
        total += secs
        est_total += est
        slow = max(mine, key=lambda m: statistics.mean(mine[m])) if mine else "-"
        slow_s = f"{slow}: {statistics.mean(mine[slow]):.0f}" if mine else "-"
        how_s = ", ".join(f"{n} {k}" for k, n in how.items() if n) or "-"
        lines.append(f"| {f.stem} | {done} / {len(runs)} | {secs:.0f} | {est:.0f} ({how_s}) | "
                     f"{(secs + est) / 120:.0f} | {slow_s} |")
    lines += ["", f"Finished runs: {total:.0f} CPU-seconds = {total / 120:.1f} min of wall time at 2 workers on 2 "
                  f"cores (full pool); with the estimated rest, the whole suite is about {(total + est_total) / 3600:.1f} "
                  f"CPU-hours = {(total + est_total) / 7200:.1f} h at 2 workers.", "",
              "| method (finished runs) | runs | mean s | max s | share of the finished runs' time |", "|---|---|---|---|---|"]
    for m, xs in sorted(per_method.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {m} | {len(xs)} | {statistics.mean(xs):.1f} | {max(xs):.1f} | "
                     f"{100 * sum(xs) / max(total, 1e-9):.0f} % |")
    return lines


def measure(methods: list[str], task: str, budget: int | None = None) -> list[str]:
    zc = load_sweep(ROOT / "bench/sweeps/zip_comparison.toml")
    spec = {**zc, "methods": methods, "datasets": [task], "seeds": [1], "report": {}}
    if budget is not None:  # a shorter slice: every method's budget (in its sweep unit) set to N
        per = {m: o for m, o in zc.get("options", {}).items() if isinstance(o, dict)}
        spec["options"] = {**{m: o for m, o in zc.get("options", {}).items() if not isinstance(o, dict)},
                           **{m: {**per.get(m, {}), "budget": budget} for m in methods}}
    walls = {}
    for w in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            s = sweep(spec, Path(tmp) / "out", workers=w, log=lambda m: print(m, file=sys.stderr))
            walls[w] = (time.time() - t0, sum(r["wall_seconds"] for r in s["runs"]))
    return ["| workers | wall s | sum of run s |", "|---|---|---|",
            *(f"| {w} | {a:.0f} | {b:.0f} |" for w, (a, b) in walls.items()), "",
            f"slice: {', '.join(methods)} on {task}, seed 1"
            + (f", budget {budget}" if budget is not None else ", ZIP's comparison budgets")
            + f"; --workers 2 takes {walls[2][0] / walls[1][0]:.2f}x the wall time of --workers 1"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--slice", default="zip,bbt,craft,bar")
    ap.add_argument("--task", default="mnist")
    ap.add_argument("--budget", type=int, default=None, help="each slice method's budget (default: the sweep's 5000)")
    ap.add_argument("--speedup", default=None, help="METHOD=FACTOR,...: also the tally with those methods' seconds "
                    "divided by FACTOR")
    args = ap.parse_args(argv)
    files = sorted((ROOT / "bench/sweeps").glob("*.toml"))
    lines = tally(files)
    if args.speedup:
        try:
            speedup = {m: float(f) for m, f in (kv.split("=") for kv in args.speedup.split(","))}
        except ValueError:
            sys.exit(f"--speedup {args.speedup!r}: expected METHOD=FACTOR,..., e.g. blackvip=2.1,bar=1.9")
        lines += ["", "Projected: " + ", ".join(f"{m} seconds / {f:g}" for m, f in speedup.items()), ""]
        lines += tally(files, speedup)
    if args.measure:
        lines += [""] + measure(args.slice.split(","), args.task, args.budget)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
