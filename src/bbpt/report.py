"""``bbpt report DIR``: every finished run under DIR, grouped, with intervals over seeds.

Per method × dataset (× shots): mean ± std over seeds and a 95 % confidence interval
(Student's t, n − 1 degrees of freedom); accuracy-vs-api_calls curves with a band of ±1 std
over seeds; base / new / H for base-to-new runs; and for each ``compare`` pair ("a", "b"),
the paired difference a − b per dataset and on average over the seeds both have, with its
interval, and the api_calls at which a's mean validation curve first reaches b's final
mean validation accuracy. A run bbpt refused (status "failed") shows as "failed" in its cell,
with its one-line error listed under the table. Written as ``report.md`` and one self-contained
``report.html`` (plots inline as PNG data URIs), with each plot also as ``curve_<dataset>.png``.
"""
from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path

from .errors import BadInput
from .run_result import RunResult

# two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30; beyond, the normal's 1.96
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def interval(xs: list[float]) -> dict:
    """mean, sample std, and the 95 % t interval of the mean (None with one value)."""
    n, m = len(xs), statistics.mean(xs)
    if n < 2:
        return {"n": n, "mean": m, "std": None, "ci95": None}
    sd = statistics.stdev(xs)
    h = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "std": sd, "ci95": [m - h, m + h]}


def collect(root: str | Path, folders: list[Path] | None = None,
            failed: list[RunResult] | None = None) -> list[RunResult]:
    """Finished runs under root; with folders, only those runs' result.json (a sweep file's grid).
    failed: a list that receives the runs bbpt refused (status "failed", with their one-line error)."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"report folder {root} does not exist; pass the --out of a sweep or of bench runs")
    out = []
    files = sorted(root.rglob("result.json")) if folders is None else [Path(f) / "result.json" for f in folders]
    for f in files:
        try:
            r = RunResult.load(f)
        except (OSError, ValueError):  # not JSON, or not a run's result (pydantic's ValidationError is a ValueError)
            continue
        if r.status == "finished" and r.test_accuracy is not None:
            out.append(r)
        elif r.status == "failed" and failed is not None:
            failed.append(r)
    if not out:
        raise BadInput(f"no finished runs (result.json with status finished) under {root}")
    return out


def _failures(failed: list[RunResult], given: dict[str, str]) -> list[dict]:
    """Failed runs grouped by (method, column, error): {"method", "dataset", "seeds", "error"}.
    given maps a finished run's task name to the sweep's (mnist-base -> mnist); a failed run
    records the sweep's name, so it is put in the column of the runs that did finish there."""
    column = {v: k for k, v in given.items()}
    out: dict[tuple, dict] = {}
    for r in failed:
        d, error = column.get(r.dataset, r.dataset), r.error or ""
        g = out.setdefault((r.method, d, error), {"method": r.method, "dataset": d, "seeds": [], "error": error})
        g["seeds"].append(r.seed)
    return [{**g, "seeds": sorted(g["seeds"])} for g in out.values()]


def group(results: list[RunResult]) -> dict[tuple, list[RunResult]]:
    """(method, dataset, shots, options-without-seed) -> runs, one per seed."""
    g: dict[tuple, list[RunResult]] = {}
    for r in results:
        opts = json.dumps(r.config["options"], sort_keys=True)
        key = (r.method, r.dataset, r.shots, opts)
        g.setdefault(key, []).append(r)
    return g


def interval_text(iv: dict) -> str:
    if iv["std"] is None:
        return f"{iv['mean']:.1f} (n=1)"
    lo, hi = iv["ci95"]
    return f"{iv['mean']:.1f} ± {iv['std']:.1f} [{lo:.1f}, {hi:.1f}]"


def _pairs(compare, methods: list[str]) -> list[tuple[str, str]]:
    """("a", "b") pairs; "*" on one side stands for every other method (e.g. "*,zeroshot")."""
    out = []
    for a, b in compare or []:
        for x in (methods if a == "*" else [a]):
            for y in (methods if b == "*" else [b]):
                if x != y and (x, y) not in out:
                    out.append((x, y))
    return out


def _mean_curve(row: dict) -> tuple[list[float], list[float]]:
    curves = [c.curve for c in row["runs"] if c.curve]
    if not curves:
        return [], []
    n = min(len(c) for c in curves)
    return ([curves[0][i].api_calls for i in range(n)],
            [statistics.mean(100 * c[i].val_accuracy for c in curves) for i in range(n)])


