"""``bbpt serve``: the black box as an HTTP API (FastAPI), versioned under ``/v1``.

| endpoint                 | what                                                               |
|--------------------------|--------------------------------------------------------------------|
| ``GET /v1/model``        | public metadata: image size, context width and length, ...         |
| ``POST /v1/class_sets``  | register class names (JSON ``{"names": [...]}``) -> ``{"id"}``      |
| ``DELETE /v1/class_sets/{id}`` | drop one of the key's class sets (frees its quota)             |
| ``POST /v1/images``      | upload images (uint8 / float pixels as safetensors, or a PNG/JPEG) -> content-hash ids; their features are computed once and kept |
| ``POST /v1/query``       | logits (P, B, C) of P candidates on B images; charged to the key    |
| ``POST /v1/embed_words`` | word embeddings of a text (initial soft prompts); not charged      |
| ``POST /v1/embed_patches`` | a ViT's input tokens for images (visual prompt scale); not charged |
| ``GET /v1/usage``        | the key's counts, per purpose, and its budget                      |
| ``POST /v1/zero-shot-image-classification`` | Hugging Face's protocol (:mod:`bbpt.serve.protocols`) |
| ``POST /v1/embeddings``  | OpenAI's embeddings protocol, texts and images (ditto)             |

Tensors travel as safetensors (:mod:`bbpt.serve.wire`). Authentication: ``Authorization:
Bearer bbpt-...`` (:mod:`bbpt.serve.store`). Errors are ``{"error": {"message", "type",
"code", "param"}}``: 401 missing or wrong key, 404 / 405 no such endpoint, 409 an
Idempotency-Key reused with another body (or still in flight), 403 ``quota_exceeded`` (a
key storing more class sets or images than its quota), 413 a body or a query over a limit
(``request_too_large``, ``limit_exceeded``: naming the limit, its value and the fix), 415 a
wrong content type, 422 a malformed request (naming the field), 429 ``budget_exhausted`` with
the counts. Client input never yields a 5xx.

Every refusal (key, limits, shapes, quota, budget) comes before any text is tokenised or any
image encoded, so a refused request costs the server almost nothing (an upload is decoded
first: its content hash is what the image quota counts). The work
itself (parsing bodies, decoding, tokenising, encoding, forwards, packing replies, the
database) runs in a thread pool of ``workers`` threads, never on the event loop: a big query
does not hold up ``/v1/health`` or anyone else's request. The per-request limits keep each
piece of it bounded, and every cache is bounded by bytes (least recently used first out).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadInput, BBPTError
from ..models import BlackBox, Images, QueryMeter, SoftPrompt, TextPrompt, VisualPrompt, create_backbone
from ..models.blackbox import ByteLRU, FeatureCache, image_tokens
from ..models.prompts import preview
from .batcher import Batcher
from .store import IdempotencyMismatch, OverBudget, QuotaExceeded, Store
from .wire import CONTENT_TYPE, WireError, pack, unpack

PURPOSES = ("train", "eval", "side")
API_VERSION = "v1"


@dataclass
class ServeConfig:
    model: str = "mini"
    pretrained: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    db: str = "serve.db"
    max_batch: int = 32  # queries merged into one forward (1: no batching)
    max_batch_rows: int = 1024  # and at most this many text sequences (candidates x classes) in it
    max_wait_ms: float = 0.0  # how long a query waits for others to join it (0: only those already queued)
    max_request_bytes: int = 256 << 20
    max_images_per_call: int = 128  # the pricing: B images cost ceil(B / this) api_calls per candidate
    # per-request limits (413 limit_exceeded), checked before anything is tokenised or encoded
    max_classes: int = 4096  # class names in a query or a registered class set
    max_query_rows: int = 16384  # candidate x class text sequences in one query
    max_query_images: int = 4096  # images in a query (candidate x image when re-encoded per candidate)
    max_query_logits: int = 1 << 24  # P x B x C scores in one reply (64 MiB of float32)
    max_visual_tokens: int | None = None  # per candidate; None: the ViT's own sequence (1 + G, 197 for ViT-B/16)
    max_text_chars: int = 1000  # characters in a template, a class name, a suffix or an embed_words text
    # per-key quotas on what a key stores (403 quota_exceeded)
    max_class_sets_per_key: int = 100
    max_images_per_key: int = 100_000
    # caches, bounded by bytes (least recently used first out)
    text_cache_bytes: int = 64 << 20  # token ids of prompt texts
    feature_cache_bytes: int = 256 << 20  # uploaded images' features (the rest is read back from the database)
    box_cache_bytes: int = 16 << 20  # class lists of recently used class sets
    workers: int = 4  # threads doing the work (parsing, tokenising, encoding, the database) off the event loop


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param, self.extra = status, message, type_, code, param, extra


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(422, message, code=code, param=param)


def _limit(message: str, param: str, name: str, limit: int, requested: int) -> APIError:
    """413 for a request over one of the server's limits (``name``, a ServeConfig field)."""
    return APIError(413, message, code="limit_exceeded", param=param,
                    extra={"limit": name, "max": limit, "requested": requested})


