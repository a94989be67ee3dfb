"""A run's configuration: :class:`RunConfig`, the fields that identify a stored run, and
reading them from a file or from keyword arguments with one-line errors.

Light (pydantic only, no torch): the command line builds ``bbpt run``'s options from
:class:`RunConfig`'s fields at start-up, and listing commands must stay fast."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadInput
from .tracking import DEFAULT_TRACKERS, check as check_trackers

MAX_SEED = 2**31 - 1


class RunConfig(BaseModel):
    """Everything that determines a run; stored in run.json and result.json."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # strict: true is not 1; inf / nan are no values

    method: str = Field("zip", min_length=1, description="method name (`bbpt methods`)")
    dataset: str = Field("fashion-mnist", min_length=1, description="registered task (`bbpt datasets`), NAME@SHIFT for "
                         "its shifted test split, or a path to an image folder")
    model: str = Field("mini", min_length=1, description="backbone: 'mini' (embedded), an open_clip architecture (e.g. "
                       "ViT-B-16), or a Hugging Face CLIP / SigLIP model hf:ORG/NAME or hf:/path/to/folder "
                       "(`bbpt models` lists them)")
    pretrained: str | None = Field(None, min_length=1, description="weights: an open_clip tag (e.g. openai), a local "
                                   "checkpoint path, or 'random' (untrained); unset: mini's shipped weights, or an hf: "
                                   "model's own (its hub id or folder names them; only 'random' applies)")
    shots: int = Field(16, ge=1, le=100_000, description="training images per class: any count >= 1 (the papers use "
                       "1, 2, 4, 8, 16), at most what the smallest class has")
    seed: int = Field(1, ge=0, le=MAX_SEED, description="seed of the few-shot sample and of the method")
    device: str = Field("cpu", description="where the model runs: cpu, cuda (the current GPU), cuda:N (GPU N) or mps "
                        "(Apple silicon)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or bf16 / fp16 autocast on CUDA")
    eval_every: int = Field(0, ge=0, description="budget units between curve points (and checkpoints); 0: about 20 "
                            "points")
    eval_batch: int = Field(500, ge=1, le=100_000, description="images per evaluation query (train loss, val, test; "
                            "not charged to the budget)")
    max_images_per_call: int = Field(128, ge=1, le=100_000, description="the API's images per call (ZIP's 128): a query "
                                     "of P prompts on B images costs P x ceil(B / this) api_calls")
    classes: Literal["all", "base", "new"] = Field("all", description="all classes, or CoOp's base half (the first "
                                                   "ceil(n/2)) / new half (the rest)")
    test_subset: int | None = Field(None, ge=1, description="test on a seeded, stratified subset of N test images (quick "
                                    "looks; marked as not comparable to full-test numbers)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many method steps (quick looks)")
    remote: str | None = Field(None, min_length=1, description="URL of a `bbpt serve` black box (the same as --box URL)")
    # Added after runs were stored: left out of a sweep's run hash while unset (`identity`).
    box: str | None = Field(None, min_length=1, description="the black box: local (default: the model in this "
                            "process), a `bbpt serve` URL, or KIND:URL: hf:URL (Hugging Face "
                            "zero-shot-image-classification), openai:URL (OpenAI-style /embeddings); "
                            "`bbpt methods --box BOX` lists what runs on it")
    box_options: dict[str, Any] | None = Field(None, description="options of the box's transport (e.g. image_size, "
                                               "concurrency; `bbpt methods --box KIND:URL` lists them)")
    options: dict[str, Any] = Field({}, description="method options over its paper defaults")
    # Where the run is logged, not what it is: excluded from model_dump, so from the stored
    # configuration, the run hash and resume's comparison (:mod:`bbpt.tracking`).
    loggers: list[str] = Field(DEFAULT_TRACKERS, exclude=True, description="where the curve, config and accuracy are "
                               "logged: tensorboard (RUN/tb/), wandb (offline, RUN/wandb/; needs the wandb "
                               "package, bbpt's trackers extra), or none; not part of the run's identity")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v):
            raise ValueError("use cpu, cuda, cuda:N or mps")
        return v

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, v: list[str]) -> list[str]:
        try:
            check_trackers(v)
        except BadInput as e:
            raise ValueError(str(e)) from None
        return v


LATE_FIELDS = ("box", "box_options")  # run fields added after sweeps were committed


def identity(cfg: RunConfig) -> dict:
    """The run's fields as stored and hashed: those of :data:`LATE_FIELDS` only when set, so
    runs stored before they existed keep their hashes."""
    return {k: v for k, v in cfg.model_dump().items() if not (k in LATE_FIELDS and v is None)}


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"config file {p} is a folder; pass a JSON or TOML file of run fields")
    if not p.is_file():
        raise BadInput(f"config file {p} does not exist; pass a JSON or TOML file of run fields")
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        if kind == "TOML":
            from ._compat import tomllib

            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"config file {p} is not valid {kind}: {str(e).splitlines()[0]}") from None
    example = '{"dataset": "mnist", "shots": 16, "options": {"budget": 1000}}'
    if not isinstance(data, dict):
        raise BadInput(f"config file {p} holds a {kind} {type(data).__name__}; it must hold a mapping of run fields, "
                       f"e.g. {example}")
    if not isinstance(data.get("options", {}), dict):
        raise BadInput(f"config file {p}: 'options' must be a mapping of method options, e.g. {example}")
    return data


def make_run_config(**kw) -> RunConfig:
    try:
        return RunConfig(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "extra_forbidden":
            raise BadInput(f"unknown run field {loc!r}; run fields: {', '.join(RunConfig.model_fields)}") from None
        from .methods.base import option_range  # torch: only on an error

        field = RunConfig.model_fields.get(loc)
        rng = option_range(field) if field is not None else ""
        msg = "is out of range" if err["type"] in _RANGE_ERRORS else "is invalid: " + err["msg"].removeprefix("Value error, ")
        raise BadInput(f"--{loc.replace('_', '-')} {err.get('input')!r} {msg}" + (f" (allowed: {rng})" if rng else "")) from None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
