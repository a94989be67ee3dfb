"""Accuracy of a method or a saved prompt on a split, through an evaluation meter that is
never charged to a run's budget: :func:`evaluate` (the engine's validation and test points,
the protocols' transfer evaluations) and :func:`evaluate_prompt` (``bbpt eval``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import check_images, load_task
from .data.core import ImageSet
from .data.staging import FewShotData
from .errors import BadInput, CorruptCheckpoint, excerpt
from .methods import METHODS
from .models import BlackBox, BlackBoxAPI, Images, QueryMeter, create_backbone
from .progress import eval_bar


@torch.no_grad()
def evaluate(method, box: BlackBoxAPI, images: ImageSet | FewShotData, batch: int, desc: str = "eval",
             progress: bool = True, should_stop: Callable[[], bool] | None = None, cache: bool = False) -> dict:
    """Accuracy and mean cross-entropy of ``method.predict`` (or any ``predict(box, images)``)
    on ``images``, through ``box`` (an evaluation meter, not the training budget). Streams
    the images ``batch`` at a time and, unless ``cache`` (the few-shot val set, evaluated at
    every curve point), sends them without cache keys: memory stays flat in the split's size."""
    data = images if isinstance(images, FewShotData) else FewShotData(images, box.image_size, preload=False)
    correct, loss, n = 0, 0.0, len(data)
    with eval_bar(progress and n > batch, n, desc) as bar:
        for i in range(0, n, batch):
            if should_stop is not None and should_stop():
                return {"accuracy": None, "loss": None, "stopped": True}
            idx = np.arange(i, min(i + batch, n))
            imgs = data.images(idx)
            logits = method.predict(box, imgs if cache else Images(imgs.pixels))  # (B, C)
            y = data.labels[idx]
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            bar.update(len(idx))
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


class SavedPrompt:
    """A saved prompt (+ extra state) behaving like a method for :func:`evaluate`."""

    def __init__(self, cls, prompt, extra, source: Path | str = "the prompt file"):
        self.cls, self.prompt, self.extra, self.source = cls, prompt, extra, source

    def predict(self, box, images):
        try:
            return self.cls.apply(self.prompt, self.extra, box, images)
        except (KeyError, RuntimeError) as e:  # a tensor the method reads by name is missing, or has another shape
            if isinstance(e, RuntimeError) and not str(e).startswith("Error(s) in loading state_dict"):
                raise
            what = e.args[0] if isinstance(e, KeyError) and e.args else excerpt(e, 80)
            raise CorruptCheckpoint(f"prompt file {self.source} does not fit {self.cls.name} ({what}); pass the "
                                    "prompt.safetensors of that method's run folder") from None


def evaluate_prompt(prompt_path: str | Path, dataset: str, model: str | None = None, pretrained: str | None = None,
                    device: str = "cpu", split: str = "test", batch: int = 500, progress: bool = True) -> dict:
    """Test accuracy of a saved prompt (``runs/x/prompt.safetensors``) on a task."""
    from .results import load_prompt

    if split not in ("test", "val", "train"):
        raise BadInput(f"split {split!r} must be test, val or train")
    prompt, extra, meta = load_prompt(prompt_path)
    cls = METHODS.get(meta.get("method", "zeroshot"))
    if model is None:
        model, _, tag = meta.get("model", "mini").partition(":")
        pretrained = pretrained or (tag or None)
    task = load_task(dataset)
    images = getattr(task, split)
    check_images(images, split, progress=progress)
    backbone = create_backbone(model, pretrained, device)
    box = BlackBox(backbone, task.classnames, QueryMeter())
    r = evaluate(SavedPrompt(cls, prompt, extra, prompt_path), box, images, batch, split, progress)
    return {"dataset": task.name, "split": split, "method": cls.name, "model": model, **r, "queries": box.meter.counts}


_Saved = SavedPrompt  # the name before bbpt.evaluation
