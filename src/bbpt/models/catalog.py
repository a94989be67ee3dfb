"""The backbones: a registry of families (name or prefix -> loader), and their names, read
without importing torch or open_clip (`bbpt models`).

A family registers once (:func:`register_backbone`): the names it builds (``names``, listed
by `bbpt models`) or the name prefix it claims (``prefix``, e.g. ``hf:``), and its loader
``(name, pretrained, device) -> Backbone`` (a prefix family's loader gets the name without
the prefix), given as the function or as ``"module:function"``, imported on first use.
:func:`bbpt.models.backbone.create_backbone` builds a name with the first family claiming it
(prefix families first, then the others in the order registered); plugins register theirs
through the ``bbpt.backbones`` entry-point group (:mod:`bbpt.plugins`), never a name or
prefix a family has already.

The embedded architectures are ``configs/*.json`` here. open_clip's are the JSON files of
its ``model_configs`` folder that define ``embed_dim``, ``vision_cfg`` and ``text_cfg``,
in its natural order: the rule of ``open_clip.list_models()``, applied to the files of the
installed package, found with ``importlib.util.find_spec`` (which does not import it). Once
open_clip is imported, its own registry answers (configs added with
``open_clip.add_model_config`` included).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

from ..plugins import NameTaken
from ..registry import Registry

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


# ---- the registry of backbone families -------------------------------------------------------
Loader = Union[str, Callable]  # (name, pretrained, torch.device) -> Backbone, or "module:function"


@dataclass(frozen=True)
class BackboneFamily:
    """A kind of backbone: the names (or the name prefix) it claims and the loader that builds one."""

    name: str
    loader: Loader
    names: Callable[[], Iterable[str]] = tuple  # the names it builds (listed by `bbpt models`)
    prefix: str | None = None  # a name prefix it claims ("hf:"): the loader gets the rest of the name
    summary: str = ""  # what `bbpt models` says of it
    inline: bool = False  # `bbpt models`: the summary, then the names on one line (else a line per name)

    def claims(self, name: str) -> bool:
        return name.startswith(self.prefix) if self.prefix else name in self.names()

    def build(self, name: str, pretrained, device):
        fn = self.loader
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(name[len(self.prefix):] if self.prefix else name, pretrained, device)

    def listing(self) -> list[str]:
        names = list(self.names())
        if self.inline:
            return [f"{self.summary}:", "  " + ", ".join(names)]
        return [f"{n:24s} {self.summary}" for n in names] if names else [self.summary]


BACKBONES: Registry[BackboneFamily] = Registry("backbone family", hint="`bbpt models` lists them.",
                                               group="bbpt.backbones")


def register_backbone(family: str, loader: Loader | None = None, *, names: Iterable[str] | Callable = (),
                      prefix: str | None = None, summary: str = "", inline: bool = False):
    """Register backbone family ``family``; as a decorator on the loader when ``loader`` is not
    given. ``names``: the names it builds, or a function returning them (read when asked)."""
    def add(fn: Loader) -> Loader:
        listed = names if callable(names) else (lambda fixed=tuple(names): fixed)
        fam = BackboneFamily(family, fn, listed, prefix, summary, inline)
        _check_free(fam)
        BACKBONES.register(family, fam)
        return fn

    return add(loader) if loader is not None else add


def _check_free(new: BackboneFamily) -> None:
    """NameTaken unless ``new`` (a plugin's family) claims no name or prefix another family claims."""
    from ..plugins import current

    if current() is None:
        return
    mine = set(new.names())
    for _, fam in BACKBONES.items(with_plugins=False):
        taken = sorted(n for n in mine if fam.claims(n))
        if fam.prefix and new.prefix and (new.prefix.startswith(fam.prefix) or fam.prefix.startswith(new.prefix)):
            taken.append(f"{new.prefix}*")
        elif fam.prefix is None and new.prefix:
            taken += sorted(n for n in fam.names() if n.startswith(new.prefix))
        if taken:
            raise NameTaken(f"backbone {', '.join(map(repr, taken[:3]))} is claimed already by the family {fam.name!r} "
                            f"(by {BACKBONES.owner(fam.name)}) and a plugin cannot replace it; rename the plugin's")


def find_family(name: str) -> BackboneFamily | None:
    """The family that builds ``name``: prefix families first (the longest prefix), then the
    others in the order registered; plugins are loaded only if no built-in family claims it."""
    for with_plugins in (False, True):
        fams = [f for _, f in BACKBONES.items(with_plugins)]
        for fam in sorted(fams, key=lambda f: -len(f.prefix or "")):  # stable: registration order otherwise
            if fam.claims(name):
                return fam
    return None


def model_names() -> list[str]:
    """Every name a family lists (prefix families list none)."""
    return [n for _, fam in BACKBONES.items() for n in fam.names()]


def listing() -> list[str]:
    """What `bbpt models` prints: each family's lines, in the order registered."""
    return [line for _, fam in BACKBONES.items() for line in fam.listing()]


register_backbone("embedded", "bbpt.models.openclip:create_embedded", names=embedded_models,
                  summary="embedded (weights shipped with bbpt)")
register_backbone("open_clip", "bbpt.models.openclip:create_open_clip", names=open_clip_models, inline=True,
                  summary="open_clip architectures (need --pretrained TAG, a checkpoint path, or 'random')")
register_backbone("hf", "bbpt.models.hf:create_hf", prefix="hf:",
                  summary="Hugging Face CLIP / SigLIP: hf:ORG/NAME (from the local cache when HF_HUB_OFFLINE=1) or "
                          "hf:/path/to/save_pretrained/folder; --pretrained random for untrained weights")