def _over_quota(e: QuotaExceeded, name: str, fix: str) -> APIError:
    return APIError(403, f"quota exceeded: this key stores {e.stored} {e.what}, at most {e.quota} ({name}), and this "
                    f"request would add {e.adding}; {fix}", "invalid_request_error", "quota_exceeded",
                    extra={"stored": e.stored, "quota": e.quota, "adding": e.adding})


class Server:
    """What the app holds: the model, its class-set boxes, the store, the batcher, the caches
    (bounded by bytes) and the thread pool the work runs in."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model, cfg.pretrained, cfg.device)
        self.model_id = f"{cfg.model}:{cfg.pretrained or 'default'}"
        if (cfg.pretrained or "").lower() in ("random", "none"):  # new weights in every process: keep no features
            self.model_id += f":{uuid.uuid4().hex}"
        self.store = Store(cfg.db)
        self.cache = FeatureCache(cfg.feature_cache_bytes, self._load_features, self._save_features)
        self.texts = ByteLRU(cfg.text_cache_bytes)
        self.boxes = ByteLRU(cfg.box_cache_bytes)
        self.pool = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="bbpt-serve")
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_batch_rows)
        self.inflight: set[tuple[str, str]] = set()
        probe = self.probe = self.box(["a", "b"])
        self.info = {"api": API_VERSION, "model": cfg.model, "pretrained": cfg.pretrained, "image_size": probe.image_size,
                     "ctx_dim": probe.ctx_dim, "context_length": probe.context_length,
                     "visual_width": probe.visual_width, "pixel_mean": list(probe.pixel_mean),
                     "pixel_std": list(probe.pixel_std), "max_images_per_call": cfg.max_images_per_call,
                     "max_request_bytes": cfg.max_request_bytes, "batching": {"max_batch": cfg.max_batch,
                                                                              "max_rows": cfg.max_batch_rows,
                                                                              "max_wait_ms": cfg.max_wait_ms},
                     "limits": {"max_classes": cfg.max_classes, "max_query_rows": cfg.max_query_rows,
                                "max_query_images": cfg.max_query_images, "max_query_logits": cfg.max_query_logits,
                                "max_visual_tokens": probe.max_visual_tokens, "max_text_chars": cfg.max_text_chars},
                     "quotas": {"max_class_sets_per_key": cfg.max_class_sets_per_key,
                                "max_images_per_key": cfg.max_images_per_key}}

    async def run(self, fn, *args):
        """``fn(*args)`` in the worker pool: the event loop only waits for it."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # work under way ends before the database closes
        self.store.close()

    # ---- uploaded image features survive restarts and evictions (kept in the store, by model)
    def _load_features(self, ids: list[str]) -> dict[str, torch.Tensor]:
        return {i: torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).to(self.backbone.device)
                for i, blob in self.store.features(self.model_id, ids)}

    def _save_features(self, feats: dict[str, torch.Tensor]) -> None:
        self.store.put_features(self.model_id, [(i, f.float().cpu().numpy().tobytes()) for i, f in feats.items()])

    def _visual_tokens(self) -> int | None:
        """The server's visual-token limit: ``max_visual_tokens``, by default the ViT's own 1 + G."""
        if self.cfg.max_visual_tokens is not None:
            return self.cfg.max_visual_tokens
        return image_tokens(self.backbone)

    def box(self, classes: list[str]) -> BlackBox:
        key = json.dumps(classes)
        box = self.boxes.get(key)
        if box is None:
            box = BlackBox(self.backbone, classes, QueryMeter(max_images_per_call=self.cfg.max_images_per_call),
                           precision=self.cfg.precision, max_visual_tokens=self._visual_tokens(),
                           _cache=self.cache, _text_cache=self.texts)
            self.boxes.put(key, box, 2 * len(key) + 64 * len(classes))  # about: the key and the list of names
        return box


