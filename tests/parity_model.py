"""What the parity tests share: the fixtures (``tests/parity/*.json``, written by
``tools/parity/*.py`` from the official code) and the toy CLIP of ``tools/parity/toy.py`` as a
bbpt backbone, so a method runs through the real, metered :class:`bbpt.models.BlackBox`."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))

from fixture import all_fixtures, load  # noqa: E402
from toy import LOGIT_SCALE, ToyCLIP  # noqa: E402
from toy import ToyViT  # noqa: E402

from bbpt.models.backbone import Backbone, TextEncoder  # noqa: E402

__all__ = ["load", "all_fixtures", "ToyBackbone", "toy_env", "close"]


class ToyText(TextEncoder):
    causal = True
    pad_id = 0

    def __init__(self, toy: ToyCLIP):
        self.toy, self.width, self.context_length = toy, toy.width, toy.context_length

    def embed(self, ids):
        return self.toy.token_embedding(ids)

    def eos_positions(self, ids):
        return ids.argmax(-1)

    def encode(self, x, ids, cut=True):
        if cut:
            L = self.real_length(ids)
            x, ids = x[:, :L], ids[:, :L]
        return self.toy.encode_text(x, ids)


class ToyBackbone(Backbone):
    """The toy CLIP behind bbpt's backbone protocol (inputs already in [0, 1]: mean 0, std 1)."""

    pretrained = "parity fixture"
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    device = torch.device("cpu")

    def __init__(self, arrays: dict, classnames: list[str]):
        self.toy = ToyCLIP(arrays, classnames)
        self.name, self.image_size = "toy", self.toy.image_size
        self.text = ToyText(self.toy)
        self.model = torch.nn.Module()
        self.vit = ToyViT(arrays) if "vit_conv1" in arrays else None  # visual prompt tokens (BPT-VLM)
        self._finish()

    @property
    def logit_scale(self) -> float:
        return LOGIT_SCALE

    def tokenize(self, texts):
        return self.toy.tokenize(texts)

    def encode_images(self, pixels):
        return self.toy.encode_image(self.normalize(pixels))

    # visual prompt tokens: only a toy with a ViT (toy.generate_vit's arrays)
    @property
    def visual_width(self):
        return None if self.vit is None else self.vit.width

    def patch_tokens(self, pixels):
        if self.vit is None:
            raise self._no_visual_tokens()
        return self.vit.patch_tokens(self.normalize(pixels))

    def encode_tokens(self, x, prompt=None):
        if self.vit is None:
            raise self._no_visual_tokens()
        return self.vit.encode_tokens(x, prompt)


def toy_env(fx: dict, method_cls, *, seed: int, meter_budget: dict | None = None):
    """(box, env) for ``method_cls`` on the fixture's toy model and images, as the engine builds them."""
    from bbpt.data.core import ImageSet
    from bbpt.methods.base import Env, FewShotData
    from bbpt.models import BlackBox, QueryMeter

    arrays, classnames = fx["inputs"]["model"], list(fx["inputs"]["classnames"])
    bb = ToyBackbone(arrays, classnames)
    n = int(fx["inputs"].get("n_train", len(arrays["labels"])))  # the training images come first
    images = ImageSet(labels=arrays["labels"][:n], ids=np.array([f"img{i}" for i in range(n)]), array=arrays["pixels"][:n])
    box = BlackBox(bb, classnames, QueryMeter(meter_budget or {}))
    data = FewShotData(images, bb.image_size)
    task = {"name": "toy", "classnames": classnames, "templates": list(fx["inputs"].get("templates", ["a photo of a {}."]))}
    env = Env(box, data, task, seed, method_cls, white_box=lambda: None)
    return box, env


def close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6, what: str = "") -> None:
    """Float32 tolerance, with the worst element named on failure."""
    a = np.asarray(actual.detach() if hasattr(actual, "detach") else actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != official {e.shape}"
    err = np.abs(a - e) - rtol * np.abs(e)
    i = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
    assert err.size == 0 or err[i] <= atol, (f"{what}: bbpt {a[i]!r} vs official {e[i]!r} at {i} "
                                              f"(|diff| {abs(a[i] - e[i]):.3g})")
