"""Before and after a change to the methods: every README sweep's runs as committed at an
earlier revision against the same grid now, for the methods whose runs changed (their
configuration hashes differ: an option, a default or a method's revision), with the orderings
the sweeps compare and which of them flipped.

    python bench/before_after.py --before fa76b33      # writes bench/results/sweeps/before_after/report.md

The README block `<!-- report: before_after -->` is that file (bench/readme_tables.py).
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ["seed_methods", "zip_comparison", "base_to_new", "seed_methods_augment"]


def old_grid(rev: str, out: str, into: Path) -> Path:
    """The sweep's committed result.json files at ``rev``, unpacked under ``into``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, out], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(into, filter="data")
    return into / out


def cell(iv: dict | None) -> str:
    if iv is None:
        return "-"
    if iv["ci95"] is None:
        return f"{iv['mean']:.1f} (n={iv['n']})"
    lo, hi = iv["ci95"]
    return f"{iv['mean']:.1f} [{lo:.1f}, {hi:.1f}]"


def diff(old_runs: list[dict], new_runs: list[dict], metric) -> dict | None:
    from bbpt.report import interval

    a = {r["seed"]: metric(r) for r in old_runs}
    b = {r["seed"]: metric(r) for r in new_runs}
    seeds = sorted(set(a) & set(b))
    return interval([b[s] - a[s] for s in seeds]) if seeds else None


def verdict(p: dict | None) -> str:
    from bbpt.report import holds

    if p is None:
        return "-"
    return f"{p['diff']['mean']:+.1f} {holds(p['diff'])}"


def one_sweep(name: str, rev: str, tmp: Path) -> list[str]:
    from bbpt.report import _h, _test, build
    from bbpt.sweep import expand, load_sweep

    spec = load_sweep(ROOT / "bench" / "sweeps" / f"{name}.toml")
    out = spec["out"]
    compare = [tuple(x.split(",")) for x in spec.get("report", {}).get("compare", [])] or None
    folders = [f for _, f in expand(spec, ROOT / out)]
    old_root = old_grid(rev, out, tmp / name)
    old_folders = {p.parent.name for p in old_root.rglob("result.json")}
    changed = sorted({f.parent.parent.name for f in folders if f.name not in old_folders}, key=spec["methods"].index)
    new = build(ROOT / out, compare, spec["methods"], spec["datasets"], folders)
    old = build(old_root, compare, spec["methods"], spec["datasets"])
    metric = _h if new["metric"] == "H" else _test
    key = "b2n" if new["metric"] == "H" else "test"
    iv = (lambda r: r["b2n"]["H"]) if key == "b2n" else (lambda r: r["test"])
    ds = old["datasets"]
    lines = [f"**{name}** ({'H' if key == 'b2n' else 'test accuracy'}, %; before → after, mean [95 % CI] over "
             f"seeds 1-3; Δ: paired over the seeds both have)", "",
             "| method | " + " | ".join(ds) + " |", "|---|" + "---|" * len(ds)]
    for m in changed:
        cells = []
        for d in ds:
            o = next((r for r in old["rows"] if (r["method"], r["dataset"]) == (m, d)), None)
            n = next((r for r in new["rows"] if (r["method"], r["dataset"]) == (m, d)), None)
            if o is None and n is None:
                cells.append("-")
                continue
            p = diff(o["runs"], n["runs"], metric) if o and n else None
            pend = "" if n and len(n["runs"]) == len(spec["seeds"]) else f" ({0 if n is None else len(n['runs'])} of {len(spec['seeds'])} rerun)"
            dtxt = "" if p is None else f", Δ {p['mean']:+.1f}" + (f" [{p['ci95'][0]:.1f}, {p['ci95'][1]:.1f}]" if p["ci95"] else "")
            cells.append(f"{cell(iv(o)) if o else '-'} → {cell(iv(n)) if n else 'pending'}{dtxt}{pend}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if not changed:
        lines.append("| (no method's runs changed) |" + " |" * len(ds))
    pairs = {(p["a"], p["b"]): p for p in old["paired"]}
    flips, rows = [], []
    for p in new["paired"]:
        q = pairs.get((p["a"], p["b"]))
        if q is None or not ({p["a"], p["b"]} & set(changed)):
            continue
        before = {x["dataset"]: x for x in q["datasets"] + ([q["average"]] if q["average"] else [])}
        for x in p["datasets"] + ([p["average"]] if p["average"] else []):
            b = before.get(x["dataset"])
            vb, va = verdict(b), verdict(x)
            flip = b is not None and vb.split()[-1] != va.split()[-1]
            rows.append(f"| {p['a']} − {p['b']} | {x['dataset']} | {vb} | {va} | {'**flipped**' if flip else ''} |")
            if flip:
                flips.append(f"{p['a']} − {p['b']} on {x['dataset']}: {vb} → {va}")
    if rows:
        lines += ["", "Orderings the sweep compares (A − B, points; holds at 95 %: yes / no / unclear):", "",
                  "| A − B | task | before | after | |", "|---|---|---|---|---|", *rows]
    lines += ["", f"Flipped: {'; '.join(flips) if flips else 'none'}.", ""]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the git revision whose committed results are 'before'")
    ap.add_argument("--sweeps", nargs="*", default=SWEEPS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweeps" / "before_after"))
    args = ap.parse_args(argv)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True, text=True,
                         check=True).stdout.strip()
    lines = [f"Before: the results committed at {rev}; after: this checkout's. Only methods whose runs changed "
             "are listed.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sweeps:
            lines += one_sweep(name, rev, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"{out / 'report.md'}: {len(args.sweeps)} sweeps against {rev}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
