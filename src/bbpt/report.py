"""``bbpt report DIR``: every finished run under DIR, grouped, with intervals over seeds.

Per method × dataset (× shots): mean ± std over seeds and a 95 % confidence interval
(Student's t, n − 1 degrees of freedom); accuracy-vs-api_calls curves with a band of ±1 std
over seeds; and, with ``compare=("a", "b")``, the paired difference a − b per dataset over
the seeds both have, with its interval. Written as ``report.md`` and one self-contained
``report.html`` (plots inline as PNG data URIs).
"""
from __future__ import annotations

import base64
import io
import json
import math
import statistics
from pathlib import Path

from .errors import BadInput

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


def collect(root: str | Path) -> list[dict]:
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"report folder {root} does not exist; pass the --out of a sweep or of bench runs")
    out = []
    for f in sorted(root.rglob("result.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if r.get("status") == "finished" and (r.get("accuracy") or {}).get("test") is not None:
            r["_folder"] = str(f.parent)
            out.append(r)
    if not out:
        raise BadInput(f"no finished runs (result.json with status finished) under {root}")
    return out


def group(results: list[dict]) -> dict[tuple, list[dict]]:
    """(method, dataset, shots, options-without-seed) -> runs, one per seed."""
    g: dict[tuple, list[dict]] = {}
    for r in results:
        opts = json.dumps(r["config"]["options"], sort_keys=True)
        key = (r["method"], r["dataset"], r["shots"], opts)
        g.setdefault(key, []).append(r)
    return g


def _fmt(iv: dict) -> str:
    if iv["std"] is None:
        return f"{iv['mean']:.1f} (n=1)"
    lo, hi = iv["ci95"]
    return f"{iv['mean']:.1f} ± {iv['std']:.1f} [{lo:.1f}, {hi:.1f}]"


def build(root: str | Path, compare: tuple[str, str] | None = None) -> dict:
    results = collect(root)
    groups = group(results)
    variants: dict[tuple, int] = {}
    rows = []
    for (method, dataset, shots, opts), rs in sorted(groups.items()):
        k = (method, dataset, shots)
        variants[k] = variants.get(k, 0) + 1
        accs = [100 * r["accuracy"]["test"] for r in rs]
        rows.append({"method": method, "dataset": dataset, "shots": shots, "options": json.loads(opts),
                     "seeds": sorted(r["seed"] for r in rs), "test": interval(accs),
                     "api_calls": statistics.mean(r["queries"]["api_calls"] for r in rs), "runs": rs})
    for row in rows:  # a method run with several option sets is labelled by what differs
        if variants[(row["method"], row["dataset"], row["shots"])] > 1:
            row["label"] = row["method"] + " " + _diff_label(row, rows)
        else:
            row["label"] = row["method"]
    paired = []
    if compare:
        a, b = compare
        for dataset in sorted({r["dataset"] for r in rows}):
            ra = [r for r in rows if r["method"] == a and r["dataset"] == dataset]
            rb = [r for r in rows if r["method"] == b and r["dataset"] == dataset]
            if len(ra) != 1 or len(rb) != 1:
                continue
            sa = {x["seed"]: 100 * x["accuracy"]["test"] for x in ra[0]["runs"]}
            sb = {x["seed"]: 100 * x["accuracy"]["test"] for x in rb[0]["runs"]}
            common = sorted(set(sa) & set(sb))
            if common:
                paired.append({"dataset": dataset, "seeds": common, "diff": interval([sa[s] - sb[s] for s in common])})
    return {"root": str(root), "rows": rows, "compare": list(compare) if compare else None, "paired": paired}


def _diff_label(row: dict, rows: list[dict]) -> str:
    others = [r for r in rows if (r["method"], r["dataset"], r["shots"]) == (row["method"], row["dataset"], row["shots"])]
    keys = sorted(k for k in row["options"] if len({json.dumps(r["options"].get(k)) for r in others}) > 1)
    return "(" + ", ".join(f"{k}={row['options'][k]}" for k in keys) + ")"


def markdown(rep: dict) -> str:
    rows = rep["rows"]
    datasets = sorted({r["dataset"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = [f"Test accuracy (%), mean ± std over seeds [95 % CI, Student t]; runs under {rep['root']}.", "",
             "| method | " + " | ".join(datasets) + " | api_calls |", "|---|" + "---|" * (len(datasets) + 1)]
    for lab in labels:
        cells, calls = [], []
        for d in datasets:
            r = next((r for r in rows if r["label"] == lab and r["dataset"] == d), None)
            cells.append(_fmt(r["test"]) if r else "-")
            if r:
                calls.append(r["api_calls"])
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {statistics.mean(calls):.0f} |")
    if rep["paired"]:
        a, b = rep["compare"]
        lines += ["", f"Paired difference {a} − {b} (points, over the seeds both have):", "",
                  "| dataset | seeds | difference [95 % CI] | holds |", "|---|---|---|---|"]
        for p in rep["paired"]:
            iv = p["diff"]
            holds = "-" if iv["ci95"] is None else ("yes" if iv["ci95"][0] > 0 else "no" if iv["ci95"][1] < 0 else "unclear")
            lines.append(f"| {p['dataset']} | {','.join(map(str, p['seeds']))} | {_fmt(iv)} | {holds} |")
    return "\n".join(lines) + "\n"


def curve_png(rows: list[dict], dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for r in (r for r in rows if r["dataset"] == dataset):
        curves = [c["curve"] for c in r["runs"] if c.get("curve")]
        n = min(len(c) for c in curves)
        x = np.array([curves[0][i]["api_calls"] for i in range(n)])
        y = np.array([[100 * c[i]["val_accuracy"] for i in range(n)] for c in curves])
        m = y.mean(0)
        ax.plot(x, m, label=r["label"])
        if len(curves) > 1:
            sd = y.std(0, ddof=1)
            ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("api_calls")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(f"{dataset}: mean over seeds, band ±1 std")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html(rep: dict, md: str) -> str:
    import html as h

    parts = [f"<h1>bbpt report</h1><pre>{h.escape(md)}</pre>"]
    for d in sorted({r["dataset"] for r in rep["rows"]}):
        b64 = base64.b64encode(curve_png(rep["rows"], d)).decode()
        parts.append(f"<h2>{h.escape(d)}</h2><img alt='curve {h.escape(d)}' src='data:image/png;base64,{b64}'>")
    return "<!doctype html><html><head><meta charset='utf-8'><title>bbpt report</title></head><body>" + "".join(parts) + \
        "</body></html>\n"


def report(root: str | Path, compare: tuple[str, str] | None = None, out: str | Path | None = None) -> dict:
    rep = build(root, compare)
    md = markdown(rep)
    out = Path(out) if out is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(html(rep, md))
    rep["markdown"], rep["out"] = md, str(out)
    return rep
