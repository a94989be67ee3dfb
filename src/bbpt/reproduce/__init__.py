"""``bbpt reproduce``: a paper's table as one command.

The papers' numbers ship as data (``tables.toml``, each table with its source). A table
fixes the backbone, shots and seeds; each of its rows (one method) fixes the method
options, with per-dataset additions such as CraFT's official presets. ``reproduce`` runs
that configuration over the table's seeds on a CoOp data root (``bbpt data check``) with
:func:`bbpt.engine.run`, one resumable run folder per seed, and prints the paper's number
beside the measured mean ± std:

    bbpt reproduce zip --dataset oxford_pets --root $DATA            # ZIP's Result 1, seeds 1-3
    bbpt reproduce craft --dataset dtd --root $DATA --model RN50     # CraFT Table 1, its RN50 rows
    bbpt reproduce --list                                            # the shipped tables
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._compat import tomllib
from ..errors import BadInput

TABLES_FILE = Path(__file__).with_name("tables.toml")
# BlackVIP's extra datasets (split_mlai_*.json folders), not among CoOp's 11 of `data check`
EXTRA_FOLDERS = {"svhn": "SVHN", "resisc45": "Resisc45", "clevr": "CLEVR"}


@dataclass(frozen=True)
class Row:
    """One method's published numbers in a table, and the options that configure it."""

    method: str
    label: str
    accuracy: dict[str, float]  # dataset folder -> %
    average: float
    options: dict = field(default_factory=dict)
    per_dataset: dict[str, dict] = field(default_factory=dict)

    def options_for(self, dataset: str) -> dict:
        return {**self.options, **self.per_dataset.get(dataset, {})}


@dataclass(frozen=True)
class Table:
    id: str
    title: str
    source: str
    model: str
    pretrained: str
    shots: int
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    rows: dict[str, Row]


def load_tables(path: Path = TABLES_FILE) -> list[Table]:
    raw = tomllib.loads(path.read_text())
    out = []
    for t in raw["table"]:
        rows = {m: Row(m, r.get("label", m), dict(zip(t["datasets"], r["accuracy"])), r["average"],
                       r.get("options", {}), r.get("per_dataset", {})) for m, r in t["methods"].items()}
        out.append(Table(t["id"], t["title"], t["source"], t["model"], t["pretrained"], t["shots"], tuple(t["seeds"]),
                         tuple(t["datasets"]), rows))
    return out


def dataset_folder(name: str) -> str:
    """A dataset's folder under a CoOp data root, from CoOp's names or folder names."""
    from ..data.coop import coop_dataset

    key = name.lower().replace("-", "").replace("_", "")
    for folder, cls in EXTRA_FOLDERS.items():
        if key in (folder, cls.lower()):
            return folder
    try:
        return coop_dataset(name).folder
    except BadInput:
        known = sorted({d for t in load_tables() for d in t.datasets})
        raise BadInput(f"unknown dataset {name!r}; the papers' tables cover: {', '.join(known)}") from None


def find(method: str, dataset: str | None, table: str | None = None, model: str | None = None) -> tuple[Table, Row]:
    """The table (and row) for ``method`` [on ``dataset``]: ``table`` by id, else the first whose
    backbone is ``model``, else the first that has the method."""
    tables = load_tables()
    if table is not None:
        match = [t for t in tables if t.id == table]
        if not match:
            raise BadInput(f"no table {table!r}; `bbpt reproduce --list` shows them: {', '.join(t.id for t in tables)}")
        t = match[0]
        if method not in t.rows:
            raise BadInput(f"table {table} has no {method} row; its methods: {', '.join(t.rows)}")
        if dataset is not None and dataset not in t.datasets:
            raise BadInput(f"table {table} has no {dataset}; its datasets: {', '.join(t.datasets)}")
        return t, t.rows[method]
    cands = [t for t in tables if method in t.rows and (dataset is None or dataset in t.datasets)]
    if not cands:
        have = sorted({m for t in tables for m in t.rows})
        where = f" on {dataset}" if dataset else ""
        raise BadInput(f"no paper table has {method}{where}; tables cover the methods {', '.join(have)} "
                       "(`bbpt reproduce --list`)")
    t = next((t for t in cands if model is not None and t.model == model), cands[0])
    return t, t.rows[method]


@dataclass
class Plan:
    table: Table
    row: Row
    dataset: str  # folder name
    configs: list  # RunConfig per seed


def plan(method: str, dataset: str, root: str | Path, table: str | None = None, model: str | None = None,
         pretrained: str | None = None, seeds: list[int] | None = None, options: dict | None = None,
         shots: int | None = None, **run_fields) -> Plan:
    """The paper's configuration for ``method`` on ``dataset`` as one RunConfig per seed."""
    from ..engine import make_run_config

    folder = dataset_folder(dataset)
    model = model.replace("/", "-") if model else None  # "ViT-B/16" as the papers write it
    t, row = find(method, folder, table, model)
    if model not in (None, t.model) and pretrained is None:
        raise BadInput(f"--model {model} is not the table's backbone ({t.model}): pass its weights with --pretrained "
                       "(an open_clip tag, a checkpoint file, or 'random')")
    path = Path(root).expanduser() / folder
    _check_root(Path(root).expanduser(), folder)
    opts = {**row.options_for(folder), **(options or {})}
    cfgs = [make_run_config(method=method, dataset=str(path), model=model or t.model,
                            pretrained=pretrained if pretrained is not None else t.pretrained,
                            shots=shots or t.shots, seed=s, options=opts, **run_fields)
            for s in (seeds or list(t.seeds))]
    return Plan(t, row, folder, cfgs)


