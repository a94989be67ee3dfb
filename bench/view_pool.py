"""Benchmark: how large the seeded view pool must be to match fresh views.

ZIP (a fresh view per query batch in the official code) at 16 shots and its 5000 api_calls,
on the offline tasks, with training views drawn from a pool of K views per image
(``view_pool=K``, each view encoded once) against ``view_pool=0`` (a new view every draw,
never cached: the official loaders) and against no augmentation (``augment=false``).

    python bench/view_pool.py                          # K = 1, 4, 16, 64; fresh; none
    python bench/view_pool.py --pools 4,16 --tasks shapes --seeds 1 --api-calls 1000

Writes under --out (default bench/results/view_pool): runs/<setting>/<task>/seed<k>/ and
table.md: test accuracy (mean ± std over seeds), the mean paired difference to fresh views
with its spread, and wall seconds per run.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bbpt.engine import make_run_config, run


def settings(pools: list[int]) -> dict[str, dict]:
    out = {"none": {"augment": False}}
    out.update({f"pool {k}": {"augment": True, "view_pool": k} for k in pools})  # on: the offline tasks default off
    out["fresh"] = {"augment": True, "view_pool": 0}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="zip")
    ap.add_argument("--pools", default="1,4,16,64")
    ap.add_argument("--tasks", default="mnist,fashion-mnist,animal-mnist,shapes")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--api-calls", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/view_pool"))
    args = ap.parse_args(argv)
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    grid = settings([int(k) for k in args.pools.split(",")])

    res: dict[tuple[str, str, int], dict] = {}
    for task in tasks:
        for seed in seeds:
            for name, opts in grid.items():
                cfg = make_run_config(method=args.method, dataset=task, seed=seed,
                                      options={"budget": args.api_calls, **opts})
                r = run(cfg, out=args.out / "runs" / name.replace(" ", "") / task / f"seed{seed}", progress=False,
                        keep_finished=True)
                res[(name, task, seed)] = r
                print(f"{name:8s} {task:13s} seed {seed}: test {100 * r.accuracy.test:5.1f}%  "
                      f"{r.wall_seconds:6.1f}s", flush=True)

    def acc(name, task, seed):
        return 100 * res[(name, task, seed)].accuracy.test

    lines = [f"{args.method}, 16 shots, {args.api_calls} api_calls, seeds {args.seeds}: test accuracy (%, mean ± std "
             "over seeds), the paired difference to fresh views over every task and seed (mean ± std, points), "
             "and wall seconds per run (mean). A pool of K encodes at most N·K views (N = 160 images); fresh views "
             "re-encode every image of every query.", "",
             "| views | " + " | ".join(tasks) + " | average | Δ vs fresh | wall s |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for name in grid:
        cells = []
        for t in tasks:
            xs = [acc(name, t, s) for s in seeds]
            cells.append(f"{statistics.mean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""))
        all_ = [acc(name, t, s) for t in tasks for s in seeds]
        diff = [acc(name, t, s) - acc("fresh", t, s) for t in tasks for s in seeds]
        rs = [res[(name, t, s)] for t in tasks for s in seeds]
        wall = statistics.mean(r.wall_seconds for r in rs)
        d = "-" if name == "fresh" else f"{statistics.mean(diff):+.1f} ± {statistics.stdev(diff) if len(diff) > 1 else 0:.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(all_):.1f} | {d} | {wall:.1f} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
