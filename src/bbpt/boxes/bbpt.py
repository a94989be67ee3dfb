"""bbpt's own API (``bbpt serve``): everything the in-process box takes but the model itself.

The wire format lives in :mod:`bbpt.serve.client` (the client) and :mod:`bbpt.serve.wire`.
"""
from __future__ import annotations

from ..errors import BadInput
from .capabilities import Capabilities

KIND = "bbpt"
SCHEMES = ("http", "https")  # a bare URL is a bbpt server
KEY_ENV = "BBPT_API_KEY"
SUMMARY = "a `bbpt serve` server: soft prompts, visual tokens, pixels, uploaded ids; logits"


def capabilities(url: str | None = None) -> Capabilities:
    return Capabilities(accepts=frozenset({"templates", "soft_context", "visual_tokens", "pixels", "uploaded_ids"}),
                        returns=frozenset({"logits"}), billing="api_calls")


def open(url, classnames, meter, *, key=None, model: str | None = None, pretrained: str | None = None,
         max_images_per_call: int | None = None, **_):
    """The server's black box, checked against the run: the same model and pricing."""
    from ..serve.client import RemoteBlackBox

    if not key:
        raise BadInput(f"no API key for {url}: set BBPT_API_KEY, pass --key-file, or add it to the keys file "
                       "(a key is printed by `bbpt serve keys add NAME`)")
    box = RemoteBlackBox(url, key, classnames, meter)
    served = (box.info["model"], box.info["pretrained"])
    if model is not None and served != (model, pretrained):
        raise BadInput(f"the server at {url} serves {served[0]} ({served[1] or 'its default weights'}), not "
                       f"{model} ({pretrained or 'default weights'}); pass --model {served[0]}"
                       + (f" --pretrained {served[1]}" if served[1] else ""))
    if max_images_per_call is not None and box.max_images_per_call != max_images_per_call:
        raise BadInput(f"the server prices {box.max_images_per_call} images per api_call, the run "
                       f"{max_images_per_call}; set max_images_per_call to {box.max_images_per_call}")
    return box