def reach(a: dict, b: dict) -> dict | None:
    """Where a's mean validation curve first reaches b's final mean validation accuracy:
    {"at": api_calls or None (never), "b_spent": b's api_calls}."""
    xa, ya = _mean_curve(a)
    xb, yb = _mean_curve(b)
    if not ya or not yb:
        return None
    at = next((x for x, y in zip(xa, ya) if y >= yb[-1]), None)
    return {"at": at, "b_spent": xb[-1], "target": yb[-1]}


def _paired(ra: dict, rb: dict, metric) -> dict | None:
    sa = {x.seed: metric(x) for x in ra["runs"]}
    sb = {x.seed: metric(x) for x in rb["runs"]}
    common = sorted(set(sa) & set(sb))
    return {"seeds": common, "diff": interval([sa[s] - sb[s] for s in common])} if common else None


def _test(r: RunResult) -> float:
    return 100 * r.accuracy.test


def _h(r: RunResult) -> float:
    return 100 * r.base_to_new["H"]


def _rank(order: list[str] | None):
    """Sort key: the sweep file's order first (methods as listed), the rest alphabetically."""
    pos = {x: i for i, x in enumerate(order or [])}
    return lambda x: (pos.get(x, len(pos)), x)


def build(root: str | Path, compare: list[tuple[str, str]] | tuple[str, str] | None = None,
          methods: list[str] | None = None, datasets: list[str] | None = None,
          folders: list[Path] | None = None) -> dict:
    """methods / datasets: the order of rows and columns (a sweep file's lists); others follow,
    sorted. folders: read only these runs (a sweep file's grid), not every result.json under root."""
    failed: list[RunResult] = []
    results = collect(root, folders, failed)
    if compare and isinstance(compare[0], str):
        compare = [tuple(compare)]
    groups = group(results)
    variants: dict[tuple, int] = {}
    rows = []
    mkey, dkey = _rank(methods), _rank(datasets)
    for (method, dataset, shots, opts), rs in sorted(groups.items(), key=lambda kv: (mkey(kv[0][0]), kv[0][1:])):
        k = (method, dataset, shots)
        variants[k] = variants.get(k, 0) + 1
        row = {"method": method, "dataset": dataset, "shots": shots, "options": json.loads(opts),
               "seeds": sorted(r.seed for r in rs), "test": interval([_test(r) for r in rs]),
               "api_calls": statistics.mean(r.queries["api_calls"] for r in rs), "runs": rs}
        if all(r.base_to_new is not None for r in rs):
            row["b2n"] = {k: interval([100 * r.base_to_new[k] for r in rs]) for k in ("base", "new", "H")}
        rows.append(row)
    for row in rows:  # a method run with several option sets is labelled by what differs
        if variants[(row["method"], row["dataset"], row["shots"])] > 1:
            row["label"] = row["method"] + " " + _diff_label(row, rows)
        else:
            row["label"] = row["method"]
    # columns ranked by the name the sweep file gives (a run records its task's name: mnist-base, a folder's basename)
    given = {r.dataset: (r.config or {}).get("dataset", r.dataset) for r in results}
    failures = _failures(failed, given)
    datasets = sorted({r["dataset"] for r in rows} | {f["dataset"] for f in failures}, key=lambda d: dkey(given.get(d, d)))
    b2n = all("b2n" in r for r in rows)
    metric = _h if b2n else _test
    paired = []
    for a, b in _pairs(compare, list(dict.fromkeys(r["method"] for r in rows))):
        per, by_seed = [], {}
        for dataset in datasets:
            ra = [r for r in rows if r["method"] == a and r["dataset"] == dataset]
            rb = [r for r in rows if r["method"] == b and r["dataset"] == dataset]
            if len(ra) != 1 or len(rb) != 1:
                continue
            p = _paired(ra[0], rb[0], metric)
            if p is None:
                continue
            per.append({"dataset": dataset, **p, "reach": reach(ra[0], rb[0])})
            for x in ra[0]["runs"]:
                y = next((y for y in rb[0]["runs"] if y.seed == x.seed), None)
                if y is not None:
                    by_seed.setdefault(x.seed, {})[dataset] = metric(x) - metric(y)
        if not per:
            continue
        full = [s for s, d in sorted(by_seed.items()) if len(d) == len(datasets)]
        average = ({"dataset": "average", "seeds": full, "diff": interval([statistics.mean(by_seed[s].values()) for s in full])}
                   if len(datasets) > 1 and full and len(per) == len(datasets) else None)
        paired.append({"a": a, "b": b, "datasets": per, "average": average})
    subset = [r for r in results if r.test_subset]  # evaluated on part of the test split (--test-subset)
    return {"root": str(root), "rows": rows, "datasets": datasets, "compare": [list(p) for p in compare or []],
            "paired": paired, "metric": "H" if b2n else "test", "finished": len(results), "failed": failures,
            "planned": None if folders is None else len(folders),
            "test_subset": sorted({r.test_subset.n for r in subset}), "test_subset_runs": len(subset)}


