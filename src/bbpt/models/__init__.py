"""Models: backbones (inside the black box), the black box itself and its query meter.

The names below are imported on first use (PEP 562), so ``import bbpt.models`` (and the
CLI's listing commands, through :mod:`bbpt.models.catalog`) costs no torch import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOME = {
    "Backbone": "backbone", "create_backbone": "backbone", "embedded_models": "backbone", "open_clip_models": "backbone",
    "BlackBox": "blackbox", "BlackBoxAPI": "blackbox", "Images": "blackbox", "SoftPrompt": "blackbox",
    "TextPrompt": "blackbox", "VisualPrompt": "blackbox", "QueryMeter": "meter", "register_backbone": "catalog",
}
_SUBMODULES = {
    "backbone", "blackbox", "caches", "catalog", "checks", "hf", "localbox", "meter", "openclip", "pretrain", "prompts",
    "protocol", "texts", "whitebox",
}

__all__ = [
    "Backbone", "BlackBox", "BlackBoxAPI", "Images", "QueryMeter", "SoftPrompt", "TextPrompt", "VisualPrompt",
    "create_backbone", "embedded_models", "open_clip_models", "register_backbone",
]

if TYPE_CHECKING:
    from .backbone import Backbone, create_backbone, embedded_models, open_clip_models
    from .blackbox import BlackBox, BlackBoxAPI, Images, SoftPrompt, TextPrompt, VisualPrompt
    from .catalog import register_backbone
    from .meter import QueryMeter


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    elif name in _SUBMODULES:  # `bbpt.models.blackbox` after a bare `import bbpt.models`, as before
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
