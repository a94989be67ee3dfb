"""OpenAI-style multimodal embeddings (``POST URL/embeddings``), as Infinity serves CLIP
models, and as ``bbpt serve`` does at ``/v1/embeddings``: a text or an image in, a vector out.

- Texts: ``{"model", "input": [...], "encoding_format": "float"}``.
- Images: ``data:image/png;base64,...`` URIs in ``input``, with ``"modality": "image"``
  (Infinity's documented form; servers that infer the modality from the URI ignore it).

Methods on embeddings (LFA, the linear probe, Tip-Adapter) call :meth:`embed_images` and
:meth:`embed_texts`. Methods on class scores get logits computed here from the embeddings:
``logit_scale`` x cosine (CLIP's 100 by default; ``--box-option logit_scale=...``), so a
zero-shot template or a pixel prompt runs on an embedding API too. Metering: bbpt's units
are those of every box (a scoring query: :meth:`QueryMeter.cost`; an embedding call:
:meth:`QueryMeter.embed_cost`), so a budget means the same steps on any box; what the API
bills (requests, tokens, images) is recorded beside them as ``billed_*``.
"""
from __future__ import annotations

import base64
from typing import Sequence

import numpy as np
import torch

from ..errors import BadInput
from ..models.blackbox import Images, SoftPrompt, TextPrompt, VisualPrompt
from ..models.meter import QueryMeter
from ._http import HTTPBox, RemoteAPIError, png_bytes
from .capabilities import Capabilities

KIND = "openai"
SCHEMES: tuple[str, ...] = ()
KEY_ENV = "OPENAI_API_KEY"
SUMMARY = "OpenAI-style /embeddings (Infinity, bbpt serve): texts and images in, embeddings out"
BATCH = 32  # inputs per embeddings request: Infinity's default limit (OpenAI allows 2048)


def capabilities(url: str | None = None) -> Capabilities:
    return Capabilities(accepts=frozenset({"templates", "pixels"}), returns=frozenset({"embeddings", "logits"}),
                        billing="tokens", note="logits: logit_scale x cosine of the returned embeddings, computed here")


def open(url, classnames, meter, *, key=None, max_images_per_call=None, model=None, pretrained=None, device=None,
         precision=None, backbone_loader=None, **options):
    return EmbeddingsBox(url, classnames, meter, key, **options)