def against(rep: dict, base: dict, name: str) -> dict:
    """Each row of rep against the baseline sweep's row of the same method, task and shots:
    the paired difference (this − baseline) in rep's metric over the seeds both have, per
    task and, where every task has one, on average over tasks per seed."""
    metric = _h if rep["metric"] == "H" else _test
    out = []
    for label in dict.fromkeys(r["label"] for r in rep["rows"]):
        mine = {r["dataset"]: r for r in rep["rows"] if r["label"] == label}
        cells, by_seed = {}, {}
        for d, r in mine.items():
            other = [b for b in base["rows"] if (b["method"], b["dataset"], b["shots"]) == (r["method"], d, r["shots"])]
            p = _paired(r, other[0], metric) if len(other) == 1 else None
            if p is None:
                continue
            was = statistics.mean(metric(x) for x in other[0]["runs"] if x.seed in p["seeds"])
            cells[d] = {**p, "baseline": was, "now": was + p["diff"]["mean"]}
            for x in r["runs"]:
                y = next((y for y in other[0]["runs"] if y.seed == x.seed), None)
                if y is not None:
                    by_seed.setdefault(x.seed, {})[d] = (metric(y), metric(x))
        if not cells:
            continue
        full = [s for s, v in sorted(by_seed.items()) if len(v) == len(rep["datasets"]) == len(cells)]
        avg = None
        if full and len(rep["datasets"]) > 1:
            diffs = [statistics.mean(n - b for b, n in by_seed[s].values()) for s in full]
            was = statistics.mean(statistics.mean(b for b, _ in by_seed[s].values()) for s in full)
            avg = {"seeds": full, "diff": interval(diffs), "baseline": was, "now": was + statistics.mean(diffs)}
        out.append({"label": label, "datasets": cells, "average": avg})
    return {"name": name, "rows": out}


def holds(iv: dict) -> str:
    """At 95 %: "yes" (interval above 0), "no" (below), "unclear" (covers 0), "-" (one seed)."""
    if iv["ci95"] is None:
        return "-"
    return "yes" if iv["ci95"][0] > 0 else "no" if iv["ci95"][1] < 0 else "unclear"


def _diff_label(row: dict, rows: list[dict]) -> str:
    others = [r for r in rows if (r["method"], r["dataset"], r["shots"]) == (row["method"], row["dataset"], row["shots"])]
    keys = sorted(k for k in row["options"] if len({json.dumps(r["options"].get(k)) for r in others}) > 1)
    return "(" + ", ".join(f"{k}={row['options'][k]}" for k in keys) + ")"


def grid(rep: dict) -> list[dict]:
    """The method × dataset table as data, one entry per row label: "cells", per dataset its row of
    rep["rows"], "failed" (bbpt refused every run there) or None; "complete" (a row on every dataset,
    so an average exists); "calls", the api_calls spent (per dataset, mean over seeds) as text."""
    rows, datasets = rep["rows"], rep["datasets"]
    failed = {(f["method"], f["dataset"]) for f in rep.get("failed", [])}
    out = []
    for lab in dict.fromkeys([r["label"] for r in rows] + [f["method"] for f in rep.get("failed", [])]):
        mine = {r["dataset"]: r for r in rows if r["label"] == lab}
        method = next((r["method"] for r in mine.values()), lab)
        spent = sorted({round(r["api_calls"]) for r in mine.values()})
        out.append({"label": lab, "complete": len(mine) == len(datasets),
                    "cells": [mine[d] if d in mine else "failed" if (method, d) in failed else None for d in datasets],
                    "calls": "-" if not spent else f"{spent[0]}" if len(spent) == 1 else f"{spent[0]}-{spent[-1]}"})
    return out


