"""Zero-shot CLIP: the task's manual template, no training and no training queries."""
from __future__ import annotations

from pydantic import Field

from ..boxes.capabilities import Needs
from ..models.blackbox import TextPrompt
from .base import Method, MethodConfig, register_method


class ZeroShotConfig(MethodConfig):
    template: str | None = Field(None, min_length=3, description="a template with {}; none: the task's own")

    augment: bool = Field(False, description="zero-shot trains nothing: no training views")

    sources = {
        "augment": "CoOp's ZeroshotCLIP: no training images",

        "budget": "CoOp's ZeroshotCLIP: no training, no training queries",
        "template": "CoOp: CUSTOM_TEMPLATES, one per dataset (the task's own)",
    }


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    needs = Needs(frozenset({"templates"}))
    Config = ZeroShotConfig

    def step(self, budget):
        return None  # nothing to train

    def prompt(self) -> TextPrompt:
        return TextPrompt((self.cfg.template or self.task_info["templates"][0],))
