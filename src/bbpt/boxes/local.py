"""The in-process box: the model in this process (``--model``), metered like any API.

It takes everything a query can send, the model itself included (the white-box CoOp
reference), and returns logits, or embeddings (``embed_images`` / ``embed_texts``).
"""
from __future__ import annotations

from .capabilities import ACCEPTS, Capabilities

KIND = "local"
SCHEMES: tuple[str, ...] = ()
KEY_ENV = None
SUMMARY = "the model in this process (--model): soft prompts, visual tokens, pixels; logits or embeddings"


def capabilities(url: str | None = None) -> Capabilities:
    return Capabilities(accepts=frozenset(ACCEPTS), returns=frozenset({"logits", "embeddings"}), billing="api_calls")


def open(url, classnames, meter, *, key=None, backbone_loader=None, model: str = "mini", pretrained: str | None = None,
         device: str = "cpu", precision: str = "fp32", **_):
    """A :class:`~bbpt.models.blackbox.BlackBox` over the backbone ``backbone_loader()`` gives
    (the engine's cache), else one built from ``model``, ``pretrained``, ``device``."""
    from ..models.backbone import create_backbone
    from ..models.blackbox import BlackBox

    backbone = backbone_loader() if backbone_loader is not None else create_backbone(model, pretrained, device)
    return BlackBox(backbone, classnames, meter, precision=precision)
