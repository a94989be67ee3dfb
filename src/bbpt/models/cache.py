"""Backbones kept across runs in one process (a sweep worker, the protocols' evaluations).

Off by default: each run builds its backbone. A process that runs many runs calls
``backbone_cache.keep()`` once; from then on each (model, pretrained, device) is built once.
Backbones are frozen and every run has its own black box (feature cache, meters), so sharing
one changes nothing a run computes.
"""
from __future__ import annotations

from .backbone import Backbone, create_backbone


class BackboneCache:
    def __init__(self):
        self._kept: dict[tuple, Backbone] | None = None

    @property
    def keeping(self) -> bool:
        return self._kept is not None

    def keep(self) -> None:
        """Keep every backbone built from now on (idempotent)."""
        if self._kept is None:
            self._kept = {}

    def clear(self, stop: bool = False) -> None:
        """Drop the kept backbones; ``stop``: also stop keeping new ones."""
        self._kept = None if stop or self._kept is None else {}

    def get(self, model: str, pretrained: str | None = None, device: str = "cpu") -> Backbone:
        """The backbone: the kept one where there is one, else a new one (kept while keeping)."""
        if self._kept is None:
            return create_backbone(model, pretrained, device)
        key = (model, pretrained, device)
        if key not in self._kept:
            self._kept[key] = create_backbone(*key)
        return self._kept[key]

    def __len__(self) -> int:
        return len(self._kept or {})


backbone_cache = BackboneCache()
