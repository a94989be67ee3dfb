"""Benchmark: methods on every offline task, 16 shots, at their default budgets or all at
one api_call budget (ZIP's comparison: 5000 api_calls, CoOp as the white-box row).

    python bench/seed_methods.py                      # seed methods, default budgets (resumable)
    python bench/seed_methods.py --methods zip,bbt --tasks shapes --seeds 1
    python bench/seed_methods.py --api-calls 5000     # ZIP's comparison, all methods

Writes under --out (default bench/results/seed_methods):
  runs/<method>/<task>/seed<k>/result.json   one folder per run (bbpt's normal run output)
  table.md                                   mean ± std test accuracy, queries spent, wall seconds
  curve_<task>.png                           validation accuracy against api_calls, all methods
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bbpt.engine import make_run_config, run
from bbpt.results import plot_curves

DEFAULT_METHODS = "zeroshot,zosgd,bbt,zip,craft,sharpzo"
ALL_METHODS = "zeroshot,zosgd,bbt,zip,craft,sharpzo,bptvlm,blackvip,bar,coop"
BUDGET_FREE = ("zeroshot", "coop")  # no query budget: zero-shot, and the white-box reference


def equal_call_options(method: str, calls: int) -> dict:
    """Options putting ``method`` on a budget of ``calls`` api_calls (ZIP's comparison);
    BPT-VLM with ZIP's re-implementation settings."""
    if method in BUDGET_FREE:
        return {}
    return {"budget": calls, "budget_unit": "api_calls", **({"preset": "zip"} if method == "bptvlm" else {})}


def label(method: str) -> str:
    return f"{method} (white-box)" if method == "coop" else method
DEFAULT_TASKS = "mnist,fashion-mnist,animal-mnist,shapes"


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.mean(xs)
    if len(xs) == 1:  # one seed: no spread to report
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}"


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Average validation accuracy over seeds at the points all seeds share."""
    n = min(len(c) for c in curves)
    return [{"api_calls": curves[0][i]["api_calls"],
             "val_accuracy": statistics.mean(c[i]["val_accuracy"] for c in curves)} for i in range(n)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None, help=f"default: {DEFAULT_METHODS}; with --api-calls: {ALL_METHODS}")
    ap.add_argument("--api-calls", type=int, default=None, help="one budget in api_calls for every black-box method")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/seed_methods or zip_comparison")
    ap.add_argument("--augment", action="store_true", help="train every method on the papers' views "
                    "(augment=true; the offline tasks default to none)")
    ap.add_argument("--rerun", action="store_true", help="run again even where a finished run of the same configuration exists")
    args = ap.parse_args(argv)
    calls = args.api_calls
    methods = (args.methods or (ALL_METHODS if calls else DEFAULT_METHODS)).split(",")
    tasks = args.tasks.split(",")
    args.out = args.out or Path("bench/results/zip_comparison" if calls else "bench/results/seed_methods")
    seeds = [int(s) for s in args.seeds.split(",")]

    results: dict[tuple[str, str], list[dict]] = {}
    for task in tasks:
        for method in methods:
            for seed in seeds:
                folder = args.out / "runs" / method / task / f"seed{seed}"
                opts = equal_call_options(method, calls) if calls else {}
                if args.augment and method not in ("zeroshot", "bptvlm"):  # no training views: no images / official
                    opts = {**opts, "augment": True}
                cfg = make_run_config(method=method, dataset=task, shots=args.shots, seed=seed, options=opts)
                # a finished run of this very configuration is kept, an unfinished one resumes
                r = run(cfg, out=folder, progress=False, keep_finished=True, force=args.rerun)
                print(f"{method:9s} {task:14s} seed {seed}: test {100 * r['accuracy']['test']:5.1f}%  "
                      f"api_calls {r['queries']['api_calls']:6d}  {r['wall_seconds']:5.1f}s", flush=True)
                results.setdefault((method, task), []).append(r)

    budget = f"every black-box method at {calls} api_calls (CoOp: white-box, its own epochs)" if calls else "default budgets"
    if args.augment:
        budget += ", trained on the papers' views (augment=true)"
    spread = "mean ± std over seeds" if len(seeds) > 1 else "seed"
    lines = [f"Test accuracy (%), {spread} {args.seeds}, {args.shots} shots, {budget}; "
             "api_calls / prompt_evals spent in training (mean); wall seconds per run (mean / max).", "",
             "| method | " + " | ".join(tasks) + " | average | api_calls | prompt_evals | wall s |",
             "|---|" + "---|" * (len(tasks) + 4)]
    for method in methods:
        accs = [mean_std([r["accuracy"]["test"] for r in results[(method, t)]]) for t in tasks]
        avg = statistics.mean(r["accuracy"]["test"] for t in tasks for r in results[(method, t)])
        rs = [r for t in tasks for r in results[(method, t)]]
        spent = statistics.mean(r["queries"]["api_calls"] for r in rs)
        evals = statistics.mean(r["queries"]["prompt_evals"] for r in rs)
        walls = [r["wall_seconds"] for r in rs]
        extra = ""
        if "queries_total" in rs[0]:  # CraFT: the head's own queries, which the paper does not count
            extra = f" (+{statistics.mean(r['aux_queries']['prompt_evals'] for r in rs):.0f} head)"
        lines.append(f"| {label(method)} | " + " | ".join(accs) + f" | {100 * avg:.1f} | {spent:.0f} | {evals:.0f}{extra} | "
                     f"{statistics.mean(walls):.1f} / {max(walls):.1f} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table)
    for task in tasks:
        curves = {label(m): mean_curve([r["curve"] for r in results[(m, task)]]) for m in methods}
        if "coop" in methods:  # white-box: its x axis is not black-box queries; a reference line at its end
            curves[label("coop")] = curves[label("coop")][-1:]
        plot_curves(args.out / f"curve_{task}.png", curves,
                    f"{task}, {args.shots}-shot, " + (f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}")
                    + (f", {calls} api_calls each" if calls else ""))
    print(f"wrote {args.out}/table.md and curve_<task>.png", file=sys.stderr)


if __name__ == "__main__":
    main()
