"""RemoteBlackBox: the black box over HTTP, with the in-process :class:`BlackBox`'s interface,
so every method runs against a ``bbpt serve`` server unchanged (``bbpt run --remote URL``).

- The run's own meter is checked before a query is sent and charged when the server has
  answered: a refused query (a 422, a 429) costs the run nothing, as in process.
- Keyed images are uploaded once (:meth:`upload`) and then sent as server-assigned ids.
  Pixels travel as uint8 when they are exact multiples of 1/255, else as float32, so the
  server sees exactly what an in-process box would: the same seed gives the same run.
- The first contact (``GET /v1/model``, public) is not retried: a URL that is not http(s),
  a server that cannot be reached or one that is not ``bbpt serve`` is refused at once.
- Each query carries an ``Idempotency-Key``; once connected, connection errors, 502/503/504
  and "still in progress" are retried with backoff under the same key, so a retry is never
  charged twice.
- A 429 ``budget_exhausted`` is :class:`KeyBudgetExhausted` (a :class:`BudgetExhausted` whose
  run stops with ``stopped_by: key_budget``); other 4xx are :class:`BadInput`.
"""
from __future__ import annotations

import json
import os
import random
import uuid
from typing import Sequence

import torch

from ..errors import BadInput, BBPTError, BudgetExhausted
from ..models.blackbox import Images, QueryChecks, SoftPrompt, TextPrompt, VisualPrompt
from ..models.meter import QueryMeter
from .wire import CONTENT_TYPE, pack, unpack

RETRY_STATUS = (502, 503, 504)
UPLOAD_BYTES = 32 << 20  # pixels per upload request


class RemoteError(BBPTError):
    """The server could not be reached or answered with an error that is not the input's fault."""


class _Busy(Exception):
    """A reply worth retrying (502/503/504, an idempotent twin in progress)."""


