"""What a tuning method is: a config (pydantic, every field ranged and helped) plus one class,
registered by name.

The engine (:mod:`bbpt.engine`) calls only what is defined here, so it never branches on
the kind of method it runs:

- ``Method(cfg, env)``: built from its config and the :class:`Env` the engine hands every
  method alike (the metered black box, the few-shot data, the task, the seed, and on request
  a side box metered apart or, for the white-box reference alone, the model);
- ``step(budget) -> dict | None``: one update, told how much of the budget is spent
  (:class:`Budget`; methods never read the meter), returning stats such as
  ``{"train_loss": ...}``, or None when the method has finished (the budget ending it raises
  ``BudgetExhausted``);
- ``state_dict()`` / ``load_state_dict()``: the whole state, RNGs included, of the
  attributes named in ``state`` (bit-exact resume);
- ``predict(box, images) -> (B, C)`` logits of the current model (validation and test);
- ``prompt()`` / ``extra_state()``: what ``bbpt eval --prompt`` re-applies.

:class:`ZerothOrderMethod` is the one step every zeroth-order method takes:
ask -> decode -> query -> loss -> tell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..boxes.capabilities import Needs
from ..data.staging import PRELOAD_BYTES, BatchStream, FewShotData, WholeSet, epoch_stop  # noqa: F401  (re-exported: they lived here)
from ..errors import BadInput
from ..models.blackbox import BlackBoxAPI, Images, SoftPrompt, TextPrompt, VisualPrompt
from ..models.meter import BudgetUnit
from ..registry import Registry
from ..state import get_state, set_state


class MethodConfig(BaseModel):
    """Fields every method has; subclasses add theirs with paper defaults, ranges and help."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # strict: true is not 1; inf / nan are no values

    budget: int | None = Field(None, ge=1, description="hard stop in budget_unit; none: no training queries")
    budget_unit: BudgetUnit | None = Field(
        None, description="unit of the budget; none: the method's paper unit")
    batch_size: int = Field(128, ge=1, le=65536, description="images per training query (ZIP's API batch)")
    # The papers' training views (bbpt.data.views): a fresh view per batch for minibatch
    # methods (BatchStream), one augmented pass for whole-set methods (WholeSet).
    augment: bool | None = Field(None, description="train on random resized crops + flips (the papers' views); "
                                                   "none: on unless the task's images are too small for them")
    crop_min: float | None = Field(None, gt=0, le=1, description="smallest crop, as a fraction of the image's area "
                                   "(scale range (crop_min, 1)); none: the method's official (0.08, or 0.5)")
    flip: bool | None = Field(None, description="random horizontal flips; none: the task's default "
                                                "(off where a flip changes the label: digits)")
    view_pool: int | None = Field(None, ge=0, le=1_000_000, description="views per image from a seeded pool, each "
                                  "encoded once; 0: a new view every draw, never cached; none: 16")
    # Fields added since runs were first stored default to None, so an older run folder (which
    # lacks them) still resumes: `config_diff` reads a missing field as None.
    official_crop_min: ClassVar[float] = 0.08  # Dassl's RRCROP_SCALE (0.08, 1); CraFT's loaders 0.5
    default_view_pool: ClassVar[int] = 16

    # Where each default comes from: "paper: ..." (section or table), "official: ..." (the
    # released code or scripts), or "bbpt: ..." (bbpt's own choice, and why). Subclasses add
    # theirs; `source()` reads them through the class hierarchy; `bbpt methods` prints them.
    sources: ClassVar[dict[str, str]] = {
        "budget": "per method",
        "budget_unit": "bbpt: which meter the budget reads (none: the method paper's unit)",
        "batch_size": "official ZIP / BlackVIP code: batch 128 (DATALOADER.TRAIN_X.BATCH_SIZE)",
        "augment": "official ZIP / BlackVIP / CoOp configs: INPUT.TRANSFORMS random_resized_crop, random_flip, "
                   "a fresh view per batch (the papers are silent); bbpt: off on the 28-32 px offline tasks, "
                   "where bench/view_pool.py measures them costing ZIP points",
        "crop_min": "official ZIP / BlackVIP / CoOp configs: Dassl's default INPUT.RRCROP_SCALE (0.08, 1.0)",
        "flip": "bbpt: the task's default; the official configs flip every dataset, digits included, but a "
                "mirrored digit is not that digit (docs: training views)",
        "view_pool": "bbpt: 16 views per image keep the feature cache; bench/view_pool.py measures it against "
                     "fresh views (view_pool=0, the official loaders)",
    }

    @classmethod
    def source(cls, name: str) -> str | None:
        for k in cls.__mro__:
            src = vars(k).get("sources", {})
            if name in src and src[name] != "per method":
                return src[name]
        return None


