"""The names of the backbones, read without importing torch or open_clip (`bbpt models`).

The embedded architectures are ``configs/*.json`` here. open_clip's are the JSON files of
its ``model_configs`` folder that define ``embed_dim``, ``vision_cfg`` and ``text_cfg``,
in its natural order: the rule of ``open_clip.list_models()``, applied to the files of the
installed package, found with ``importlib.util.find_spec`` (which does not import it). Once
open_clip is imported, its own registry answers (configs added with
``open_clip.add_model_config`` included).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip asks of a model config


def embedded_models() -> list[str]:
    """Names of the architectures that ship with bbpt (``configs/*.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def open_clip_models() -> list[str]:
    """open_clip's architecture names, as ``open_clip.list_models()`` gives them."""
    loaded = sys.modules.get("open_clip")
    if loaded is not None:
        return loaded.list_models()
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    folders = [f for f in folders if f.is_dir()]
    if not folders:  # not installed, or laid out otherwise: let open_clip answer (or say it is missing)
        import open_clip

        return open_clip.list_models()
    names = {}
    for folder in folders:
        for f in folder.glob("*.json"):
            cfg = json.loads(f.read_text(encoding="utf-8"))
            if all(k in cfg for k in OPEN_CLIP_REQUIRED):
                names[f.stem] = None
    return sorted(names, key=_natural_key)


def _natural_key(name: str) -> list:
    """open_clip's sort key: case-insensitive, digit runs compared as numbers."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]