# ---- request parsing: every refusal, nothing tokenised or encoded ------------------------------
def _classes(server: Server, meta: dict, param: str = "classes") -> list[str]:
    if "class_set" in meta:
        cs = meta["class_set"]
        names = server.store.class_set(cs) if isinstance(cs, str) else None
        if names is None:
            raise _bad(f"unknown class set {cs!r}; register it with POST /v1/class_sets", "class_set", "unknown_class_set")
        _check_classes(server, names, "class_set")  # registered under the limits of its day
        return names
    names = meta.get("classes")
    if not isinstance(names, list) or not names:
        raise _bad("give 'classes' (a non-empty list of class names) or a registered 'class_set'", param)
    _check_classes(server, names, param)
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise _bad("give 'classes' (a non-empty list of class names) or a registered 'class_set'", param)
    return names


def _check_classes(server: Server, names: list, param: str) -> None:
    lim = server.cfg.max_classes
    if len(names) > lim:
        raise _limit(f"{len(names)} classes, over the server's limit of {lim} (max_classes); send at most {lim} "
                     "per query or class set, e.g. split the classes over several queries", param, "max_classes",
                     lim, len(names))
    _check_chars(server, [n for n in names if isinstance(n, str)], "class name", param)


def _check_chars(server: Server, texts: list[str], what: str, param: str) -> None:
    lim = server.cfg.max_text_chars
    long = next((t for t in texts if len(t) > lim), None)
    if long is not None:
        raise _limit(f"{what} {preview(long)!r} has {len(long)} characters, over the server's limit of {lim} "
                     f"(max_text_chars); shorten it", param, "max_text_chars", lim, len(long))


def _pixels(t: torch.Tensor, param: str, size: int) -> torch.Tensor:
    """uint8 (·, 3, S, S) -> /255, or float in [0, 1] as is (float32)."""
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise _bad(f"{param} has dtype {t.dtype}; send uint8 (0-255) or float32 in [0, 1]", param)
    return t.float()


def _prompt(server: Server, meta: dict, tensors: dict):
    p = meta.get("prompt")
    if not isinstance(p, dict) or p.get("type") not in ("text", "soft"):
        raise _bad("'prompt' must be {\"type\": \"text\", \"templates\": [...]} or {\"type\": \"soft\"} with a 'ctx' tensor",
                   "prompt")
    if p["type"] == "text":
        t = p.get("templates")
        if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
            raise _bad("'prompt.templates' must be a non-empty list of strings with '{}'", "prompt.templates")
        _check_chars(server, t, "template", "prompt.templates")
        return TextPrompt(tuple(t))
    if "ctx" not in tensors:
        raise _bad("a soft prompt needs the tensor 'ctx' (P, m, D) or (P, C, m, D)", "ctx")
    ctx = tensors["ctx"]
    if not torch.is_floating_point(ctx):
        raise _bad(f"ctx has dtype {ctx.dtype}; send float32", "ctx")
    L = server.info["context_length"]
    if ctx.ndim >= 2 and ctx.shape[-2] > L:
        raise _bad(f"ctx has {ctx.shape[-2]} context tokens, more than the model's whole context of {L}; use fewer "
                   "context tokens (n_ctx)", "ctx")
    suffix = p.get("suffix", ".")
    if not isinstance(suffix, str):
        raise _bad("'prompt.suffix' must be a string", "prompt.suffix")
    _check_chars(server, [suffix], "suffix", "prompt.suffix")
    return SoftPrompt(ctx.float(), suffix=suffix)


