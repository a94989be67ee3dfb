"""Hugging Face's zero-shot-image-classification protocol (Inference Endpoints, Inference
Providers, ``bbpt serve``): one image and the candidate labels in, softmax probabilities out.

A request is ``POST URL`` with ``{"inputs": base64 PNG, "parameters": {"candidate_labels":
[...], "hypothesis_template": "... {} ..."}}``, answered ``[{"label", "score"}, ...]``, as
``huggingface_hub.InferenceClient.zero_shot_image_classification`` sends it. So a query of P
templates on B images is P x B requests (``concurrency`` in flight), billed per request.

What a method gets: the log-probabilities (P, B, C), in the box's class order. Cross-entropy
on them equals cross-entropy on the model's logits (log-softmax of a log-softmax is itself),
so methods written for logits train on them unchanged. Images travel as 8-bit PNGs: a
prompted image (BAR, BlackVIP) is rounded to 1/255 on the way, as with any image API.
"""
from __future__ import annotations

import base64
from typing import Sequence

import torch

from ..models.blackbox import Images, SoftPrompt, TextPrompt, VisualPrompt
from ..models.meter import QueryMeter
from ._http import HTTPBox, RemoteAPIError, png_bytes
from .capabilities import Capabilities

KIND = "hf"
SCHEMES: tuple[str, ...] = ()
KEY_ENV = "HF_TOKEN"
SUMMARY = "Hugging Face zero-shot-image-classification: a template and pixels in, probabilities out"
MIN_PROB = 1e-30  # a score of 0 (underflow in the API's float32) becomes this before the log: no -inf losses


def capabilities(url: str | None = None) -> Capabilities:
    return Capabilities(accepts=frozenset({"templates", "pixels"}), returns=frozenset({"probabilities"}),
                        billing="requests", note="methods read log-probabilities")


def open(url, classnames, meter, *, key=None, max_images_per_call=None, model=None, pretrained=None, device=None,
         precision=None, backbone_loader=None, **options):
    return HFZeroShotBox(url, classnames, meter, key, **options)


class HFZeroShotBox(HTTPBox):
    kind = KIND

    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.url)

    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None,
                    purpose: str | None = None) -> "HFZeroShotBox":
        return HFZeroShotBox(self.url, classnames, meter if meter is not None else self.meter, self.key,
                             purpose=purpose or self.purpose, **self._options())

    def query(self, prompt: TextPrompt | SoftPrompt, images: Images, visual: VisualPrompt | None = None) -> torch.Tensor:
        """Log-probabilities (P, B, C): P templates x B images requests, charged once all are answered."""
        if not isinstance(prompt, TextPrompt) or visual is not None:
            raise self._no("soft prompts or visual prompt tokens: send a TextPrompt")
        P = self.check_shapes(prompt, images, visual)
        if images.pixels is None:
            raise self._no("uploaded images: send pixels")
        B = len(images)
        self.meter.check(P, B)  # the budget, before anything is sent
        px = images.pixels if images.per_candidate else images.pixels[None]  # (Pi, B, 3, S, S)
        jobs = [(p, b) for p in range(P) for b in range(B)]
        pngs: dict[tuple[int, int], str] = {}
        for p, b in jobs:
            k = (p if images.per_candidate else 0, b)
            if k not in pngs:
                pngs[k] = base64.b64encode(png_bytes(px[k[0], k[1]])).decode()

        def ask(job) -> torch.Tensor:
            p, b = job
            body = {"inputs": pngs[(p if images.per_candidate else 0, b)],
                    "parameters": {"candidate_labels": self.classnames,
                                   "hypothesis_template": prompt.templates[p if len(prompt.templates) > 1 else 0]}}
            return self._scores(self.post("", json=body).json())

        out = torch.stack(self.map(ask, jobs)).view(P, B, -1)  # (P, B, C) probabilities
        self.meter.charge(P, B)
        self.meter.record_billed("requests", P * B)
        return out.clamp_min(MIN_PROB).log()

    def _scores(self, reply) -> torch.Tensor:
        """``[{"label", "score"}]`` -> (C,) probabilities in the box's class order."""
        if not isinstance(reply, list):
            raise RemoteAPIError(f"{self.url} answered {str(reply)[:100]!r}, not a list of {{label, score}}")
        got = {}
        for item in reply:
            if not isinstance(item, dict) or "label" not in item or "score" not in item:
                raise RemoteAPIError(f"{self.url} answered an item {str(item)[:100]!r} without label and score")
            got[item["label"]] = float(item["score"])
        missing = [c for c in self.classnames if c not in got]
        if missing:
            raise RemoteAPIError(f"{self.url} answered no score for {missing[:3]}: it does not return every candidate "
                                 "label (a top-k endpoint); this box needs all of them")
        return torch.tensor([got[c] for c in self.classnames], dtype=torch.float64).float()