def _table(rep: dict, cell, avg_of, title: str) -> list[str]:
    datasets = rep["datasets"]
    head = "| method | " + " | ".join(datasets) + (" | average" if len(datasets) > 1 else "") + " | api_calls spent |"
    lines = [title, "", head, "|---|" + "---|" * (len(datasets) + 1 + (len(datasets) > 1))]
    for g in grid(rep):
        cells = [cell(c) if isinstance(c, dict) else c or "-" for c in g["cells"]]
        if len(datasets) > 1:
            cells.append(f"{statistics.mean(avg_of(c) for c in g['cells']):.1f}" if g["complete"] else "-")
        lines.append(f"| {g['label']} | " + " | ".join(cells) + f" | {g['calls']} |")
    return lines


def captions(rep: dict) -> dict[str, str]:
    """The text above each table (inline markdown: **bold**, `code`), shared by report.md and report.html."""
    what = "Test-subset accuracy" if rep.get("test_subset_runs") else "Test accuracy"
    m = "H" if rep["metric"] == "H" else "test accuracy"
    done = ""
    if rep["planned"]:
        n_failed = sum(len(f["seeds"]) for f in rep.get("failed", []))
        done = f" ({rep['finished']} of the sweep's {rep['planned']} runs finished" + (f", {n_failed} failed" if n_failed
                                                                                         else "") + ")"
    out = {"accuracy": f"{what} (%), mean ± std over seeds [95 % CI, Student t]; runs under {rep['root']}{done}."
           + (" Base-to-new runs: the base classes." if rep["metric"] == "H" else ""),
           "failed": "Failed runs (`failed` in a cell: bbpt refused the run with this error, and the refused query was "
                     "not charged):",
           "b2n": "Base-to-new: base / new / H (%), mean over seeds; H ± std [95 % CI]; average: mean H.",
           "paired": f"Paired differences A − B in {m} (points, over the seeds both have), with where A's mean "
                     "validation curve first reaches B's final mean validation accuracy:"}
    if rep.get("test_subset_runs"):  # the warning a report on --test-subset runs carries, as the runs print it
        out["subset"] = (f"**Not comparable to full-test numbers**: {rep['test_subset_runs']} of these {rep['finished']} "
                         "runs were evaluated on a seeded, stratified subset of the test split (--test-subset "
                         f"{', '.join(map(str, rep['test_subset']))} images), not the whole split.")
    if rep.get("against"):
        out["against"] = (f"Against {rep['against']['name']} (the same method, task and seeds there): {m}, baseline → "
                          "this sweep (difference [95 % CI], paired over seeds):")
    return out


def failure_text(f: dict) -> str:
    return f"{f['method']} on {f['dataset']}, seed{'s' if len(f['seeds']) > 1 else ''} {','.join(map(str, f['seeds']))}: " \
        f"{f['error']}"


def b2n_text(r: dict) -> str:
    b, n, hm = (r["b2n"][k] for k in ("base", "new", "H"))
    return f"{b['mean']:.1f} / {n['mean']:.1f} / **{interval_text(hm)}**"


def against_text(q: dict | None) -> str:
    """A cell of the baseline table: baseline → now (difference [95 % CI])."""
    if q is None:
        return "-"
    ci = q["diff"]["ci95"]
    return f"{q['baseline']:.1f} → {q['now']:.1f} ({q['diff']['mean']:+.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}])" if ci
                                                                                else ", n=1)")


def reach_text(r: dict | None) -> str:
    """api_calls at which A reaches B's final validation accuracy (B's spend)."""
    if r is None:
        return "-"
    return f"{r['at']:.0f} ({r['b_spent']:.0f})" if r["at"] is not None else f"never ({r['b_spent']:.0f})"


