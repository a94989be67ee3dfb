"""Plain ZO-SGD: ZIP's loop (SPSA, same schedules and budget) directly on the m × D context,
without ZIP's reparameterisation and without clipping."""
from __future__ import annotations

from ..params import Direct
from .base import register_method
from .zip import ZIP, SPSAPromptConfig


@register_method
class ZOSGDMethod(ZIP):
    name = "zosgd"
    Config = SPSAPromptConfig

    def build_param(self, cfg, ctx0, seed):
        return Direct(ctx0)
