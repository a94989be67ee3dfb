"""Benchmark: what the README's suite of sweeps costs on this machine, and where the time goes.

    python bench/suite_cost.py              # tally the committed grids of bench/sweeps/*.toml
    python bench/suite_cost.py --measure    # and one slice run at --workers 1 and 2, side by side

Tally: per sweep file, how many of its runs are finished (committed result.json), and their
recorded wall seconds summed per method. Sweep runs record the seconds of a worker holding
cores / workers torch threads, so the sum over W workers is the suite's wall time at W
workers when the pool stays full.

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


def tally(files: list[Path]) -> list[str]:
    lines = ["| sweep | runs finished | CPU-seconds of runs (at 1 thread) | slowest method: mean s per run |",
             "|---|---|---|---|"]
    per_method: dict[str, list[float]] = {}
    total = 0.0
    for f in files:
        spec = load_sweep(f)
        runs = expand(spec, ROOT / spec["out"])
        secs, done, mine = 0.0, 0, {}
        for _, folder in runs:
            try:
                r = json.loads((folder / "result.json").read_text())
            except (OSError, ValueError):
                continue
            if r.get("status") != "finished":
                continue
            done += 1
            secs += r["wall_seconds"]
            mine.setdefault(r["method"], []).append(r["wall_seconds"])
            per_method.setdefault(r["method"], []).append(r["wall_seconds"])
        total += secs
        slow = max(mine, key=lambda m: statistics.mean(mine[m])) if mine else "-"
        slow_s = f"{slow}: {statistics.mean(mine[slow]):.0f}" if mine else "-"
        lines.append(f"| {f.stem} | {done} / {len(runs)} | {secs:.0f} | {slow_s} |")
    lines += ["", f"All finished runs: {total:.0f} CPU-seconds = {total / 60:.1f} min at 1 worker-thread, "
                  f"{total / 120:.1f} min of wall time at 2 workers on 2 cores (full pool).", "",
              "| method | runs | mean s | max s | share of the suite |", "|---|---|---|---|---|"]
    for m, xs in sorted(per_method.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {m} | {len(xs)} | {statistics.mean(xs):.1f} | {max(xs):.1f} | "
                     f"{100 * sum(xs) / max(total, 1e-9):.0f} % |")
    return lines


def measure(methods: list[str], task: str) -> list[str]:
    zc = load_sweep(ROOT / "bench/sweeps/zip_comparison.toml")
    spec = {**zc, "methods": methods, "datasets": [task], "seeds": [1], "report": {}}
    walls = {}
    for w in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            s = sweep(spec, Path(tmp) / "out", workers=w, log=lambda m: print(m, file=sys.stderr))
            walls[w] = (time.time() - t0, sum(r["wall_seconds"] for r in s["runs"]))
    return ["| workers | wall s | sum of run s |", "|---|---|---|",
            *(f"| {w} | {a:.0f} | {b:.0f} |" for w, (a, b) in walls.items()), "",
            f"slice: {', '.join(methods)} on {task}, seed 1; --workers 2 takes {walls[2][0] / walls[1][0]:.2f}x "
            "the wall time of --workers 1"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--slice", default="zip,bbt,craft,bar")
    ap.add_argument("--task", default="mnist")
    args = ap.parse_args(argv)
    lines = tally(sorted((ROOT / "bench/sweeps").glob("*.toml")))
    if args.measure:
        lines += [""] + measure(args.slice.split(","), args.task)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