def markdown(rep: dict) -> str:
    cap = captions(rep)
    lines = [cap["subset"], ""] if "subset" in cap else []
    lines += _table(rep, lambda r: interval_text(r["test"]), lambda r: r["test"]["mean"], cap["accuracy"])
    if rep.get("failed"):  # why a cell says "failed": the run's one-line refusal
        lines += ["", cap["failed"], ""] + [f"- {failure_text(f)}" for f in rep["failed"]]
    if rep["metric"] == "H":
        lines += [""] + _table(rep, b2n_text, lambda r: r["b2n"]["H"]["mean"], cap["b2n"])
    if rep.get("against") and rep["against"]["rows"]:
        ds = rep["datasets"]
        lines += ["", cap["against"], "", "| method | " + " | ".join(ds) + (" | average" if len(ds) > 1 else "") + " |",
                  "|---|" + "---|" * (len(ds) + (len(ds) > 1))]
        for r in rep["against"]["rows"]:
            cells = [against_text(r["datasets"].get(d)) for d in ds] + ([against_text(r["average"])] if len(ds) > 1 else [])
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if rep["paired"]:
        lines += ["", cap["paired"], "",
                  "| A − B | dataset | seeds | difference [95 % CI] | holds | A reaches B's final val at (B spent) |",
                  "|---|---|---|---|---|---|"]
        for p in rep["paired"]:
            for q in p["datasets"] + ([p["average"]] if p["average"] else []):
                lines.append(f"| {p['a']} − {p['b']} | {q['dataset']} | {','.join(map(str, q['seeds']))} | "
                             f"{interval_text(q['diff'])} | {holds(q['diff'])} | {reach_text(q.get('reach'))} |")
    return "\n".join(lines) + "\n"


def curve_png(rows: list[dict], dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=110)
    for r in (r for r in rows if r["dataset"] == dataset):
        curves = [c.curve for c in r["runs"] if c.curve]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = np.array([curves[0][i].api_calls for i in range(n)])
        y = np.array([[100 * c[i].val_accuracy for i in range(n)] for c in curves])
        m = y.mean(0)
        if r["api_calls"] == 0:  # no training (zero-shot): its accuracy as a level across the plot
            ax.axhline(m[0], ls="--", lw=1, color="black", label=r["label"])
            continue
        ax.plot(x, m, label=r["label"], marker="o" if n == 1 else None)
        if len(curves) > 1:
            sd = y.std(0, ddof=1)
            ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    ax.set_xscale("symlog", linthresh=100)  # budgets span 10^3-10^5 api_calls; 0 stays on the axis
    ax.set_xlabel("api_calls (log beyond 100)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(f"{dataset}: mean over seeds, band ±1 std")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not over them
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report(root: str | Path, compare=None, out: str | Path | None = None) -> dict:
    """root: a folder of runs, or a sweep file (FILE.toml: exactly its grid's runs, read from its
    `out`, in its order). compare: ("a", "b") or a list of pairs; None takes the sweep file's
    [report] compare (for a folder, from ROOT/sweep.json, which `bbpt sweep` writes)."""
    folders = None
    if str(root).endswith(".toml"):
        from .sweep import DEFAULT_OUT, expand, load_sweep

        spec = load_sweep(root)
        file, root = root, spec.get("out", DEFAULT_OUT)  # where `bbpt sweep FILE` puts it
        if not Path(root).is_dir():
            raise BadInput(f"sweep file {file}: its out folder {root} does not exist; run `bbpt sweep {file}` first "
                           "(or pass the --out folder you swept into)")
        folders = [f for _, f in expand(spec, root)]
    else:
        try:
            spec = json.loads((Path(root) / "sweep.json").read_text())["spec"]
        except (OSError, ValueError, KeyError):
            spec = {}
    if compare is None:
        compare = [tuple(x.split(",")) for x in spec.get("report", {}).get("compare", [])] or None
    rep = build(root, compare, spec.get("methods"), spec.get("datasets"), folders)
    base = spec.get("report", {}).get("baseline")
    if base:  # the same runs under another sweep's options (e.g. without training views)
        from .sweep import DEFAULT_OUT, expand, load_sweep

        bspec = load_sweep(base)  # a path as `out` is: relative to where bbpt runs (the repository)
        bout = bspec.get("out", DEFAULT_OUT)
        if not Path(bout).is_dir():
            raise BadInput(f"report.baseline {base}: its out folder {bout} does not exist; run `bbpt sweep {base}` first")
        brep = build(bout, None, bspec.get("methods"), bspec.get("datasets"), [f for _, f in expand(bspec, bout)])
        rep["against"] = against(rep, brep, Path(base).stem)
    md = markdown(rep)
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    pngs = {d: curve_png(rep["rows"], d) for d in rep["datasets"]}
    for d, png in pngs.items():  # also as files, for pages that link images (a README)
        (out / f"curve_{d.replace('/', '_')}.png").write_bytes(png)
    from .report_html import page

    (out / "report.html").write_text(page(rep, pngs))
    rep["markdown"], rep["out"] = md, str(out)
    return rep
