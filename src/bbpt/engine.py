"""The one loop every method runs in: build, step until done or out of budget, evaluate, write.

Training queries go through a budgeted :class:`QueryMeter`; validation and test queries go
through a separate evaluation meter, reported apart and never charged to the budget (the
papers do not count evaluation). Model selection, where a method does any, sees validation
data only; the test split is queried once, at the end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError

from .data import fewshot_split, load_task, subsample_classes
from .data.core import ImageSet
from .errors import BadInput, BudgetExhausted
from .methods import METHODS, FewShotData, Method, make_config
from .models import BlackBox, QueryMeter, create_backbone
from .results import RunWriter


class RunConfig(BaseModel):
    """Everything that determines a run; stored in result.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "zip"
    dataset: str = "fashion-mnist"
    model: str = "mini"
    pretrained: str | None = None
    shots: int = 16
    seed: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    eval_every: int = 0  # budget units between validation points on the curve; 0: auto (~20 points)
    eval_batch: int = 500
    max_images_per_call: int = 128
    classes: str = "all"  # "all", or CoOp's base-to-new halves "base" / "new"
    options: dict[str, Any] = {}  # method-specific overrides of its paper defaults


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise BadInput(f"config file {p} does not exist")
    try:
        if p.suffix in (".toml",):
            import tomllib

            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except Exception as e:
        raise BadInput(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None


def make_run_config(**kw) -> RunConfig:
    try:
        return RunConfig(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput(f"run option {'.'.join(map(str, err['loc']))!r}: {err['msg']}") from None


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(method, box: BlackBox, images: ImageSet, batch: int, desc: str = "eval", progress: bool = True) -> dict:
    """Accuracy and mean cross-entropy of ``method.predict`` (or any ``predict(box, images)``)
    on ``images``, through ``box`` (an evaluation meter, not the training budget)."""
    from tqdm import tqdm

    data = FewShotData(images, box.image_size) if images.array is not None and len(images) <= 20000 else None
    correct, loss, n = 0, 0.0, len(images)
    for i in tqdm(range(0, n, batch), desc=desc, leave=False, disable=not progress or n <= batch, unit="batch"):
        idx = np.arange(i, min(i + batch, n))
        imgs = data.images(idx) if data is not None else FewShotData(images.subset(idx), box.image_size).images()
        logits = method.predict(box, imgs)  # (B, C)
        y = torch.from_numpy(images.labels[idx])
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


def run(cfg: RunConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Run one method on one task; returns the result dict (also written to ``out``)."""
    t0 = time.time()
    set_seed(cfg.seed)
    cls = METHODS.get(cfg.method)
    mcfg = cls.resolve_config(make_config(cls, cfg.options), cfg.shots)
    task = subsample_classes(load_task(cfg.dataset), cfg.classes)
    train, val = fewshot_split(task, cfg.shots, cfg.seed)
    backbone = create_backbone(cfg.model, cfg.pretrained, cfg.device)
    unit = cls.unit(mcfg)
    budget = {unit: mcfg.budget} if mcfg.budget is not None else {}
    meter = QueryMeter(budget, cfg.max_images_per_call)
    box = BlackBox(backbone, task.classnames, meter, precision=cfg.precision)
    eval_box = box.for_classes(task.classnames, QueryMeter(max_images_per_call=cfg.max_images_per_call))
    task_info = {"name": task.name, "classnames": task.classnames, "templates": task.templates}
    aux: dict = {}
    if not cls.black_box:  # the white-box reference (CoOp) alone gets the model itself
        aux["backbone"] = backbone
    if cls.uses_aux_box:  # a method's side queries (CraFT's head), counted apart from the budget
        aux["aux_box"] = box.for_classes(task.classnames, QueryMeter(max_images_per_call=cfg.max_images_per_call))
    method = cls(mcfg, box, FewShotData(train, box.image_size), task_info, cfg.seed, **aux)
    writer = RunWriter(out, cfg, method) if out is not None else None

    # curve points every `every` budget units, or (no budget: CoOp) every `every` steps
    total = mcfg.budget or (method.total_steps() or 0)
    every = cfg.eval_every or max(1, total // 20)
    done = (lambda: meter.counts[unit]) if mcfg.budget else (lambda: steps)
    curve: list[dict] = []
    last_loss, next_eval, status, steps = None, every, "finished", 0

    def add_point():
        nonlocal last_loss
        if last_loss is None:  # a method that has not trained yet: its loss on the train set, uncounted
            last_loss = evaluate(method, eval_box, train, cfg.eval_batch, "train", progress)["loss"]
        v = evaluate(method, eval_box, val, cfg.eval_batch, "val", progress)
        curve.append({"api_calls": meter.counts["api_calls"], "prompt_evals": meter.counts["prompt_evals"],
                      "train_loss": last_loss, "val_accuracy": v["accuracy"]})
        if writer:
            writer.checkpoint(curve, meter)

    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{cfg.method} on {task.name}", unit=unit if mcfg.budget else "step",
               disable=not progress or not total)
    try:
        add_point()  # the starting point (api_calls = 0)
        while True:
            try:
                stats = method.step()
            except BudgetExhausted as e:
                if meter.counts[unit] == 0:  # not even one step fits: the budget is unusable
                    raise BudgetExhausted(e.counts, e.budget, e.requested) from None
                break
            if stats is None:
                break
            steps += 1
            last_loss = stats.get("train_loss", last_loss)
            bar.n = done()
            bar.set_postfix(loss=f"{last_loss:.3f}" if last_loss is not None else "-")
            bar.refresh()
            if done() >= next_eval:
                add_point()
                next_eval = done() + every
        if not curve or curve[-1]["api_calls"] != meter.counts["api_calls"]:
            add_point()
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        bar.close()

    test = evaluate(method, eval_box, task.test, cfg.eval_batch, "test", progress)
    result = {
        "method": cfg.method,
        "dataset": task.name,
        "model": cfg.model if cfg.pretrained is None else f"{cfg.model}:{cfg.pretrained}",
        "shots": cfg.shots,
        "seed": cfg.seed,
        "status": status,
        "black_box": cls.black_box,
        "budget": {unit: mcfg.budget} if unit == "api_calls" else {"api_calls": None, unit: mcfg.budget},
        "queries": meter.counts,
        **({"aux_queries": aux["aux_box"].meter.counts,
            "queries_total": {k: v + aux["aux_box"].meter.counts[k] for k, v in meter.counts.items()}}
           if "aux_box" in aux else {}),
        "eval_queries": eval_box.meter.counts,
        "accuracy": {"test": test["accuracy"], "val": curve[-1]["val_accuracy"] if curve else None},
        "curve": curve,
        "wall_seconds": round(time.time() - t0, 2),
        "config": {**cfg.model_dump(), "options": mcfg.model_dump()},
    }
    if writer:
        writer.finish(result)
    return result


class _Saved:
    """A saved prompt (+ extra state) behaving like a method for :func:`evaluate`."""

    def __init__(self, cls, prompt, extra):
        self.cls, self.prompt, self.extra = cls, prompt, extra

    def predict(self, box, images):
        return self.cls.apply(self.prompt, self.extra, box, images)


def evaluate_prompt(prompt_path: str | Path, dataset: str, model: str | None = None, pretrained: str | None = None,
                    device: str = "cpu", split: str = "test", batch: int = 500, progress: bool = True) -> dict:
    """Test accuracy of a saved prompt (``runs/x/prompt.safetensors``) on a task."""
    from .results import load_prompt

    prompt, extra, meta = load_prompt(prompt_path)
    cls = METHODS.get(meta.get("method", "zeroshot"))
    if model is None:
        model, _, tag = meta.get("model", "mini").partition(":")
        pretrained = pretrained or (tag or None)
    task = load_task(dataset)
    if split not in ("test", "val", "train"):
        raise BadInput(f"split {split!r} must be test, val or train")
    backbone = create_backbone(model, pretrained, device)
    box = BlackBox(backbone, task.classnames, QueryMeter())
    r = evaluate(_Saved(cls, prompt, extra), box, getattr(task, split), batch, split, progress)
    return {"dataset": task.name, "split": split, "method": cls.name, "model": model, **r, "queries": box.meter.counts}
