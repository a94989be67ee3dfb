"""``bbpt serve``: the black box as an HTTP API (FastAPI), versioned under ``/v1``.

| endpoint                 | what                                                               |
|--------------------------|--------------------------------------------------------------------|
| ``GET /v1/model``        | public metadata: image size, context width and length, ...         |
| ``POST /v1/class_sets``  | register class names (JSON ``{"names": [...]}``) -> ``{"id"}``      |
| ``POST /v1/images``      | upload images (uint8 / float pixels as safetensors, or a PNG/JPEG) -> content-hash ids; their features are computed once and kept |
| ``POST /v1/query``       | logits (P, B, C) of P candidates on B images; charged to the key    |
| ``POST /v1/embed_words`` | word embeddings of a text (initial soft prompts); not charged      |
| ``POST /v1/embed_patches`` | a ViT's input tokens for images (visual prompt scale); not charged |
| ``GET /v1/usage``        | the key's counts, per purpose, and its budget                      |

Tensors travel as safetensors (:mod:`bbpt.serve.wire`). Authentication: ``Authorization:
Bearer bbpt-...`` (:mod:`bbpt.serve.store`). Errors are ``{"error": {"message", "type",
"code", "param"}}``: 401 missing or wrong key, 404 / 405 no such endpoint, 409 an
Idempotency-Key reused with another body (or still in flight), 413 a body over the limit,
415 a wrong content type, 422 a malformed request (naming the field), 429
``budget_exhausted`` with the counts. Client input never yields a 5xx.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadInput, BBPTError
from ..models import BlackBox, Images, QueryMeter, SoftPrompt, TextPrompt, VisualPrompt, create_backbone
from ..models.blackbox import FeatureCache
from .batcher import Batcher
from .store import IdempotencyMismatch, OverBudget, Store
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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param, self.extra = status, message, type_, code, param, extra


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(422, message, code=code, param=param)


class Server:
    """What the app holds: the model, its class-set boxes, the store, the batcher."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model, cfg.pretrained, cfg.device)
        self.model_id = f"{cfg.model}:{cfg.pretrained or 'default'}"
        if (cfg.pretrained or "").lower() in ("random", "none"):  # new weights in every process: keep no features
            self.model_id += f":{uuid.uuid4().hex}"
        self.store = Store(cfg.db)
        self.cache = FeatureCache()
        self.boxes: dict[str, BlackBox] = {}
        self.batcher = Batcher(cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_batch_rows)
        self.inflight: set[tuple[str, str]] = set()
        probe = self.box(["a", "b"])
        self.info = {"api": API_VERSION, "model": cfg.model, "pretrained": cfg.pretrained, "image_size": probe.image_size,
                     "ctx_dim": probe.ctx_dim, "context_length": probe.context_length,
                     "visual_width": probe.visual_width, "pixel_mean": list(probe.pixel_mean),
                     "pixel_std": list(probe.pixel_std), "max_images_per_call": cfg.max_images_per_call,
                     "max_request_bytes": cfg.max_request_bytes, "batching": {"max_batch": cfg.max_batch,
                                                                              "max_rows": cfg.max_batch_rows,
                                                                              "max_wait_ms": cfg.max_wait_ms}}

    # ---- uploaded image features survive restarts (kept in the store, keyed by model) ---------
    def restore(self, ids: list[str]) -> None:
        """Features of uploaded ids that this process has not seen (uploaded before a restart)."""
        missing = [i for i in dict.fromkeys(ids) if i not in self.cache]
        if not missing:
            return
        for i, blob in self.store.features(self.model_id, missing):
            self.cache.put(i, torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).to(self.backbone.device))

    def save_features(self, ids: list[str]) -> None:
        rows = [(i, self.cache.get(i).float().cpu().numpy().tobytes()) for i in dict.fromkeys(ids)]
        self.store.put_features(self.model_id, rows)

    def box(self, classes: list[str]) -> BlackBox:
        key = json.dumps(classes)
        if key not in self.boxes:
            self.boxes[key] = BlackBox(self.backbone, classes, QueryMeter(max_images_per_call=self.cfg.max_images_per_call),
                                       precision=self.cfg.precision, _cache=self.cache)
        return self.boxes[key]