class EmbeddingsBox(HTTPBox):
    """Options beyond :class:`HTTPBox`'s: ``model`` (the name sent in each request; default
    "default"), ``logit_scale`` (100), ``batch`` (inputs per request, 32)."""

    kind = KIND

    def __init__(self, url, classnames, meter, key, *, model: str = "default", logit_scale: float = 100.0,
                 batch: int = BATCH, **kw):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise BadInput(f"--box-option batch={batch!r} must be an integer >= 1 (inputs per embeddings request)")
        self.batch = batch
        if not isinstance(model, str) or not model:
            raise BadInput(f"--box-option model={model!r} must be the model name the API expects")
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not logit_scale > 0:
            raise BadInput(f"--box-option logit_scale={logit_scale!r} must be a number > 0")
        self.model, self.logit_scale = model, float(logit_scale)
        super().__init__(url, classnames, meter, key, **kw)
        self._text_cache: dict[str, torch.Tensor] = {}  # template -> (C, E): a paid request, asked once

    def _options(self) -> dict:
        return {**super()._options(), "model": self.model, "logit_scale": self.logit_scale, "batch": self.batch}

    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.url)

    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None,
                    purpose: str | None = None) -> "EmbeddingsBox":
        return EmbeddingsBox(self.url, classnames, meter if meter is not None else self.meter, self.key,
                             purpose=purpose or self.purpose, **self._options())

    # ---- embeddings -------------------------------------------------------------------------------
    def _embed(self, inputs: list[str], modality: str) -> tuple[torch.Tensor, int]:
        """(N, E) L2-normalised embeddings, BATCH inputs a request; and the tokens the API billed."""
        def ask(part: list[str]):
            body = {"model": self.model, "input": part, "encoding_format": "float"}
            if modality == "image":
                body["modality"] = "image"
            d = self.post("/embeddings", json=body).json()
            try:
                rows = sorted(d["data"], key=lambda r: r["index"])
                vecs = [r["embedding"] for r in rows]
                vecs = [np.frombuffer(base64.b64decode(v), "<f4") if isinstance(v, str) else np.asarray(v, np.float32)
                        for v in vecs]
                used = int((d.get("usage") or {}).get("total_tokens") or 0)
            except (KeyError, TypeError, ValueError) as e:
                raise RemoteAPIError(f"{self.url}/embeddings answered without data[].embedding ({e})") from None
            if len(vecs) != len(part):
                raise RemoteAPIError(f"{self.url}/embeddings answered {len(vecs)} embeddings for {len(part)} inputs")
            return torch.from_numpy(np.stack(vecs)), used

        parts = [inputs[i:i + self.batch] for i in range(0, len(inputs), self.batch)]
        got = self.map(ask, parts)
        emb = torch.cat([e for e, _ in got]).float()
        self.meter.record_billed("requests", len(parts))
        return torch.nn.functional.normalize(emb, dim=-1), sum(t for _, t in got)

    def embed_texts(self, texts) -> torch.Tensor:
        """(N, E) L2-normalised text embeddings; charged as an embedding request."""
        if isinstance(texts, str) or not len(texts) or not all(isinstance(t, str) for t in texts):
            raise BadInput("embed_texts takes a non-empty list of strings")
        cost = self.meter.check_cost(self.meter.embed_cost(len(texts), 0))  # as on every box; before any request
        emb = self._texts(list(texts))
        self.meter.charge_cost(cost)
        return emb

    def embed_images(self, images: Images) -> torch.Tensor:
        """(B, E) L2-normalised image embeddings of one batch (sent as PNG data URIs); charged."""
        self.check_images(images)
        if images.pixels is None or images.per_candidate:
            raise BadInput("embed_images takes one batch of pixels (B, 3, S, S)")
        cost = self.meter.check_cost(self.meter.embed_cost(0, len(images)))
        emb = self._images(images.pixels)
        self.meter.charge_cost(cost)
        return emb

    def _texts(self, texts: list[str]) -> torch.Tensor:
        emb, tokens = self._embed(texts, "text")
        self.meter.record_billed("tokens", tokens)
        return emb

    def _images(self, px: torch.Tensor) -> torch.Tensor:
        uris = self.map(lambda x: "data:image/png;base64," + base64.b64encode(png_bytes(x)).decode(), list(px))
        emb, _ = self._embed(uris, "image")
        self.meter.record_billed("images", len(px))
        return emb

    # ---- class scores from embeddings -------------------------------------------------------------
    def query(self, prompt: TextPrompt | SoftPrompt, images: Images, visual: VisualPrompt | None = None) -> torch.Tensor:
        """Logits (P, B, C) = logit_scale x cosine of image and class-text embeddings. bbpt's
        units are a scoring query's on every box (:meth:`QueryMeter.cost`: P x ceil(B / 128)
        api_calls), so a budget buys the same steps here as in process; what the API bills
        (requests of ``batch`` inputs: each new template's C texts once, each candidate's B
        images) is counted beside them as ``billed_*``."""
        if not isinstance(prompt, TextPrompt) or visual is not None:
            raise self._no("soft prompts or visual prompt tokens: send a TextPrompt")
        P = self.check_shapes(prompt, images, visual)
        if images.pixels is None:
            raise self._no("uploaded images: send pixels")
        new = [t for t in dict.fromkeys(prompt.templates) if t not in self._text_cache]
        px = images.pixels if images.per_candidate else images.pixels[None]  # (Pi, B, 3, S, S)
        cost = self.meter.check(P, len(images))  # the budget, before any request
        fresh = {t: self._texts([t.format(c) for c in self.classnames]) for t in new}  # (C, E) each
        img = torch.stack([self._images(x) for x in px])  # (Pi, B, E)
        self.meter.charge_cost(cost)
        self._text_cache.update(fresh)
        txt = torch.stack([self._text_cache[t] for t in prompt.templates])  # (Pt, C, E)
        return self.logit_scale * torch.einsum("pbe,pce->pbc", img.expand(P, -1, -1), txt.expand(P, -1, -1))