def _check_root(root: Path, folder: str) -> None:
    """A missing or incomplete dataset folder: one line naming what is wrong and the fix."""
    from ..data.coop import check_dataset, coop_dataset

    if not root.is_dir():
        raise BadInput(f"data root {root} does not exist; pass --root the folder holding the CoOp datasets "
                       "(oxford_pets/, dtd/, ...)")
    if folder in EXTRA_FOLDERS:
        if not (root / folder).is_dir():
            raise BadInput(f"{root / folder} does not exist: put {EXTRA_FOLDERS[folder]} there with its "
                           f"split_mlai_{EXTRA_FOLDERS[folder]}.json (BlackVIP's DATASETS.md)")
        return
    report = check_dataset(root, coop_dataset(folder))
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more: `bbpt data check {root}`)" if len(report.problems) > 1 else ""
        raise BadInput(f"{report.problems[0]}{more}")


def reproduce(method: str, dataset: str, root: str | Path, out: str | Path | None = None, table: str | None = None,
              model: str | None = None, pretrained: str | None = None, seeds: list[int] | None = None,
              options: dict | None = None, shots: int | None = None, progress: bool = True, force: bool = False,
              log: Callable[[str], None] | None = None, **run_fields) -> dict:
    """Run the paper's configuration over its seeds; returns (and writes to
    ``out/reproduce.json``) the paper's number beside the measured mean ± std."""
    from .. import engine

    p = plan(method, dataset, root, table, model, pretrained, seeds, options, shots, **run_fields)
    c0 = p.configs[0]
    if out is None:  # another backbone or weights get their own folder, beside the paper's
        own = (c0.model, c0.pretrained) == (p.table.model, p.table.pretrained)
        out = Path("runs") / "reproduce" / p.table.id / method / (
            p.dataset if own else f"{p.dataset}-{c0.model}-{Path(str(c0.pretrained)).name}")
    out = Path(out)
    runs = []
    for cfg in p.configs:  # finished seeds are kept, an interrupted one resumes
        r = engine.run(cfg, out=out / f"seed{cfg.seed}", progress=progress, force=force, keep_finished=True, log=log)
        runs.append({"seed": cfg.seed, "test_accuracy": r["accuracy"]["test"], "queries": r["queries"],
                     "wall_seconds": r["wall_seconds"], **({"test_subset": r["test_subset"]} if "test_subset" in r else {})})
        if log is not None:
            q = r["queries"]
            log(f"  seed {cfg.seed}: test {100 * r['accuracy']['test']:.2f}%  api_calls {q['api_calls']}  "
                f"prompt_evals {q['prompt_evals']}  {r['wall_seconds']:.1f}s -> {out / f'seed{cfg.seed}'}")
    accs = [100 * r["test_accuracy"] for r in runs]
    paper_opts = p.row.options_for(p.dataset)
    changed = sorted(k for k, v in (options or {}).items() if paper_opts.get(k, _UNSET) != v)
    defaults = make_run_fields_defaults()
    fields = sorted(k for k, v in run_fields.items() if k not in ("device", "precision", "test_subset") and v != defaults.get(k))
    seeds_run = [c.seed for c in p.configs]
    differs = [what for what, yes in (
        ("another backbone or weights", (c0.model, c0.pretrained) != (p.table.model, p.table.pretrained)),
        (f"{c0.shots} shots", c0.shots != p.table.shots),
        (f"seeds {','.join(map(str, seeds_run))} (the paper's: {','.join(map(str, p.table.seeds))})",
         sorted(seeds_run) != sorted(p.table.seeds)),
        ("options over the paper's (" + ", ".join(changed) + ")", bool(changed)),
        ("run fields (" + ", ".join(fields) + ")", bool(fields)),
        ("a test subset", c0.test_subset is not None)) if yes]
    summary = {
        "method": method, "dataset": p.dataset, "table": p.table.id, "title": p.table.title, "source": p.table.source,
        "paper": {"label": p.row.label, "accuracy": p.row.accuracy[p.dataset], "model": p.table.model,
                  "pretrained": p.table.pretrained, "shots": p.table.shots, "seeds": list(p.table.seeds)},
        "measured": {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "seeds": [r["seed"] for r in runs], "model": c0.model, "pretrained": c0.pretrained},
        "comparable": not differs, "differs": differs,
        "runs": runs, "config": {k: v for k, v in c0.model_dump().items() if k != "seed"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


_UNSET = object()


def make_run_fields_defaults() -> dict:
    from ..engine import RunConfig

    return {k: f.default for k, f in RunConfig.model_fields.items()}


def format_summary(s: dict) -> str:
    m, pp = s["measured"], s["paper"]
    spread = f" ± {m['std']:.2f}" if len(m["seeds"]) > 1 else ""
    note = "" if s["comparable"] else f"  [not comparable: {'; '.join(s['differs'])}]"
    return (f"{s['method']} on {s['dataset']}: bbpt {m['mean']:.2f}{spread} (seeds {','.join(map(str, m['seeds']))}, "
            f"{m['model']}:{m['pretrained']})   paper {pp['accuracy']:.2f} ({pp['label']}, {pp['model']})   "
            f"difference {m['mean'] - pp['accuracy']:+.2f}{note}\n  source: {s['source']}")


def list_tables() -> str:
    lines = []
    for t in load_tables():
        lines.append(f"{t.id}: {t.title} ({t.model} {t.pretrained}, {t.shots} shots, seeds "
                     f"{','.join(map(str, t.seeds))})")
        lines.append(f"    methods: {', '.join(t.rows)}; datasets: {', '.join(t.datasets)}")
        lines.append(f"    source: {t.source}")
    return "\n".join(lines)