class OnePassConfig(MethodConfig):
    """Whole-set methods on CraFT's loaders (CraFT, SharpZO, BBT): one augmented pass, with
    crops of at least half the image."""

    augment: bool | None = Field(None, description="train on one augmented pass (random resized crop + flip), "
                                                   "encoded once; none: unless the task's images are too small")
    official_crop_min: ClassVar[float] = 0.5  # crop_min=None: CraFT's loaders, RandomResizedCrop(scale=(0.5, 1))

    sources = {"crop_min": "official CraFT loaders (reused by SharpZO and CraFT's BBT baseline): "
                           "RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip"}


@dataclass(frozen=True)
class Preset:
    """An official per-dataset configuration: values for some options, each with where in the
    ``source`` file it comes from. A run's explicit options always win over its preset."""

    source: str  # the official file, e.g. "craft_configs/dtd.yaml @1a4c251"
    values: dict[str, tuple[Any, str]]  # option -> (value, the official key or statement)


def apply_preset(method: type, cfg: "MethodConfig") -> "MethodConfig":
    """``cfg`` with its preset's values for every option the user did not set explicitly
    (pydantic's ``model_fields_set``: what ``--set`` / a sweep's options named)."""
    name = getattr(cfg, "preset", None)
    if name is None:
        return cfg
    if name not in method.presets:
        from ..errors import UnknownName

        raise UnknownName(f"{method.name} preset", name, method.presets, hint="`bbpt methods NAME --sources` lists them.")
    explicit = cfg.model_fields_set
    return cfg.model_copy(update={k: v for k, (v, _) in method.presets[name].values.items() if k not in explicit})


class Budget:
    """How much of the run's budget is spent, as the engine tells each step (a live view:
    ``spent`` includes queries made earlier in the same step)."""

    def __init__(self, unit: str, total: int | None, spent: Callable[[], int]):
        self.unit, self.total, self._spent = unit, total, spent

    @classmethod
    def of(cls, meter, unit: str, total: int | None) -> "Budget":
        return cls(unit, total, lambda: meter.counts[unit])

    @property
    def spent(self) -> int:
        return self._spent()

    def __repr__(self) -> str:
        return f"Budget({self.spent}/{self.total} {self.unit})"