def _check_limits(server: Server, C: int, prompt, meta: dict, tensors: dict) -> None:
    """The per-request limits, from the shapes alone: P x C text sequences, the images (P x B
    when re-encoded per candidate), P x B x C scores, visual tokens per candidate."""
    cfg = server.cfg
    px, vis, ids = tensors.get("pixels"), tensors.get("visual"), meta.get("images")
    Pt = len(prompt.templates) if isinstance(prompt, TextPrompt) else (int(prompt.ctx.shape[0]) if prompt.ctx.ndim else 1)
    Pv = int(vis.shape[0]) if vis is not None and vis.ndim else 1
    Pi = int(px.shape[0]) if px is not None and px.ndim == 5 else 1
    P = max(Pt, Pv, Pi)
    B = len(ids) if isinstance(ids, list) else (int(px.shape[-4]) if px is not None and px.ndim >= 4 else 1)
    if P * C > cfg.max_query_rows:
        raise _limit(f"this query has {P} candidates x {C} classes = {P * C} text sequences, over the server's limit "
                     f"of {cfg.max_query_rows} (max_query_rows); send fewer candidates or classes per query", "prompt",
                     "max_query_rows", cfg.max_query_rows, P * C)
    per_candidate = vis is not None or (px is not None and px.ndim == 5)
    n = P * B if per_candidate else B
    if n > cfg.max_query_images:
        what = f"{P} candidates x {B} images = {n} images encoded" if per_candidate else f"{B} images"
        raise _limit(f"this query has {what}, over the server's limit of {cfg.max_query_images} (max_query_images); "
                     "send fewer images or candidates per query", "images" if isinstance(ids, list) else "pixels",
                     "max_query_images", cfg.max_query_images, n)
    if P * B * C > cfg.max_query_logits:
        raise _limit(f"this query's reply would hold {P} x {B} x {C} = {P * B * C} scores, over the server's limit of "
                     f"{cfg.max_query_logits} (max_query_logits); send fewer candidates, images or classes per query",
                     "images" if isinstance(ids, list) else "pixels", "max_query_logits", cfg.max_query_logits, P * B * C)
    lim = server.probe.max_visual_tokens
    if vis is not None and vis.ndim == 3 and lim is not None and vis.shape[1] > lim:
        raise _limit(f"{vis.shape[1]} visual prompt tokens per candidate, over the server's limit of {lim} "
                     f"(max_visual_tokens); send at most {lim}", "visual", "max_visual_tokens", lim, int(vis.shape[1]))


def _images(meta: dict, tensors: dict, size: int) -> Images:
    if "images" in meta:
        ids = meta["images"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _bad("'images' must be a non-empty list of uploaded image ids", "images")
        return Images(None, ids)
    if "pixels" not in tensors:
        raise _bad("give 'images' (uploaded ids) or the tensor 'pixels' (B, 3, S, S) or (P, B, 3, S, S)", "pixels")
    return Images(_pixels(tensors["pixels"], "pixels", size))


def _query_parts(server: Server, meta: dict, tensors: dict):
    """(purpose, box, prompt, images, visual, P) of a query, or the refusal (APIError): all
    that is known without tokenising or encoding anything."""
    unknown = set(tensors) - {"ctx", "pixels", "visual"}
    if unknown:
        raise _bad(f"unknown tensor {sorted(unknown)[0]!r}; a query takes ctx, pixels, visual", sorted(unknown)[0])
    purpose = meta.get("purpose", "train")
    if purpose not in PURPOSES:
        raise _bad(f"'purpose' must be one of {', '.join(PURPOSES)}", "purpose")
    try:
        classes = _classes(server, meta)
        prompt = _prompt(server, meta, tensors)
        _check_limits(server, len(classes), prompt, meta, tensors)
        box = server.box(classes)
        images = _images(meta, tensors, box.image_size)
        visual = None
        if "visual" in tensors:
            v = tensors["visual"]
            if not torch.is_floating_point(v):
                raise _bad(f"visual has dtype {v.dtype}; send float32", "visual")
            visual = VisualPrompt(v.float())
        P = box.check_request(prompt, images, visual)
    except BadInput as e:
        raise _bad(str(e)) from None
    return purpose, box, prompt, images, visual, P


def _check_text(box: BlackBox, prompt) -> None:
    try:
        box.check_text(prompt)  # tokenised here, after every other refusal; refuses texts that do not fit
    except BadInput as e:
        raise _bad(str(e)) from None


def _upload_pixels(server: Server, ctype: str, raw: bytes) -> torch.Tensor:
    """(B, 3, S, S) float pixels of an upload body (safetensors or one PNG / JPEG)."""
    S = server.info["image_size"]
    if ctype == CONTENT_TYPE:
        meta, tensors = _parse(raw)
        if set(tensors) != {"pixels"}:
            raise _bad("an upload is one tensor 'pixels' (B, 3, S, S)", "pixels")
        px = _pixels(tensors["pixels"], "pixels", S)
    else:
        px = _decode_image(raw, S)
    if px.ndim != 4:
        raise _bad(f"pixels must be (B, 3, {S}, {S}); got {tuple(px.shape)}", "pixels")
    return px


def _upload_images(server: Server, px: torch.Tensor) -> Images:
    """The upload with its content-hash ids, checked (shape, range) before anything is stored."""
    ids = ["img-" + hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:24] for x in px]
    images = Images(px, ids)
    try:
        server.probe.check_upload(images)
    except BadInput as e:
        raise _bad(str(e), "pixels") from None
    return images