class _Session:
    """One server connection shared by every RemoteBlackBox of a run (uploads, class sets)."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0, retry_for: float = 120.0):
        import httpx

        example = "e.g. --remote http://127.0.0.1:8000, the address `bbpt serve` prints without /v1"
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadInput(f"--remote {url!r} is not an http(s) URL of a server; {example}")
        if not api_key:
            raise BadInput("no API key: set BBPT_API_KEY to a key printed by `bbpt serve keys add NAME`")
        self.url, self.retry_for = url.rstrip("/"), retry_for
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {api_key}"})
        self.ids: dict[str, str] = {}  # the client's image key -> the server's content-hash id
        self.class_sets: dict[tuple[str, ...], str] = {}
        self._jitter = random.Random(0)  # not the global RNG: a run's RNG state stays the run's
        self.info = self._first_contact(example)

    def _first_contact(self, example: str) -> dict:
        """The server's public metadata, asked once without retries: a wrong URL or a server that
        is not running is refused at once (retries are for a server lost while a run is under way)."""
        import httpx

        try:
            r = self.http.get("/v1/model", timeout=httpx.Timeout(30.0, connect=10.0))
        except httpx.TransportError as e:
            raise RemoteError(f"cannot reach a bbpt server at {self.url} ({type(e).__name__}: {e}); check the URL "
                              f"and that `bbpt serve` is running there ({example})") from None
        try:
            info = r.json() if r.status_code == 200 else None
        except ValueError:
            info = None
        if not isinstance(info, dict) or "max_images_per_call" not in info:
            raise RemoteError(f"{self.url} does not answer as a bbpt server (GET /v1/model: HTTP {r.status_code}); "
                              f"check the URL ({example})")
        return info

    def request(self, method: str, path: str, **kw):
        """The response, retrying connection errors and 502/503/504 (and an idempotent request
        still in progress) with backoff for up to ``retry_for`` seconds (:mod:`bbpt.boxes.retry`)."""
        import httpx

        from ..boxes.retry import retrying

        try:
            for attempt in retrying(self.retry_for, self._jitter, (httpx.TransportError, _Busy)):
                with attempt:
                    r = self.http.request(method, path, **kw)
                    if r.status_code in RETRY_STATUS or (r.status_code == 409 and _code(r) == "idempotency_in_progress"):
                        raise _Busy(f"HTTP {r.status_code}")
        except (httpx.TransportError, _Busy) as e:
            why = str(e) if isinstance(e, _Busy) else f"{type(e).__name__}: {e}"
            raise RemoteError(f"server {self.url} unreachable for {self.retry_for:.0f}s ({why}); "
                              "check that `bbpt serve` is running there") from None
        return r

    def json(self, method: str, path: str, **kw) -> dict:
        r = self.request(method, path, **kw)
        _raise_for(r, self.url)
        return r.json()

    def class_set(self, names: Sequence[str]) -> str:
        key = tuple(names)
        if key not in self.class_sets:
            self.class_sets[key] = self.json("POST", "/v1/class_sets", json={"names": list(names)})["id"]
        return self.class_sets[key]


class KeyBudgetExhausted(BudgetExhausted):
    """The server refused a query (429 ``budget_exhausted``): the API key's budget is spent, not
    the run's. A run stops its training with ``stopped_by: key_budget`` and records the key's
    counts (``details``)."""

    stopped_by = "key_budget"

    def __init__(self, url: str, used: dict, budget: dict, cost: dict):
        self.url = url
        self.counts, self.budget, self.requested = dict(used), dict(budget), dict(cost)
        over = [u for u, lim in budget.items() if lim is not None and used.get(u, 0) + cost.get(u, 0) > lim] or \
            [u for u, lim in budget.items() if lim is not None]
        BBPTError.__init__(
            self, f"API key budget exhausted on {url}: this query needs "
                  f"{', '.join(f'{u}={cost.get(u)}' for u in over)} but the key's budget is "
                  f"{', '.join(f'{u}={budget[u]}' for u in over)} and {', '.join(f'{u}={used.get(u)}' for u in over)} "
                  "are used; ask the server's operator for a larger budget or a new key (`bbpt serve keys add`)")

    def details(self) -> dict:
        return {"key": {"used": self.counts, "budget": self.budget, "refused": self.requested}}


def _code(r) -> str | None:
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001
        return None


def _raise_for(r, url: str) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
    except Exception:  # noqa: BLE001
        err = {"message": r.text[:200], "code": None}
    if r.status_code == 401:
        raise BadInput(f"the server at {url} refused the API key ({err['message']}); check BBPT_API_KEY")
    if r.status_code == 429 and err.get("code") == "budget_exhausted":
        raise KeyBudgetExhausted(url, err["used"], err["budget"], err["cost"])
    if 400 <= r.status_code < 500:
        raise BadInput(f"the server refused the request: {err['message']}")
    raise RemoteError(f"the server at {url} failed (HTTP {r.status_code}: {err['message']})")


def _wire_pixels(px: torch.Tensor) -> torch.Tensor:
    """uint8 when every value is an exact k/255 (4x smaller), else float32 as is."""
    q = (px * 255).round()
    return q.to(torch.uint8) if torch.equal(q / 255, px) else px.float()


class RemoteBlackBox(QueryChecks):
    """The black box of a ``bbpt serve`` server at ``url``, over ``classnames``."""

    def __init__(self, url: str, api_key: str | None, classnames: Sequence[str], meter: QueryMeter | None = None,
                 purpose: str = "train", _session: _Session | None = None):
        if not classnames:
            raise BadInput("a black box needs at least one class name")
        self._s = _session or _Session(url, api_key if api_key is not None else os.environ.get("BBPT_API_KEY", ""))
        self.classnames, self.purpose = list(classnames), purpose
        self.meter = meter if meter is not None else QueryMeter(max_images_per_call=self.max_images_per_call)
        self._cs = self._s.class_set(self.classnames)

    # ---- public metadata, as the server publishes it ------------------------------------------
    @property
    def info(self) -> dict:
        return self._s.info

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def max_images_per_call(self) -> int:
        return int(self.info["max_images_per_call"])

    @property
    def ctx_dim(self) -> int:
        return int(self.info["ctx_dim"])

    @property
    def context_length(self) -> int:
        return int(self.info["context_length"])

    @property
    def model_name(self) -> str:
        return self.info["model"]

    @property
    def visual_width(self) -> int | None:
        return self.info["visual_width"]

    @property
    def pixel_mean(self) -> tuple:
        return tuple(self.info["pixel_mean"])

    @property
    def pixel_std(self) -> tuple:
        return tuple(self.info["pixel_std"])

    @property
    def encode_chunk(self) -> int:
        """Images per upload request."""
        return max(1, UPLOAD_BYTES // (3 * self.image_size**2 * 4))

    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None,
                    purpose: str | None = None) -> "RemoteBlackBox":
        return RemoteBlackBox(self._s.url, None, classnames, meter if meter is not None else self.meter,
                              purpose or self.purpose, _session=self._s)

    @property
    def capabilities(self):
        from ..boxes.bbpt import capabilities

        return capabilities(self._s.url)

    def embed_images(self, images: Images) -> torch.Tensor:
        raise BadInput(f"bbpt's query API at {self._s.url} returns logits, not embeddings; for embeddings use its "
                       f"OpenAI-style endpoint: --box openai:{self._s.url}/v1")

    def embed_texts(self, texts) -> torch.Tensor:
        return self.embed_images(None)

    def usage(self) -> dict:
        """The key's counts on the server, per purpose."""
        return self._s.json("GET", "/v1/usage")

    # ---- helpers the API offers --------------------------------------------------------------
    def embed_words(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise BadInput(f"embed_words takes a string, got {type(text).__name__}")
        r = self._s.request("POST", "/v1/embed_words", json={"text": text})
        _raise_for(r, self._s.url)
        return unpack(r.content)[1]["embeddings"]

    def embed_patches(self, images: Images) -> torch.Tensor:
        self.check_images(images)
        if images.pixels is None:
            raise BadInput("embed_patches needs pixels, not image ids")
        px = images.pixels[0] if images.per_candidate else images.pixels
        r = self._s.request("POST", "/v1/embed_patches", content=pack({}, {"pixels": _wire_pixels(px)}),
                            headers={"Content-Type": CONTENT_TYPE})
        _raise_for(r, self._s.url)
        return unpack(r.content)[1]["tokens"]

    def upload(self, images: Images) -> int:
        """Upload keyed images once; later queries send their server ids. Returns how many the
        server encoded (images it had not seen)."""
        self.check_images(images)
        if images.pixels is None or images.per_candidate or images.keys is None:
            raise BadInput("upload takes one keyed batch of images (B, 3, S, S)")
        r = self._s.request("POST", "/v1/images", content=pack({}, {"pixels": _wire_pixels(images.pixels)}),
                            headers={"Content-Type": CONTENT_TYPE})
        _raise_for(r, self._s.url)
        d = r.json()
        self._s.ids.update(zip(images.keys, d["ids"]))
        return int(d["encoded"])

    def _upload_new(self, images: Images) -> None:
        new = sorted({k: i for i, k in enumerate(images.keys) if k not in self._s.ids}.values())
        for c0 in range(0, len(new), self.encode_chunk):
            part = new[c0 : c0 + self.encode_chunk]
            self.upload(Images(images.pixels[part], [images.keys[i] for i in part]))

    # ---- the query ---------------------------------------------------------------------------
    def query(self, prompt: TextPrompt | SoftPrompt, images: Images, visual: VisualPrompt | None = None) -> torch.Tensor:
        """Logits (P, B, C), as :meth:`BlackBox.query`: checked, sent, and charged to the run's
        meter only once the server has answered."""
        P = self.check_shapes(prompt, images, visual)
        self.meter.check(P, len(images))
        meta: dict = {"class_set": self._cs, "purpose": self.purpose}
        tensors: dict[str, torch.Tensor] = {}
        if isinstance(prompt, TextPrompt):
            meta["prompt"] = {"type": "text", "templates": list(prompt.templates)}
        else:
            meta["prompt"] = {"type": "soft", "suffix": prompt.suffix}
            tensors["ctx"] = prompt.ctx.float()
        keys = images.keys
        cacheable = visual is None and not images.per_candidate and keys is not None
        if cacheable and images.pixels is not None and not all(k in self._s.ids for k in keys):
            self._upload_new(images)  # new keyed images (training views): uploaded once, free, then sent by id
        by_id = cacheable and all(k in self._s.ids for k in keys)
        if by_id:
            meta["images"] = [self._s.ids[k] for k in keys]
        elif images.pixels is None:
            raise BadInput("these image keys were never uploaded; upload them first, or send pixels")
        else:
            tensors["pixels"] = _wire_pixels(images.pixels)
        if visual is not None:
            tensors["visual"] = visual.tokens.float()
        r = self._s.request("POST", "/v1/query", content=pack(meta, tensors),
                            headers={"Content-Type": CONTENT_TYPE, "Idempotency-Key": uuid.uuid4().hex})
        _raise_for(r, self._s.url)
        reply, out = unpack(r.content)
        logits = out["logits"]
        self.meter.charge(P, len(images))
        if reply.get("charged") != self.meter.cost(P, len(images)):
            raise RemoteError(f"the server charged {json.dumps(reply.get('charged'))} for a query the run counts as "
                              f"{json.dumps(self.meter.cost(P, len(images)))}; its pricing differs")
        return logits