class Env:
    """What the engine hands every method, the same way for all of them.

    ``box``: the metered black box (the training budget); ``data``: the few-shot training
    images; ``task``: name, classnames, templates; ``seed``; ``val``: the few-shot validation
    images (CoOp's min(k, 4) per class), for the methods whose official code selects a
    hyperparameter on them (the linear probe's C, Tip-Adapter's α and β). On request: :meth:`side_box`,
    the same black box metered apart (queries a paper does not count, such as CraFT's head
    training; reported as ``aux_queries``), and :meth:`white_box`, the model itself, which
    only a method declaring ``black_box = False`` (the CoOp reference) receives.
    """

    def __init__(self, box: BlackBoxAPI, data: FewShotData, task: dict, seed: int, method: type, white_box: Callable,
                 val: FewShotData | None = None):
        self.box, self.data, self.task, self.seed, self.val = box, data, task, seed, val
        self._method, self._white_box = method, white_box
        self.side_meter = None
        self._side: BlackBoxAPI | None = None

    def side_box(self) -> BlackBoxAPI:
        if self._side is None:
            from ..models import QueryMeter

            self.side_meter = QueryMeter(max_images_per_call=self.box.max_images_per_call)
            self._side = self.box.for_classes(self.box.classnames, self.side_meter, "side")
        return self._side

    def white_box(self):
        if self._method.black_box:
            raise BadInput(f"method {self._method.name} is black-box: it may only query() the black box")
        return self._white_box()


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    budget_unit: ClassVar[BudgetUnit] = "api_calls"
    black_box: ClassVar[bool] = True  # False only for the white-box reference (CoOp)
    # what its queries send and read (bbpt.boxes.capabilities): a box lacking any is refused
    # before the first query, naming the methods that fit it
    needs: ClassVar[Needs] = Needs(frozenset({"soft_context"}))
    # whether its training queries send keyed images, whose features the black box caches
    # (False: prompted pixels or visual tokens, re-encoded every query; views are not uploaded)
    cached_images: ClassVar[bool] = True
    state: ClassVar[tuple[str, ...]] = ()  # attributes saved in checkpoints (see state_dict)
    presets: ClassVar[dict[str, Preset]] = {}  # official per-dataset configs, chosen by a `preset` option
    # Bumped when a fix changes what the method does for the same resolved config (a fidelity
    # fix in code, not in options), so that sweeps, which name runs by that config's hash, run it
    # again; part of the hash only when non-zero, so other methods' finished runs stay valid.
    revision: ClassVar[int] = 0

    def __init__(self, cfg: MethodConfig, env: Env):
        self.cfg, self.env = cfg, env
        self.box, self.data, self.task_info, self.seed = env.box, env.data, env.task, env.seed

    @classmethod
    def resolve_config(cls, cfg: MethodConfig, shots: int) -> MethodConfig:
        """Fill defaults that depend on the run: the preset's values under the explicit
        options (subclasses add e.g. a budget by shots)."""
        return apply_preset(cls, cfg)

    @classmethod
    def unit(cls, cfg: MethodConfig) -> str:
        """The unit the budget is counted in: the config's override, else the paper's."""
        return cfg.budget_unit or cls.budget_unit

    def step(self, budget: Budget) -> dict | None:
        raise NotImplementedError

    def total_steps(self) -> int | None:
        """Steps a budget-free method will take (spaces its curve points); None: unknown."""
        return None

    def state_dict(self) -> dict:
        """The state of every attribute in ``state``: optimisers with their RNGs, batch
        streams, modules, tensors and counters; enough for a bit-exact resume."""
        return {name: get_state(getattr(self, name)) for name in self.state}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.state if n not in state]
        if missing:
            raise ValueError(f"{self.name} checkpoint lacks {missing}")
        for name in self.state:
            set_state(self, name, state[name])

    def prompt(self) -> TextPrompt | SoftPrompt:
        raise NotImplementedError

    def predict(self, box: BlackBoxAPI, images: Images) -> torch.Tensor:
        """(B, C) logits of the current model on ``images``."""
        return type(self).apply(self.prompt(), self.extra_state(), box, images)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the prompt that ``predict`` needs (e.g. CraFT's head)."""
        return {}

    @classmethod
    def apply(cls, prompt, extra: dict[str, torch.Tensor], box: BlackBoxAPI, images: Images) -> torch.Tensor:
        """(B, C) logits of a saved prompt (+ extra state) on ``images``: ``bbpt eval``'s path."""
        return box.query(prompt, images)[0]


@dataclass
class Query:
    """What one step sends: P candidates (text prompt, images, visual prompt; each P or 1)."""

    prompt: TextPrompt | SoftPrompt
    images: Images
    visual: VisualPrompt | None = None


class ZerothOrderMethod(Method):
    """The step of every zeroth-order method, written once: ask -> decode -> query -> loss -> tell.

    A subclass sets ``self.opt`` (a :class:`bbpt.optim.Optimiser`: ``ask() -> (n, d)``,
    ``tell(losses (n,)) -> stats``, ``current_loss``) and ``self.batches``
    (:class:`BatchStream` or :class:`WholeSet`), and overrides only what differs:
    :meth:`candidates` (default: soft contexts decoded by ``self.param``), :meth:`loss`
    (default: cross-entropy), :meth:`tell`, :meth:`after_tell`. A step reports its train loss,
    the optimiser's statistics (what ``tell`` returned) and what :meth:`after_tell` adds.
    """

    state = ("opt", "batches")

    def candidates(self, points: torch.Tensor, images: Images) -> Query:
        """(n, d) points -> what to send for them."""
        return Query(SoftPrompt(self.param.decode(points)), images)  # ctx (n, m, D)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, B, C) logits, (B,) labels -> (n,) losses, lower is better."""
        from .common import ce_per_candidate

        return ce_per_candidate(logits, y)

    def tell(self, losses: torch.Tensor) -> dict:
        """Tell the optimiser the losses; returns its statistics."""
        return self.opt.tell(losses)

    def after_tell(self, losses: torch.Tensor, budget: Budget) -> dict:
        """Work after the optimiser's update (CraFT's head); returns extra stats."""
        return {}

    def step(self, budget: Budget) -> dict | None:
        images, y = self.batches.next()  # (B, 3, S, S), (B,)
        points = self.opt.ask()  # (n, d)
        q = self.candidates(points, images)
        logits = self.box.query(q.prompt, q.images, q.visual)  # (n, B, C)
        losses = self.loss(logits, y)  # (n,)
        stats = self.tell(losses) or {}  # a subclass's tell that returns nothing reports no statistics
        return {"train_loss": self.opt.current_loss(losses), **stats, **self.after_tell(losses, budget)}


METHODS: Registry[type[Method]] = Registry("method", hint="`bbpt methods` lists them.", group="bbpt.methods")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.register(cls.name, cls)
    return cls


def make_config(cls: type[Method], overrides: dict) -> MethodConfig:
    """The method's config with ``overrides`` applied; bad keys or values -> BadInput. The
    string "none" (as typed in ``--set flip=none``) is None for a field that may be None and
    has no literal "none" of its own (``clip='none'`` stays a string)."""
    overrides = {k: None if v == "none" and _takes_none(cls.Config.model_fields.get(k)) else v
                 for k, v in overrides.items()}
    try:
        return cls.Config(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else "?"  # configs are flat: the field's name
        if err["type"] == "extra_forbidden":
            known = ", ".join(cls.Config.model_fields)
            raise BadInput(f"method {cls.name} has no option {loc!r}; its options: {known} (`bbpt methods`)") from None
        field = cls.Config.model_fields.get(loc)
        rng = f" (allowed: {option_range(field)})" if field is not None and option_range(field) else ""
        got = err.get("input")
        why = "is out of range" if err["type"] in _RANGE_ERRORS else f"is invalid: {err['msg']}"
        raise BadInput(f"method {cls.name}: option {loc}={got!r} {why}{rng}") from None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _takes_none(field) -> bool:
    import typing

    return field is not None and type(None) in typing.get_args(field.annotation) and "none" not in _literals(field.annotation)


def option_range(field) -> str:
    """A field's allowed values as text: ">= 1 and <= 10", "'a' | 'b'", "> 0, or 'none'"; "" when
    unconstrained. Bounds come from ``Field(ge=...)`` or from an ``Annotated`` member of a union."""
    import typing

    metas = list(field.metadata) + [m for a in typing.get_args(field.annotation)
                                    if typing.get_origin(a) is typing.Annotated for m in typing.get_args(a)[1:]]
    metas = [x for m in metas for x in (getattr(m, "metadata", None) or [m])]  # FieldInfo inside Annotated
    parts = [f"{sym} {getattr(m, attr)}" for m in metas
             for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if getattr(m, attr, None) is not None]
    out = " and ".join(parts)
    lits = _literals(field.annotation)
    if lits:
        out = (out + ", or " if out else "") + " | ".join(repr(v) for v in lits)
    return out


def _literals(ann) -> list:
    import typing

    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    out = []
    for a in typing.get_args(ann):
        out += _literals(a)
    return out