def _parse(raw: bytes) -> tuple[dict, dict]:
    try:
        return unpack(raw)
    except WireError as e:
        raise _bad(str(e), e.param, "invalid_body") from None


def _json_body(raw: bytes) -> dict:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad("body is not valid JSON", "body", "invalid_body") from None
    if not isinstance(d, dict):
        raise _bad("body must be a JSON object", "body", "invalid_body")
    return d


def create_app(cfg: ServeConfig) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        server = state["server"] = Server(cfg)
        await server.batcher.start()

        async def prune():  # stored idempotent replies expire after a day, as Stripe's do
            while True:
                try:
                    await asyncio.to_thread(server.store.prune)
                except Exception:  # noqa: BLE001 -- a busy database: try again next round
                    pass
                await asyncio.sleep(600)

        pruner = asyncio.create_task(prune())
        yield
        pruner.cancel()
        try:
            await pruner
        except asyncio.CancelledError:
            pass
        await server.batcher.stop()
        server.close()

    app = FastAPI(title="bbpt black-box API", version=API_VERSION, lifespan=lifespan,
                  description="A CLIP-like model behind keys, budgets and dynamic batching. Tensors travel as safetensors.")

    def error(e: APIError) -> JSONResponse:
        body = {"error": {"message": e.message, "type": e.type, "code": e.code, "param": e.param, **(e.extra or {})}}
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error(APIError(e.status_code, str(e.detail), code=codes.get(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request, e):  # a bug, never the client's input: 500 with a body, not a traceback
        return error(APIError(500, f"internal error ({type(e).__name__}); the request was not charged",
                              "server_error", "internal_error"))

    async def body(request: Request, kinds: tuple[str, ...]) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in kinds:
            raise APIError(415, f"content type {ctype or '(none)'!r} is not accepted here; send {' or '.join(kinds)}",
                           code="unsupported_media_type", param="content-type")
        limit = cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}; send fewer images "
                           "per request, or upload them first", code="request_too_large")
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(c)
        return b"".join(chunks)

    async def auth(request: Request):
        h = request.headers.get("authorization", "")
        if not h:
            raise APIError(401, "no API key: send 'Authorization: Bearer bbpt-...' (bbpt serve keys add NAME)",
                           "authentication_error", "missing_api_key")
        token = h[7:].strip() if h.lower().startswith("bearer ") else None
        key = await state["server"].run(state["server"].store.authenticate, token)
        if key is None:
            raise APIError(401, "API key not valid (wrong, malformed or revoked)", "authentication_error", "invalid_api_key")
        return key

    def over_budget(e: OverBudget) -> APIError:
        over = [u for u, lim in e.budget.items() if lim is not None and e.used[u] + e.cost[u] > lim]
        msg = (f"budget exhausted: this query costs {', '.join(f'{u}={e.cost[u]}' for u in over)} but the key's budget is "
               f"{', '.join(f'{u}={lim}' for u, lim in e.budget.items() if lim is not None)} and "
               f"{', '.join(f'{u}={e.used[u]}' for u in over)} are used")
        return APIError(429, msg, "rate_limit_error", "budget_exhausted",
                        extra={"used": e.used, "budget": e.budget, "cost": e.cost})

    @app.get(f"/{API_VERSION}/model")
    async def model_info():  # public metadata, as documented: no key needed
        return state["server"].info

    @app.get(f"/{API_VERSION}/health")
    async def health():
        return {"status": "ok", "pid": os.getpid()}  # pid: which process (Ray Serve replica) answered

    @app.get(f"/{API_VERSION}/usage")
    async def usage(request: Request):
        key = await auth(request)
        server = state["server"]
        u = await server.run(server.store.usage, key.id)
        stored = await server.run(server.store.stored, key.id)
        return {"key": key.name, "budget": key.budget, **u,
                "remaining": {k: (None if v is None else v - u["total"][k]) for k, v in key.budget.items()},
                "stored": stored, "quotas": server.info["quotas"],
                "batching": {"batches": server.batcher.batches, "queries": server.batcher.queries}}

    @app.post(f"/{API_VERSION}/class_sets")
    async def class_sets(request: Request):
        key = await auth(request)
        server = state["server"]
        d = await server.run(_json_body, await body(request, ("application/json",)))
        names = await server.run(_classes, server, {"classes": d.get("names")})
        try:
            cid = await server.run(server.store.claim_class_set, key.id, names, cfg.max_class_sets_per_key)
        except QuotaExceeded as e:
            raise _over_quota(e, "max_class_sets_per_key", "delete one with DELETE /v1/class_sets/{id}, or send "
                              "'classes' in the query instead") from None
        return {"id": cid, "num_classes": len(names)}

    @app.delete(f"/{API_VERSION}/class_sets/{{cid}}")
    async def delete_class_set(cid: str, request: Request):
        key = await auth(request)
        server = state["server"]
        if not await server.run(server.store.delete_class_set, key.id, cid):
            raise APIError(404, f"this key has no class set {cid!r}; the ids are what POST /v1/class_sets returned",
                           code="unknown_class_set", param="class_set")
        return {"id": cid, "deleted": True}

    @app.post(f"/{API_VERSION}/images")
    async def images(request: Request):
        key = await auth(request)
        server = state["server"]
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await body(request, (CONTENT_TYPE, "image/png", "image/jpeg"))
        px = await server.run(_upload_pixels, server, ctype, raw)
        upload = await server.run(_upload_images, server, px)
        try:
            await server.run(server.store.claim_images, key.id, list(upload.keys), cfg.max_images_per_key)
        except QuotaExceeded as e:
            raise _over_quota(e, "max_images_per_key", "reuse the ids of images uploaded before, or send pixels "
                              "inline in the query") from None
        n = await server.run(server.probe.upload, upload)  # the features go to the database too
        return {"ids": list(upload.keys), "encoded": n}

    @app.post(f"/{API_VERSION}/query")
    async def query(request: Request):
        key = await auth(request)
        server = state["server"]
        raw = await body(request, (CONTENT_TYPE,))
        idem = request.headers.get("idempotency-key")
        if idem is not None and not (1 <= len(idem) <= 255):
            raise _bad("Idempotency-Key must be 1 to 255 characters", "Idempotency-Key")
        sha = await server.run(lambda: hashlib.sha256(raw).hexdigest())
        if idem is not None:
            try:
                stored = await server.run(server.store.reply, key, idem, sha)
            except IdempotencyMismatch:
                raise APIError(409, "this Idempotency-Key was used with another request body; use a new key for a new "
                               "request", code="idempotency_mismatch", param="Idempotency-Key") from None
            if stored is not None:
                return Response(stored, media_type=CONTENT_TYPE, headers={"Idempotent-Replayed": "true"})
            if (key.id, idem) in server.inflight:
                raise APIError(409, "a request with this Idempotency-Key is in progress; retry shortly",
                               code="idempotency_in_progress", param="Idempotency-Key")
        token = (key.id, idem) if idem is not None else None
        if token:  # taken with no await since the check above: one request per key at a time does the work
            server.inflight.add(token)
        try:
            meta, tensors = await server.run(_parse, raw)
            purpose, box, prompt, images, visual, P = await server.run(_query_parts, server, meta, tensors)
            cost = box.meter.cost(P, len(images))
            try:
                await server.run(server.store.check, key, cost)
            except OverBudget as e:
                raise over_budget(e) from None
            await server.run(_check_text, box, prompt)
            try:
                logits = await server.batcher.submit((box, prompt, images, visual), P * len(box.classnames))
            except BBPTError as e:
                raise _bad(str(e)) from None
            reply = await server.run(pack, {"charged": cost}, {"logits": logits})
            try:
                await server.run(server.store.charge, key, purpose, cost, reply, idem, sha)
            except OverBudget as e:  # a concurrent query of the same key spent the rest meanwhile
                raise over_budget(e) from None
        finally:
            if token:
                server.inflight.discard(token)
        return Response(reply, media_type=CONTENT_TYPE)

    @app.post(f"/{API_VERSION}/embed_words")
    async def embed_words(request: Request):
        await auth(request)
        server = state["server"]
        d = await server.run(_json_body, await body(request, ("application/json",)))
        text = d.get("text")
        if not isinstance(text, str):
            raise _bad("'text' must be a string", "text")
        _check_chars(server, [text], "text", "text")
        try:
            emb = await server.run(server.probe.embed_words, text)
        except BadInput as e:
            raise _bad(str(e), "text") from None
        return Response(await server.run(pack, {}, {"embeddings": emb}), media_type=CONTENT_TYPE)

    @app.post(f"/{API_VERSION}/embed_patches")
    async def embed_patches(request: Request):
        await auth(request)
        server = state["server"]
        meta, tensors = await server.run(_parse, await body(request, (CONTENT_TYPE,)))
        if set(tensors) != {"pixels"}:
            raise _bad("embed_patches takes one tensor 'pixels' (B, 3, S, S)", "pixels")
        px, lim = tensors["pixels"], cfg.max_query_images
        B = int(px.shape[-4]) if px.ndim >= 4 else 1
        if B > lim:
            raise _limit(f"{B} images, over the server's limit of {lim} (max_query_images); send at most {lim} per request",
                         "pixels", "max_query_images", lim, B)
        try:
            px = await server.run(_pixels, px, "pixels", server.info["image_size"])
            tok = await server.run(server.probe.embed_patches, Images(px))
        except BadInput as e:
            raise _bad(str(e), "pixels") from None
        return Response(await server.run(pack, {}, {"tokens": tok}), media_type=CONTENT_TYPE)

    from . import protocols  # Hugging Face zero-shot and OpenAI embeddings, on the same keys and limits

    protocols.register(app, state, cfg, API_VERSION, auth, body, over_budget, _bad, _limit, _check_chars, _check_classes,
                       _decode_image, OverBudget)
    app.state.bbpt = state
    return app


def _decode_image(raw: bytes, size: int) -> torch.Tensor:
    """A PNG / JPEG upload -> (1, 3, S, S) in [0, 1], with CLIP's test transform (bbpt's own)."""
    from PIL import Image

    from ..data.core import max_image_pixels, preprocess_pil

    try:
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > max_image_pixels():
            raise _bad(f"image is {im.width}x{im.height}, over the server's pixel limit", "body", "image_too_large")
        return preprocess_pil(im, size)[None]
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 -- any undecodable upload is the client's error
        raise _bad(f"cannot decode the image ({type(e).__name__}: {str(e)[:100]})", "body", "invalid_image") from None


def serve_forever(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until SIGINT / SIGTERM, then shut down cleanly and return (so ``bbpt serve`` exits 0).

    uvicorn shuts down on the first signal and then raises that signal again under the
    handlers it found. The handlers here only ask the server to stop: a signal before
    uvicorn takes them over stops it as soon as it has started, and the one uvicorn raises
    again after a clean shutdown ends nothing (no exit 143 / 130)."""
    import signal

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host=host, port=port, log_level=log_level,
                                           access_log=False))

    def stop(signum, frame):
        server.should_exit = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def config_dict(cfg: ServeConfig) -> dict:
    return asdict(cfg)
