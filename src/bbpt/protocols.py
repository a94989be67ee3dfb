"""The papers' evaluation protocols, one call each: base-to-new, cross-dataset, distribution shift.

Each protocol trains one run per seed with :func:`bbpt.engine.run` (folder ``out/seed{n}``:
result.json, curve.csv, prompt.safetensors), then re-applies the saved prompt through the
method's ``apply`` to other test splits: the new half of the classes, other tasks, or shifted
copies of the task (``NAME@SHIFT``). Those evaluation queries go through a fresh meter, are
written to the seed's result.json under the protocol's name, and are never charged to the
budget. ``out/summary.json`` and ``out/summary.md`` hold one row per seed and the mean ± std
(population std, as Dassl's parse_test_res) over seeds.

    base_to_new("zip", "fashion-mnist", seeds=(1, 2, 3), out="runs/b2n")
    cross_dataset("zip", "mnist", ["fashion-mnist", "shapes"], out="runs/xd")
    distribution_shift("zip", "fashion-mnist", ("inverted", "rotated", "noised"), out="runs/shift")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import engine
from .config import RunConfig
from .data import check_images, load_task, subsample_classes
from .data.core import ImageSet, Task
from .data.shift import SHIFTS, shift_task
from .errors import BadInput
from .methods import METHODS
from .evaluation import SavedPrompt, evaluate
from .models import BlackBox, QueryMeter
from .models.cache import backbone_cache
from .results import load_prompt
from .run_result import RunResult
from .state import atomic_write_text


def harmonic_mean(base: float, new: float) -> float:
    """CoOp's H = 2·b·n / (b + n), 0 when both are 0."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


class _Evaluator:
    """Applies saved prompts to target test splits; one black box (and image-feature cache)
    per target, shared across seeds, with a fresh evaluation meter per call."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.backbone, self.boxes = cfg, None, {}

    def __call__(self, run_dir: Path, name: str, classnames: list[str], images: ImageSet, progress: bool) -> dict:
        cfg = self.cfg
        if self.backbone is None:  # a sweep worker's cached backbone where there is one
            self.backbone = backbone_cache.get(cfg.model, cfg.pretrained, cfg.device)
        if name not in self.boxes:
            self.boxes[name] = BlackBox(self.backbone, classnames, QueryMeter(), precision=cfg.precision)
        box = self.boxes[name].for_classes(classnames, QueryMeter(max_images_per_call=cfg.max_images_per_call))
        prompt, extra, _ = load_prompt(run_dir / "prompt.safetensors")
        saved = SavedPrompt(METHODS.get(cfg.method), prompt, extra)
        r = evaluate(saved, box, images, cfg.eval_batch, name, progress, cache=True)  # features reused across seeds
        return {**r, "eval_queries": box.meter.counts}


def _run_protocol(protocol: str, method: str, dataset: str, targets: dict[str, Task], row: Callable[[float, dict], dict],
                  classes: str, shots: int, seeds: Sequence[int], options: dict | None, out, progress: bool,
                  force: bool = False, **run_kw) -> tuple[dict, Path]:
    """Per seed: train on ``dataset`` (``classes``), evaluate on each target's test split, and
    record ``row(source test accuracy, {target: evaluation})`` in the summary's rows and,
    with the evaluations, in the seed's result.json under ``protocol``.

    Rerun after an interruption, finished seeds are kept (and their evaluations reused),
    an interrupted seed resumes from its checkpoint, and the rest run; ``force`` redoes all."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise BadInput(f"seeds must be a non-empty list of distinct integers, got {seeds}; e.g. --seeds 1,2,3")
    out = Path(out) if out is not None else Path("runs") / protocol / f"{method}-{dataset.replace('/', '_')}"
    cfgs = {s: engine.make_run_config(method=method, dataset=dataset, shots=shots, seed=s, classes=classes,
                                      options=dict(options or {}), **run_kw) for s in seeds}
    for name, t in targets.items():  # a bad target image is found before any seed trains
        check_images(t.test, f"{name} test", progress=progress)
    evaluator = _Evaluator(cfgs[seeds[0]])
    rows, runs = [], {}
    for s in seeds:  # an interruption (engine.RunInterrupted) propagates: the seed's folder resumes
        run_dir = out / f"seed{s}"
        result = engine.run(cfgs[s], out=run_dir, progress=progress, force=force, keep_finished=True)
        earlier = getattr(result, protocol) or {}
        if set(earlier.get("targets", {})) == set(targets):
            evals = earlier["targets"]  # a finished seed of an earlier invocation
        else:
            evals = {name: evaluator(run_dir, name, t.classnames, t.test, progress) for name, t in targets.items()}
        values = row(result.accuracy.test, evals)
        result = result.with_fields(**{protocol: {**values, "targets": evals}})
        atomic_write_text(run_dir / "result.json", result.to_json())  # rewritten with the evaluations
        rows.append({"seed": s, **values})
        runs[str(s)] = str(run_dir)
    summary = {"protocol": protocol, "method": method, "dataset": dataset, "model": result.model, "shots": shots,
               "seeds": [r["seed"] for r in rows], "options": result.config["options"], "status": "finished",
               "rows": rows, "runs": runs}
    return summary, out


