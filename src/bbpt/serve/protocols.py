"""The two protocols real hosted APIs speak, served by ``bbpt serve`` beside its own:

| endpoint                                   | protocol                                           |
|--------------------------------------------|----------------------------------------------------|
| ``POST /v1/zero-shot-image-classification`` | Hugging Face's task: JSON ``{"inputs": base64 image, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}`` (or the raw image bytes with the parameters in the query string) -> ``[{"label", "score"}]``, softmax probabilities, best first |
| ``POST /v1/embeddings``                     | OpenAI's: ``{"model", "input": str or [str], "encoding_format": "float" or "base64"}``; images as ``data:image/...;base64,`` URIs with ``"modality": "image"`` (Infinity's documented form) -> ``{"data": [{"embedding", "index"}], "usage"}`` |

So ``huggingface_hub.InferenceClient(model=URL + "/v1/zero-shot-image-classification")`` and
``openai.OpenAI(base_url=URL + "/v1").embeddings.create`` work against a ``bbpt serve``
server unchanged. Both use the same keys, budgets, limits and thread pool as ``/v1/query``:

- a zero-shot request is one image under one template: 1 api_call, 1 prompt_eval, 1 image;
- an embedding request of T texts and I images costs what :meth:`QueryMeter.embed_cost` says.

Every refusal (key, limits, budget, an undecodable image) comes before any encoding, and a
refused request is not charged.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import BadInput
from ..models import Images, TextPrompt
from ..models.meter import QueryMeter

HF_TEMPLATE = "This is a photo of {}."  # the transformers pipeline's default hypothesis_template
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "application/octet-stream")


def register(app, state: dict, cfg, api: str, auth, body, over_budget, bad, limit, check_chars, check_classes,
             decode_image, OverBudget) -> None:
    """Add both protocols' endpoints to ``app`` (helpers from :func:`bbpt.serve.app.create_app`)."""

    async def charge(server, key, cost: dict, reply: bytes, purpose: str) -> None:
        try:
            await server.run(server.store.charge, key, purpose, cost, reply, None, hashlib.sha256(reply).hexdigest())
        except OverBudget as e:  # a concurrent request of the same key spent the rest meanwhile
            raise over_budget(e) from None

    async def precheck(server, key, cost: dict) -> None:
        try:
            await server.run(server.store.check, key, cost)
        except OverBudget as e:
            raise over_budget(e) from None

    def purpose_of(request: Request) -> str:
        p = request.headers.get("x-bbpt-purpose", "train")
        if p not in ("train", "eval", "side"):
            raise bad("X-BBPT-Purpose must be train, eval or side", "X-BBPT-Purpose")
        return p

    # ---- Hugging Face zero-shot-image-classification -----------------------------------------
    @app.post(f"/{api}/zero-shot-image-classification")
    async def zero_shot(request: Request):
        key = await auth(request)
        server = state["server"]
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await body(request, ("application/json",) + IMAGE_TYPES)
        if ctype == "application/json":
            d = await server.run(_json, raw, bad)
            image_b64, params = d.get("inputs"), d.get("parameters") or {}
            if not isinstance(image_b64, str):
                raise bad("'inputs' must be the image as a base64 string", "inputs")
            try:
                raw_image = base64.b64decode(image_b64, validate=True)
            except (binascii.Error, ValueError):
                raise bad("'inputs' is not valid base64 (an image URL cannot be fetched here: send the bytes)",
                          "inputs") from None
        else:  # raw image bytes; parameters in the query string, as JSON
            raw_image = raw
            try:
                params = {k: json.loads(v) if k == "candidate_labels" else v for k, v in request.query_params.items()}
            except ValueError:
                raise bad("candidate_labels in the query string must be a JSON list", "candidate_labels") from None
        if not isinstance(params, dict):
            raise bad("'parameters' must be an object", "parameters")
        labels = params.get("candidate_labels")
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",") if s.strip()]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise bad("'parameters.candidate_labels' must be a list of at least 2 non-empty strings", "candidate_labels")
        check_classes(server, labels, "candidate_labels")
        template = params.get("hypothesis_template") or HF_TEMPLATE
        if not isinstance(template, str):
            raise bad("'parameters.hypothesis_template' must be a string with {}", "hypothesis_template")
        check_chars(server, [template], "hypothesis_template", "hypothesis_template")
        try:
            prompt = TextPrompt((template,))
        except BadInput as e:
            raise bad(str(e), "hypothesis_template") from None
        purpose = purpose_of(request)
        px = await server.run(decode_image, raw_image, server.info["image_size"])  # (1, 3, S, S)
        box = server.box(list(labels))
        cost = box.meter.cost(1, 1)
        await precheck(server, key, cost)
        try:
            await server.run(box.check_text, prompt)
            logits = await server.batcher.submit((box, prompt, Images(px), None), len(labels))  # (1, 1, C)
        except BadInput as e:
            raise bad(str(e), "candidate_labels") from None
        probs = torch.softmax(logits[0, 0].double(), dim=-1)
        order = torch.argsort(probs, descending=True, stable=True).tolist()
        out = [{"label": labels[i], "score": float(probs[i])} for i in order]
        reply = json.dumps(out).encode()
        await charge(server, key, cost, reply, purpose)
        return JSONResponse(out)

    # ---- OpenAI-style embeddings ----------------------------------------------------------------
    @app.post(f"/{api}/embeddings")
    async def embeddings(request: Request):
        key = await auth(request)
        server = state["server"]
        d = await server.run(_json, await body(request, ("application/json",)), bad)
        inputs = d.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise bad("'input' must be a string or a non-empty list of strings (token-id inputs are not supported)",
                      "input")
        fmt = d.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise bad("'encoding_format' must be float or base64", "encoding_format")
        if d.get("dimensions") is not None:
            raise bad("'dimensions' is not supported: the model's embeddings have a fixed size", "dimensions")
        modality = d.get("modality") or ("image" if all(x.startswith("data:image/") for x in inputs) else "text")
        if modality not in ("text", "image"):
            raise bad("'modality' must be text or image", "modality")
        purpose = purpose_of(request)
        meter = QueryMeter(max_images_per_call=cfg.max_images_per_call)
        if modality == "text":
            if len(inputs) > cfg.max_query_rows:
                raise limit(f"{len(inputs)} texts, over the server's limit of {cfg.max_query_rows} (max_query_rows); "
                            "send fewer per request", "input", "max_query_rows", cfg.max_query_rows, len(inputs))
            check_chars(server, inputs, "input text", "input")
            cost = meter.embed_cost(len(inputs), 0)
            await precheck(server, key, cost)
            try:
                emb = await server.run(server.probe.embed_texts, inputs)  # (T, E)
            except BadInput as e:
                raise bad(str(e), "input") from None
            tokens = sum(len(t.split()) for t in inputs)  # words: the model's tokenizer is the server's business
        else:
            if len(inputs) > cfg.max_query_images:
                raise limit(f"{len(inputs)} images, over the server's limit of {cfg.max_query_images} "
                            "(max_query_images); send fewer per request", "input", "max_query_images",
                            cfg.max_query_images, len(inputs))
            px = await server.run(_decode_uris, inputs, server.info["image_size"], decode_image, bad)  # (I, 3, S, S)
            cost = meter.embed_cost(0, len(inputs))
            await precheck(server, key, cost)
            emb = await server.run(server.probe.embed_images, Images(px))  # (I, E)
            tokens = 0
        data = [{"object": "embedding", "index": i, "embedding": _encode(e, fmt)} for i, e in enumerate(emb)]
        out = {"object": "list", "data": data, "model": server.info["model"],
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        reply = json.dumps({"n": len(data), "cost": cost}).encode()
        await charge(server, key, cost, reply, purpose)
        return JSONResponse(out)


def _json(raw: bytes, bad) -> dict:
    try:
        d = json.loads(raw)
    except ValueError:
        raise bad("the body is not valid JSON", "body") from None
    if not isinstance(d, dict):
        raise bad("the body must be a JSON object", "body")
    return d


def _encode(e: torch.Tensor, fmt: str):
    v = e.float().cpu().numpy().astype("<f4")
    return v.tolist() if fmt == "float" else base64.b64encode(v.tobytes()).decode()


def _decode_uris(uris: list[str], size: int, decode_image, bad) -> torch.Tensor:
    out = []
    for i, u in enumerate(uris):
        head, sep, data = u.partition(",")
        if not (u.startswith("data:image/") and sep and head.endswith(";base64")):
            raise bad(f"input[{i}] is not a data:image/...;base64, URI (image URLs cannot be fetched here: send the "
                      "bytes)", "input")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"input[{i}] is not valid base64", "input") from None
        out.append(decode_image(raw, size))
    return torch.cat(out) if out else torch.empty(0)


def decode_b64_floats(s: str) -> np.ndarray:
    """An embedding sent as base64 little-endian float32 (``encoding_format="base64"``)."""
    return np.frombuffer(base64.b64decode(s), dtype="<f4")
