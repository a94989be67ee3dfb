"""What the HTTP transports of real APIs share: a client with the key, retries by tenacity,
many small requests in parallel, images as PNG bytes, and the black-box members a box of
text-and-images APIs has no use for.

Retries (:mod:`bbpt.boxes.retry`, tenacity): connection errors, 429 (rate limits) and
502/503/504 are retried with exponential backoff and jitter for up to ``retry_for`` seconds; any other 4xx is the input's fault and
raised at once as :class:`BadInput`; a 401 / 403 names the key.
"""
from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import BadInput, BBPTError
from ..models.blackbox import Images, QueryChecks
from ..models.backbone import CLIP_MEAN, CLIP_STD
from ..models.meter import QueryMeter

RETRY_STATUS = (429, 502, 503, 504)


class RemoteAPIError(BBPTError):
    """The API could not be reached, or failed in a way that is not the input's fault."""


class _Retry(Exception):
    def __init__(self, status: int, text: str):
        self.status, self.text = status, text


def png_bytes(px: torch.Tensor) -> bytes:
    """(3, S, S) in [0, 1] -> PNG bytes of the uint8 image (what an image API accepts)."""
    from PIL import Image

    a = (px.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class HTTPBox(QueryChecks):
    """Base of the boxes of text-and-images APIs (Hugging Face zero-shot, embeddings).

    Options (``--box-option KEY=VALUE``): ``image_size`` (side of the PNGs sent, default 224),
    ``concurrency`` (requests in flight, default 8), ``timeout`` and ``retry_for`` (seconds).
    """

    kind = "http"

    def __init__(self, url: str, classnames: Sequence[str], meter: QueryMeter | None, key: str | None, *,
                 image_size: int = 224, concurrency: int = 8, timeout: float = 60.0, retry_for: float = 120.0,
                 purpose: str = "train", _client=None, **unused):
        import httpx

        if unused:
            raise BadInput(f"--box {self.kind}: unknown option(s) {', '.join(sorted(unused))}; it takes image_size, "
                           "concurrency, timeout, retry_for")
        if not classnames:
            raise BadInput("a black box needs at least one class name")
        for name, v, lo in (("image_size", image_size, 8), ("concurrency", concurrency, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BadInput(f"--box-option {name}={v!r} must be an integer >= {lo}")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadInput(f"--box {self.kind}:{url!r}: not an http(s) URL; e.g. --box {self.kind}:http://127.0.0.1:8000")
        self.url, self.key = url.rstrip("/"), key
        self.classnames = list(classnames)
        self.meter = meter if meter is not None else QueryMeter()
        self._size, self.concurrency, self.retry_for, self.purpose = image_size, concurrency, retry_for, purpose
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers["X-BBPT-Purpose"] = purpose  # bbpt serve's usage report; other servers ignore it
        self._http = _client or httpx.Client(timeout=timeout, headers=headers,
                                             limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"bbpt-{self.kind}")
        self._jitter = random.Random(0)  # retry jitter: not the global RNG (a run's RNG state stays the run's)

    def _options(self) -> dict:
        return dict(image_size=self._size, concurrency=self.concurrency, timeout=self.timeout, retry_for=self.retry_for)

    # ---- metadata ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def max_images_per_call(self) -> int:
        return self.meter.max_images_per_call

    @property
    def model_name(self) -> str:
        return f"{self.kind}:{self.url}"

    @property
    def pixel_mean(self) -> tuple:
        return CLIP_MEAN

    @property
    def pixel_std(self) -> tuple:
        return CLIP_STD

    @property
    def encode_chunk(self) -> int:
        return 64

    def _no(self, what: str):
        return BadInput(f"{self.model_name} takes text and images only: it has no {what}")

    @property
    def ctx_dim(self) -> int:
        raise self._no("soft prompts (ctx_dim)")

    @property
    def context_length(self) -> int:
        raise self._no("soft prompts (context_length)")

    @property
    def visual_width(self) -> int | None:
        return None

    def embed_words(self, text: str) -> torch.Tensor:
        raise self._no("word embeddings (soft prompts)")

    def embed_patches(self, images: Images) -> torch.Tensor:
        raise self._no("patch tokens (visual prompts)")

    def upload(self, images: Images) -> int:
        """Nothing to upload: every request carries its image. Checks the input; returns 0."""
        self.check_images(images)
        return 0

    def embed_images(self, images: Images) -> torch.Tensor:
        raise self._no("embeddings out")

    def embed_texts(self, texts) -> torch.Tensor:
        raise self._no("embeddings out")

    # ---- requests ---------------------------------------------------------------------------------
    def post(self, path: str, **kw):
        """POST with retries (tenacity); the response of a 2xx, else BadInput / RemoteAPIError."""
        import httpx

        from .retry import retrying

        try:
            for attempt in retrying(self.retry_for, self._jitter, (httpx.TransportError, _Retry)):
                with attempt:
                    r = self._http.post(self.url + path, **kw)
                    if r.status_code in RETRY_STATUS:
                        raise _Retry(r.status_code, r.text[:200])
        except httpx.TransportError as e:
            raise RemoteAPIError(f"cannot reach {self.url} ({type(e).__name__}: {e}); check the URL and that the "
                                 "server is running") from None
        except _Retry as e:
            raise RemoteAPIError(f"{self.url}{path} answered HTTP {e.status} for {self.retry_for:.0f}s of retries: "
                                 f"{e.text}") from None
        if r.status_code in (401, 403):
            raise BadInput(f"{self.url} refused the API key (HTTP {r.status_code}: {_message(r)}); check --key-file or "
                           "the key's environment variable")
        if 400 <= r.status_code < 500:
            raise BadInput(f"{self.url}{path} refused the request (HTTP {r.status_code}: {_message(r)})")
        if r.status_code >= 300:
            raise RemoteAPIError(f"{self.url}{path} failed (HTTP {r.status_code}: {_message(r)})")
        return r

    def map(self, fn: Callable, items: list) -> list:
        """``fn`` over ``items``, ``concurrency`` at a time, results in order."""
        return list(self._pool.map(fn, items)) if len(items) > 1 else [fn(x) for x in items]


def _message(r) -> str:
    try:
        d = r.json()
        err = d.get("error", d) if isinstance(d, dict) else d
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or err)[:300]
    except ValueError:
        return r.text[:300] or "no body"
