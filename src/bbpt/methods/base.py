"""What a tuning method is: a config (pydantic, validated) plus one class, registered by name.

The engine (:mod:`bbpt.engine`) calls only what is defined here, so it never branches on
the kind of method it runs:

- ``Method(cfg, box, data, task)``: built from its config, the metered black box, the
  few-shot training data and the task description (class names, templates);
- ``step() -> dict | None``: one update, returning stats such as ``{"train_loss": ...}``,
  or None when the method has finished (the budget ending it raises ``BudgetExhausted``);
- ``predict(box, images) -> (B, C)`` logits of the current model, used for validation and
  test (default: the current prompt through the black box);
- ``prompt()``: the current prompt (what ``bbpt eval --prompt`` re-applies).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..data.core import ImageSet
from ..errors import BadInput
from ..models.blackbox import BlackBox, Images, SoftPrompt, TextPrompt
from ..registry import Registry


class MethodConfig(BaseModel):
    """Fields every method has; subclasses add theirs with paper defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: int | None = None  # hard stop in ``budget_unit``; None: no training queries
    budget_unit: Literal["api_calls", "prompt_evals"] | None = None  # None: the method's paper unit
    batch_size: int = 128  # images per training query (ZIP's API batch)


class FewShotData:
    """The labelled few-shot images a method may send to the black box."""

    def __init__(self, images: ImageSet, image_size: int):
        self.set = images
        self.labels = torch.from_numpy(images.labels)  # (N,)
        self.keys = [str(k) for k in images.ids]
        self._pixels = images.pixels(size=image_size) if images.array is not None else None
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, idx=None) -> Images:
        """Images ``idx`` (all if None) as a black-box input, keyed by image id."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        px = self._pixels[idx] if self._pixels is not None else self.set.pixels(idx, self.image_size)
        return Images(px, [self.keys[i] for i in idx])

    def batches(self, batch_size: int, rng: np.random.Generator):
        """One epoch of shuffled batches (Images, labels); the last partial batch is dropped
        when there are at least ``batch_size`` images (Dassl's drop_last)."""
        order = rng.permutation(len(self))
        stop = len(self) - len(self) % batch_size if len(self) >= batch_size else len(self)
        for i in range(0, max(stop, 1), batch_size):
            idx = order[i : i + batch_size]
            yield self.images(idx), self.labels[idx]


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    budget_unit: ClassVar[str] = "api_calls"
    black_box: ClassVar[bool] = True  # False only for the white-box reference (CoOp): gets ``backbone``
    uses_aux_box: ClassVar[bool] = False  # True: gets ``aux_box``, metered apart (CraFT's head)

    def __init__(self, cfg: MethodConfig, box: BlackBox, data: FewShotData, task_info: dict, seed: int):
        self.cfg, self.box, self.data, self.task_info, self.seed = cfg, box, data, task_info, seed

    @classmethod
    def resolve_config(cls, cfg: MethodConfig, shots: int) -> MethodConfig:
        """Fill defaults that depend on the run (e.g. a budget by shots)."""
        return cfg

    @classmethod
    def unit(cls, cfg: MethodConfig) -> str:
        """The unit the budget is counted in: the config's override, else the paper's."""
        return cfg.budget_unit or cls.budget_unit

    def step(self) -> dict | None:
        raise NotImplementedError

    def total_steps(self) -> int | None:
        """Steps a budget-free method will take (spaces its curve points); None: unknown."""
        return None

    def prompt(self) -> TextPrompt | SoftPrompt:
        raise NotImplementedError

    def predict(self, box: BlackBox, images: Images) -> torch.Tensor:
        """(B, C) logits of the current model on ``images``."""
        return type(self).apply(self.prompt(), self.extra_state(), box, images)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the prompt that ``predict`` needs (e.g. CraFT's head)."""
        return {}

    @classmethod
    def apply(cls, prompt, extra: dict[str, torch.Tensor], box: BlackBox, images: Images) -> torch.Tensor:
        """(B, C) logits of a saved prompt (+ extra state) on ``images``: ``bbpt eval``'s path."""
        return box.query(prompt, images)[0]


METHODS: Registry[type[Method]] = Registry("method", hint="`bbpt methods` lists them.")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.register(cls.name, cls)
    return cls


def make_config(cls: type[Method], overrides: dict) -> MethodConfig:
    """The method's config with ``overrides`` applied; bad keys or values -> BadInput."""
    try:
        return cls.Config(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        known = ", ".join(cls.Config.model_fields)
        raise BadInput(f"method {cls.name}: option {loc!r}: {err['msg']} (options: {known})") from None
