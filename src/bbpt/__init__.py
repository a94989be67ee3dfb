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
import logging
from typing import TYPE_CHECKING

logging.getLogger(__name__).addHandler(logging.NullHandler())  # the library logs; only an application (the CLI) configures

__all__ = ["METHODS", "BlackBox", "RunConfig", "RunResult", "evaluate", "evaluate_prompt", "run"]

_HOME = {  # name -> the module that defines it
    "run": "bbpt.api",
    "RunConfig": "bbpt.config",
    "RunResult": "bbpt.run_result",
    "BlackBox": "bbpt.models",
    "METHODS": "bbpt.methods",
    "evaluate": "bbpt.evaluation",
    "evaluate_prompt": "bbpt.evaluation",
}

if TYPE_CHECKING:
    from .api import run
    from .config import RunConfig
    from .evaluation import evaluate, evaluate_prompt
    from .methods import METHODS
    from .models import BlackBox
    from .run_result import RunResult


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'bbpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