def _finish(summary: dict, columns: dict[str, str], out: Path) -> dict:
    """Adds mean / std over seeds of ``columns`` (row key -> table header); writes summary.json/.md."""
    vals = {k: [r[k] for r in summary["rows"]] for k in columns}
    summary["columns"], summary["out"] = columns, str(out)
    summary["mean"] = {k: float(np.mean(v)) for k, v in vals.items()}
    summary["std"] = {k: float(np.std(v)) for k, v in vals.items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", summary_table(summary) + "\n")
    return summary


def summary_table(summary: dict) -> str:
    """The summary as a markdown table of test accuracies (%), one row per seed."""
    cols = summary["columns"]
    head = (f"# {summary['protocol'].replace('_', '-')}: {summary['method']} on {summary['dataset']} "
            f"({summary['model']}, {summary['shots']}-shot, seeds {', '.join(map(str, summary['seeds']))})")
    lines = [head, "", "| seed | " + " | ".join(cols.values()) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in summary["rows"]:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{100 * r[k]:.2f}" for k in cols) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"{100 * summary['mean'][k]:.2f} ± {100 * summary['std'][k]:.2f}" for k in cols) + " |")
    lines += ["", "Test accuracy (%). Evaluation queries are not charged to the training budget."]
    return "\n".join(lines)


def base_to_new(method: str, dataset: str, shots: int = 16, seeds: Sequence[int] = (1, 2, 3), options: dict | None = None,
                out=None, progress: bool = True, **run_kw) -> dict:
    """CoOp's base-to-new generalisation: train on the first half of the classes ("base"),
    test on the base and on the unseen "new" half; H is their harmonic mean.

    ``run_kw``: other :class:`bbpt.engine.RunConfig` fields (model, pretrained, device,
    precision, eval_batch, ...). Returns the summary dict (columns base, new, H)."""
    new = subsample_classes(load_task(dataset), "new")

    def row(base: float, evals: dict) -> dict:
        n = evals["new"]["accuracy"]
        return {"base": base, "new": n, "H": harmonic_mean(base, n)}

    summary, out = _run_protocol("base_to_new", method, dataset, {"new": new}, row, "base", shots, seeds, options,
                                 out, progress, **run_kw)
    summary["new_classes"] = new.classnames
    return _finish(summary, {"base": "base", "new": "new", "H": "H"}, out)


def add_new_classes(cfg: RunConfig, run_dir: Path, result: RunResult, evaluator: "_Evaluator | None" = None) -> RunResult:
    """Base-to-new for one finished run trained on the base classes (a sweep's run): tests its
    saved prompt on the new half and writes base, new and H to its result.json under
    ``base_to_new`` (kept when already there). Evaluation queries are not charged."""
    if result.base_to_new is not None:
        return result
    if cfg.classes != "base":
        raise BadInput(f"base-to-new needs a run trained on the base classes (classes=base), not {cfg.classes!r}")
    new = subsample_classes(load_task(cfg.dataset), "new")
    ev = evaluator or _Evaluator(cfg)
    evals = {"new": ev(run_dir, "new", new.classnames, new.test, False)}
    base, n = result.accuracy.test, evals["new"]["accuracy"]
    result = result.with_fields(base_to_new={"base": base, "new": n, "H": harmonic_mean(base, n), "targets": evals})
    atomic_write_text(run_dir / "result.json", result.to_json())
    return result


def _transfer(protocol: str, method: str, source: str, targets: dict[str, Task], out, **kw) -> dict:
    def row(acc: float, evals: dict) -> dict:
        accs = {t: e["accuracy"] for t, e in evals.items()}
        return {"source": acc, **accs, "mean": float(np.mean(list(accs.values())))}

    clash = set(targets) & {"seed", "source", "mean"}
    if clash:
        raise BadInput(f"target name {clash.pop()!r} clashes with a summary column; give the path as ./NAME")
    summary, out = _run_protocol(protocol, method, source, targets, row, "all", out=out, **kw)
    summary["targets"] = list(targets)
    return _finish(summary, {"source": f"{source} (source)", **{t: t for t in targets}, "mean": "mean (targets)"}, out)


def cross_dataset(method: str, source: str, targets: Sequence[str], shots: int = 16, seeds: Sequence[int] = (1, 2, 3),
                  options: dict | None = None, out=None, progress: bool = True, **run_kw) -> dict:
    """Train on ``source``; test the learned prompt on each target task (any class count).
    Returns the summary (columns: source, each target, mean over targets)."""
    names = list(dict.fromkeys(targets))  # distinct, in order
    if not names:
        raise BadInput("cross-dataset needs at least one target dataset, e.g. --targets fashion-mnist,shapes")
    if source in names:
        raise BadInput(f"target {source!r} is the source dataset; its accuracy is reported as the source column")
    tasks = {n: load_task(n) for n in names}  # unknown names fail before training
    return _transfer("cross_dataset", method, source, tasks, out, shots=shots, seeds=seeds, options=options,
                     progress=progress, **run_kw)


def distribution_shift(method: str, dataset: str, shifts: Sequence[str] = ("inverted", "rotated", "noised"),
                       shots: int = 16, seeds: Sequence[int] = (1, 2, 3), options: dict | None = None, out=None,
                       progress: bool = True, **run_kw) -> dict:
    """Train on ``dataset``; test on ``dataset@shift`` for each shift (:mod:`bbpt.data.shift`).
    Returns the summary (columns: clean source, each shift, mean over shifts)."""
    names = list(dict.fromkeys(shifts))
    if not names:
        raise BadInput(f"distribution shift needs at least one shift: {', '.join(SHIFTS.names())}")
    for s in names:
        SHIFTS.get(s)  # unknown names fail before training
    task = load_task(dataset)
    tasks = {s: shift_task(task, s) for s in names}
    return _transfer("distribution_shift", method, dataset, tasks, out, shots=shots, seeds=seeds, options=options,
                     progress=progress, **run_kw)
