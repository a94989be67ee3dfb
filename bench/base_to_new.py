"""Benchmark: base-to-new generalisation (CoOp/CoCoOp protocol) on the offline tasks.

Train on the first half of the classes (16 shots), test on the base classes and on the
unseen new half; H = 2·base·new / (base + new). Every black-box method at one api_call
budget (default 5000, ZIP's comparison; BPT-VLM with ZIP's settings), CoOp as the
white-box row.

    python bench/base_to_new.py                       # resumable: finished protocols are kept
    python bench/base_to_new.py --methods zip,coop --tasks mnist --seeds 1

Writes under --out (default bench/results/base_to_new): runs/<method>/<task>/ (bbpt's
protocol output: seed folders, summary.json, summary.md) and table.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from seed_methods import ALL_METHODS, DEFAULT_TASKS, equal_call_options, label  # noqa: E402

from bbpt.protocols import base_to_new  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=ALL_METHODS)
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--api-calls", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/base_to_new"))
    args = ap.parse_args(argv)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    seeds = tuple(int(s) for s in args.seeds.split(","))

    rows: dict[tuple[str, str], dict] = {}
    for task in tasks:
        for method in methods:
            folder = args.out / "runs" / method / task
            f = folder / "summary.json"
            if f.exists() and json.loads(f.read_text()).get("seeds") == list(seeds):
                s = json.loads(f.read_text())
            else:
                s = base_to_new(method, task, shots=args.shots, seeds=seeds,
                                options=equal_call_options(method, args.api_calls), out=folder, progress=False)
            m = s["mean"]
            print(f"{method:9s} {task:14s} base {100 * m['base']:5.1f}  new {100 * m['new']:5.1f}  H {100 * m['H']:5.1f}",
                  flush=True)
            rows[(method, task)] = m

    lines = [f"Base-to-new: test accuracy (%) on base / new classes and their harmonic mean H, {args.shots} shots, "
             f"seeds {args.seeds}; black-box methods at {args.api_calls} api_calls, CoOp white-box.", "",
             "| method | " + " | ".join(f"{t} base / new / H" for t in tasks) + " | mean H |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for method in methods:
        cells = [f"{100 * rows[(method, t)]['base']:.1f} / {100 * rows[(method, t)]['new']:.1f} / "
                 f"**{100 * rows[(method, t)]['H']:.1f}**" for t in tasks]
        mh = statistics.mean(rows[(method, t)]["H"] for t in tasks)
        lines.append(f"| {label(method)} | " + " | ".join(cells) + f" | {100 * mh:.1f} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
