"""Zero-shot CLIP: the task's manual template, no training and no training queries."""
from __future__ import annotations

from ..models.blackbox import TextPrompt
from .base import Method, MethodConfig, register_method


class ZeroShotConfig(MethodConfig):
    template: str | None = None  # None: the task's own template (CoOp's CUSTOM_TEMPLATES)


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    Config = ZeroShotConfig

    def step(self):
        return None  # nothing to train

    def prompt(self) -> TextPrompt:
        return TextPrompt((self.cfg.template or self.task_info["templates"][0],))