# ---- request parsing ---------------------------------------------------------------------------
def _classes(server: Server, meta: dict) -> list[str]:
    if "class_set" in meta:
        cs = meta["class_set"]
        names = server.store.class_set(cs) if isinstance(cs, str) else None
        if names is None:
            raise _bad(f"unknown class set {cs!r}; register it with POST /v1/class_sets", "class_set", "unknown_class_set")
        return names
    names = meta.get("classes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise _bad("give 'classes' (a non-empty list of class names) or a registered 'class_set'", "classes")
    if len(names) > 100_000:
        raise _bad(f"{len(names)} classes: at most 100000", "classes")
    return names


def _pixels(t: torch.Tensor, param: str, size: int) -> torch.Tensor:
    """uint8 (·, 3, S, S) -> /255, or float in [0, 1] as is (float32)."""
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise _bad(f"{param} has dtype {t.dtype}; send uint8 (0-255) or float32 in [0, 1]", param)
    return t.float()


def _prompt(meta: dict, tensors: dict):
    p = meta.get("prompt")
    if not isinstance(p, dict) or p.get("type") not in ("text", "soft"):
        raise _bad("'prompt' must be {\"type\": \"text\", \"templates\": [...]} or {\"type\": \"soft\"} with a 'ctx' tensor",
                   "prompt")
    if p["type"] == "text":
        t = p.get("templates")
        if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
            raise _bad("'prompt.templates' must be a non-empty list of strings with '{}'", "prompt.templates")
        return TextPrompt(tuple(t))
    if "ctx" not in tensors:
        raise _bad("a soft prompt needs the tensor 'ctx' (P, m, D) or (P, C, m, D)", "ctx")
    ctx = tensors["ctx"]
    if not torch.is_floating_point(ctx):
        raise _bad(f"ctx has dtype {ctx.dtype}; send float32", "ctx")
    suffix = p.get("suffix", ".")
    if not isinstance(suffix, str):
        raise _bad("'prompt.suffix' must be a string", "prompt.suffix")
    return SoftPrompt(ctx.float(), suffix=suffix)


def _images(server: Server, meta: dict, tensors: dict, size: int) -> Images:
    if "images" in meta:
        ids = meta["images"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _bad("'images' must be a non-empty list of uploaded image ids", "images")
        server.restore(ids)
        return Images(None, ids)
    if "pixels" not in tensors:
        raise _bad("give 'images' (uploaded ids) or the tensor 'pixels' (B, 3, S, S) or (P, B, 3, S, S)", "pixels")
    return Images(_pixels(tensors["pixels"], "pixels", size))


def _query_parts(server: Server, meta: dict, tensors: dict):
    unknown = set(tensors) - {"ctx", "pixels", "visual"}
    if unknown:
        raise _bad(f"unknown tensor {sorted(unknown)[0]!r}; a query takes ctx, pixels, visual", sorted(unknown)[0])
    purpose = meta.get("purpose", "train")
    if purpose not in PURPOSES:
        raise _bad(f"'purpose' must be one of {', '.join(PURPOSES)}", "purpose")
    box = server.box(_classes(server, meta))
    prompt = _prompt(meta, tensors)
    images = _images(server, meta, tensors, box.image_size)
    visual = None
    if "visual" in tensors:
        v = tensors["visual"]
        if not torch.is_floating_point(v):
            raise _bad(f"visual has dtype {v.dtype}; send float32", "visual")
        visual = VisualPrompt(v.float())
    return purpose, box, prompt, images, visual


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
        server.store.close()

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

    def auth(request: Request):
        h = request.headers.get("authorization", "")
        if not h:
            raise APIError(401, "no API key: send 'Authorization: Bearer bbpt-...' (bbpt serve keys add NAME)",
                           "authentication_error", "missing_api_key")
        token = h[7:].strip() if h.lower().startswith("bearer ") else None
        key = state["server"].store.authenticate(token)
        if key is None:
            raise APIError(401, "API key not valid (wrong, malformed or revoked)", "authentication_error", "invalid_api_key")
        return key

    def parse(raw: bytes) -> tuple[dict, dict]:
        try:
            return unpack(raw)
        except WireError as e:
            raise _bad(str(e), e.param, "invalid_body") from None

    def json_body(raw: bytes) -> dict:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("body is not valid JSON", "body", "invalid_body") from None
        if not isinstance(d, dict):
            raise _bad("body must be a JSON object", "body", "invalid_body")
        return d

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
        key = auth(request)
        server = state["server"]
        u = server.store.usage(key.id)
        return {"key": key.name, "budget": key.budget, **u,
                "remaining": {k: (None if v is None else v - u["total"][k]) for k, v in key.budget.items()},
                "batching": {"batches": server.batcher.batches, "queries": server.batcher.queries}}

    @app.post(f"/{API_VERSION}/class_sets")
    async def class_sets(request: Request):
        auth(request)
        d = json_body(await body(request, ("application/json",)))
        names = _classes(state["server"], {"classes": d.get("names")})
        return {"id": state["server"].store.put_class_set(names), "num_classes": len(names)}

    @app.post(f"/{API_VERSION}/images")
    async def images(request: Request):
        auth(request)
        server = state["server"]
        S = server.info["image_size"]
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await body(request, (CONTENT_TYPE, "image/png", "image/jpeg"))
        if ctype == CONTENT_TYPE:
            meta, tensors = parse(raw)
            if set(tensors) != {"pixels"}:
                raise _bad("an upload is one tensor 'pixels' (B, 3, S, S)", "pixels")
            px = _pixels(tensors["pixels"], "pixels", S)
        else:
            px = await asyncio.to_thread(_decode_image, raw, S)
        if px.ndim != 4:
            raise _bad(f"pixels must be (B, 3, {S}, {S}); got {tuple(px.shape)}", "pixels")
        ids = ["img-" + hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:24] for x in px]
        try:
            n = await asyncio.to_thread(server.box(["a", "b"]).upload, Images(px, ids))
        except BadInput as e:
            raise _bad(str(e), "pixels") from None
        await asyncio.to_thread(server.save_features, ids)
        return {"ids": ids, "encoded": n}

    @app.post(f"/{API_VERSION}/query")
    async def query(request: Request):
        key = auth(request)
        server = state["server"]
        raw = await body(request, (CONTENT_TYPE,))
        idem = request.headers.get("idempotency-key")
        if idem is not None and not (1 <= len(idem) <= 255):
            raise _bad("Idempotency-Key must be 1 to 255 characters", "Idempotency-Key")
        sha = hashlib.sha256(raw).hexdigest()
        if idem is not None:
            try:
                stored = server.store.reply(key, idem, sha)
            except IdempotencyMismatch:
                raise APIError(409, "this Idempotency-Key was used with another request body; use a new key for a new "
                               "request", code="idempotency_mismatch", param="Idempotency-Key") from None
            if stored is not None:
                return Response(stored, media_type=CONTENT_TYPE, headers={"Idempotent-Replayed": "true"})
            if (key.id, idem) in server.inflight:
                raise APIError(409, "a request with this Idempotency-Key is in progress; retry shortly",
                               code="idempotency_in_progress", param="Idempotency-Key")
        meta, tensors = parse(raw)
        try:
            purpose, box, prompt, images, visual = _query_parts(server, meta, tensors)
            P = box.check_query(prompt, images, visual)
        except BadInput as e:
            raise _bad(str(e)) from None
        cost = box.meter.cost(P, len(images))
        try:
            server.store.check(key, cost)
        except OverBudget as e:
            raise over_budget(e) from None
        token = (key.id, idem) if idem is not None else None
        if token:
            server.inflight.add(token)
        try:
            try:
                logits = await server.batcher.submit((box, prompt, images, visual), P * len(box.classnames))
            except BBPTError as e:
                raise _bad(str(e)) from None
            reply = pack({"charged": cost}, {"logits": logits})
            try:
                await asyncio.to_thread(server.store.charge, key, purpose, cost, reply, idem, sha)
            except OverBudget as e:  # a concurrent query of the same key spent the rest meanwhile
                raise over_budget(e) from None
        finally:
            if token:
                server.inflight.discard(token)
        return Response(reply, media_type=CONTENT_TYPE)

    @app.post(f"/{API_VERSION}/embed_words")
    async def embed_words(request: Request):
        auth(request)
        d = json_body(await body(request, ("application/json",)))
        text = d.get("text")
        if not isinstance(text, str):
            raise _bad("'text' must be a string", "text")
        try:
            emb = state["server"].box(["a", "b"]).embed_words(text)
        except BadInput as e:
            raise _bad(str(e), "text") from None
        return Response(pack({}, {"embeddings": emb}), media_type=CONTENT_TYPE)

    @app.post(f"/{API_VERSION}/embed_patches")
    async def embed_patches(request: Request):
        auth(request)
        server = state["server"]
        meta, tensors = parse(await body(request, (CONTENT_TYPE,)))
        if set(tensors) != {"pixels"}:
            raise _bad("embed_patches takes one tensor 'pixels' (B, 3, S, S)", "pixels")
        try:
            tok = await asyncio.to_thread(server.box(["a", "b"]).embed_patches,
                                          Images(_pixels(tensors["pixels"], "pixels", server.info["image_size"])))
        except BadInput as e:
            raise _bad(str(e), "pixels") from None
        return Response(pack({}, {"tokens": tok}), media_type=CONTENT_TYPE)

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
