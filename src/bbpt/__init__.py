"""bbpt: black-box prompt tuning for vision-language models.

From Python::

    import bbpt

    result = bbpt.run(method="zip", dataset="mnist", shots=4, options={"budget": 200})
    print(result.accuracy.test, result.queries["api_calls"])

The names below are imported on first use (PEP 562): ``import bbpt`` stays cheap (no torch),
so the command line starts fast.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

__all__ = ["METHODS", "BlackBox", "RunConfig", "RunResult", "evaluate", "evaluate_prompt", "run"]

_HOME = {  # name -> the module that defines it
    "RunConfig": "bbpt.config",
    "RunResult": "bbpt.run_result",
    "BlackBox": "bbpt.models",
    "METHODS": "bbpt.methods",
    "evaluate": "bbpt.evaluation",
    "evaluate_prompt": "bbpt.evaluation",
}

if TYPE_CHECKING:
    from .config import RunConfig
    from .evaluation import evaluate, evaluate_prompt
    from .methods import METHODS
    from .models import BlackBox
    from .run_result import RunResult


def run(config: RunConfig | dict[str, Any] | None = None, /, out: str | Path | None = None, *, progress: bool = True,
        force: bool = False, log: Callable[[str], None] | None = None, key_file: str | None = None,
        **fields: Any) -> RunResult:
    """Run one method on one task and return its :class:`RunResult`.

    ``config``: a :class:`RunConfig`, or a mapping of its fields; ``fields`` (keyword
    arguments: ``method="zip", dataset="mnist", options={"budget": 200}``) add to or override
    it. ``out``: a run folder for result.json, curve.csv, the prompt and checkpoints (an
    unfinished run there resumes); None keeps nothing on disk. An unknown field or a value out
    of range raises :class:`bbpt.errors.BadInput` with a one-line message.
    """
    from .config import RunConfig, make_run_config
    from .engine import run as run_engine

    if isinstance(config, RunConfig):
        cfg = make_run_config(**{**config.model_dump(), **fields}) if fields else config
    elif config is None or isinstance(config, dict):
        cfg = make_run_config(**{**(config or {}), **fields})
    else:
        from .errors import BadInput

        raise BadInput(f"bbpt.run takes a RunConfig or a dict of run fields, not a {type(config).__name__}")
    return run_engine(cfg, out=out, progress=progress, force=force, log=log, key_file=key_file)


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'bbpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
