"""The black box: class scores for a batch of images under a batch of candidate prompts.

This is the only thing a tuning method may touch. In: P candidate prompts (hard templates
or soft context vectors), B images, and optionally a visual prompt; out: logits (P, B, C)
over the task's C classes. Visual prompts come in two kinds:

- prompted pixels (BlackVIP, BAR): the client modifies the images itself and sends them,
  one batch for all candidates (B, 3, S, S) or one per candidate (P, B, 3, S, S), without
  cache keys;
- visual prompt tokens (BPT-VLM): :class:`VisualPrompt` tokens (P, n, W) appended after a
  ViT's patch tokens.

Image features are cached only when neither is in play (4-d pixels with keys, no visual
tokens); otherwise every image is re-encoded and the meter's ``images_encoded`` says so.
:meth:`BlackBox.upload` fills that cache ahead of time (an API's image upload: not a query).

The black box refuses before it charges: a query is checked in full (types, shapes, dtypes,
pixel range, finiteness, the P-or-1 rule, the visual-token limit, the budget, every text
fitting the text context) and only then charged to a :class:`QueryMeter`, before anything
is computed; a refused query costs nothing, and one the budget refuses is not even
tokenised. Several queries answered together are charged all or nothing. Pixels are float RGB in [0, 1], unnormalised: the box applies the model's mean/std
itself, so uint8 or already-normalised pixels are refused rather than silently mis-scored.

Methods never see weights, features or gradients through it (outputs are detached, computed
under ``torch.no_grad``); the white-box CoOp reference is the one exception and says so.

Soft prompt layout (CoOp / ZIP / CraFT): ``[SOS] ctx_1 .. ctx_m <class-name tokens> <suffix> [EOT]``.
The sequence is tokenised with m placeholder ``X`` tokens whose embeddings are replaced by
ctx, so the class name, suffix and EOT land where tokenising the text would put them.

Fast exact path (``fast=True``): image features cached by image key (id + augmentation
view) when no visual prompt is in play; all P x C sequences encoded in one batched forward
(chunked for memory); sequences cut to the longest real length (exact under the causal
mask); optional bf16 autocast on CUDA. ``fast=False`` is the reference loop of the official
ZIP code: images re-encoded and C class texts at full context length per candidate.
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

from ..errors import BadInput
from .backbone import Backbone
from .meter import QueryMeter, charge_all, check_all

if TYPE_CHECKING:
    from ..boxes.capabilities import Capabilities

PRECISIONS = ("fp32", "bf16", "fp16")
ENCODE_BYTES = 128 << 20  # pixels per image-tower forward (222 images at 224 px, 2048 at 32 px)
VISUAL_TOKENS = 1024  # visual prompt tokens per candidate an in-process box takes by default (BPT-VLM's n_visual <= 1024)
TEXT_CACHE_BYTES = 64 << 20  # token ids of prompt texts kept per box family (616 bytes a CLIP text: 100k texts)
_IMAGE_TOKENS: weakref.WeakKeyDictionary[Backbone, int] = weakref.WeakKeyDictionary()  # a ViT's 1 + G, per backbone


def _preview(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n].rstrip() + " ..."


@dataclass(frozen=True)
class TextPrompt:
    """P hard prompts: templates with ``{}`` where the class name goes."""

    templates: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.templates, str):
            object.__setattr__(self, "templates", (self.templates,))
        elif not isinstance(self.templates, tuple):
            try:
                object.__setattr__(self, "templates", tuple(self.templates))
            except TypeError:
                raise BadInput(
                    f"TextPrompt takes a template string or a sequence of them, got {type(self.templates).__name__}"
                ) from None
        if not self.templates:
            raise BadInput("TextPrompt needs at least one template, e.g. TextPrompt('a photo of a {}.')")
        for t in self.templates:
            if not isinstance(t, str):
                raise BadInput(f"templates must be strings, got {type(t).__name__}; e.g. 'a photo of a {{}}.'")
            if "{}" not in t:
                raise BadInput(f"template {t!r} has no '{{}}' for the class name, e.g. 'a photo of a {{}}.'")
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                raise BadInput(
                    f"template {t!r} must have exactly one '{{}}' for the class name and no other fields; "
                    "write literal braces as '{{{{' and '}}}}'"
                ) from None

    @property
    def num_prompts(self) -> int:
        return len(self.templates)


@dataclass
class SoftPrompt:
    """P soft prompts: context vectors ``ctx`` (P, m, D), or class-specific (P, C, m, D)."""

    ctx: torch.Tensor
    suffix: str = "."

    @property
    def num_prompts(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def num_ctx(self) -> int:
        return int(self.ctx.shape[-2])


@dataclass
class VisualPrompt:
    """P sets of n visual prompt tokens (P, n, W), W the ViT's width (``BlackBox.visual_width``)."""

    tokens: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Images:
    """A batch of images as float RGB in [0, 1], (B, 3, S, S), with optional cache keys; or
    prompted images, one batch per candidate, (P, B, 3, S, S), never cached; or, with
    ``pixels=None``, images by key alone: ones uploaded earlier (:meth:`BlackBox.upload`).

    ``keys[i]`` names image i *as sent* (its id plus augmentation view): equal keys promise
    equal pixels, which lets the black box reuse the image features. None: never cached.
    """

    pixels: torch.Tensor | None
    keys: Sequence[str] | None = None

    def __post_init__(self):
        if self.pixels is None and self.keys is None:
            raise BadInput("Images: give pixels, or the keys of uploaded images")
        _check_keys(self)

    @property
    def per_candidate(self) -> bool:
        return self.pixels is not None and self.pixels.ndim == 5

    @property
    def num_prompts(self) -> int:
        return int(self.pixels.shape[0]) if self.per_candidate else 1

    def __len__(self) -> int:
        """B, the images scored under each candidate."""
        if self.pixels is None:
            return len(self.keys)
        return int(self.pixels.shape[-4]) if self.pixels.ndim >= 4 else len(self.pixels)


def _check_keys(images: Images) -> None:
    """Keys, when given: one string per image, and only on a single (4-d) batch."""
    keys, px = images.keys, images.pixels
    if keys is None:
        return
    if torch.is_tensor(px) and px.ndim == 5:
        raise BadInput("Images: per-candidate (prompted) pixels (P, B, 3, S, S) cannot carry cache keys")
    if isinstance(keys, (str, bytes)) or not hasattr(keys, "__len__") or not hasattr(keys, "__getitem__"):
        raise BadInput(
            f"Images: keys must be a list of strings, one per image, got {type(keys).__name__}; "
            "e.g. keys=[f'{image_id}:{view}' for ...]"
        )
    for i, k in enumerate(keys):
        if not isinstance(k, str):
            raise BadInput(
                f"Images: keys must be strings, got {type(k).__name__} at position {i}; "
                "convert them, e.g. keys=[str(k) for k in keys]"
            )
    if px is not None and len(keys) != len(images):
        raise BadInput(f"Images: {len(images)} images but {len(keys)} keys; pass one key per image")
    if px is None and len(keys) == 0:
        raise BadInput("a query needs at least one image")


def _is_numpy(x) -> bool:
    return type(x).__module__.split(".")[0] == "numpy"


def _fmt(v: float) -> str:
    """Two decimals, unless that would round a value just outside [0, 1] back into it."""
    s = f"{v:.2f}"
    return s if (0.0 <= float(s) <= 1.0) == (0.0 <= v <= 1.0) else f"{v:.8g}"


class ByteLRU:
    """A mapping bounded by bytes: past ``max_bytes`` the least recently used entries leave
    first, and an entry bigger than the whole bound is not kept (None: unbounded). Thread-safe."""

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise BadInput(f"a cache size must be a number of bytes >= 0 or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._rows: OrderedDict = OrderedDict()  # key -> (value, nbytes), least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key) -> bool:
        return key in self._rows

    def __getitem__(self, key):
        """The value, without counting as a use (KeyError when absent)."""
        return self._rows[key][0]

    def get(self, key, default=None):
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                return default
            self._rows.move_to_end(key)
            return row[0]

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if self.max_bytes is not None and nbytes > self.max_bytes:
                return
            self._rows[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.max_bytes is not None and self.nbytes > self.max_bytes:
                _, (_, n) = self._rows.popitem(last=False)
                self.nbytes -= n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FeatureCache:
    """Image features by key, shared by every black box on one backbone: at most ``max_bytes``
    of them in memory (None: all), least recently used first out. A server keeps them in its
    database too: ``load(keys) -> {key: feats}`` brings evicted ones back, and ``save({key:
    feats})`` gets every newly encoded chunk."""

    def __init__(self, max_bytes: int | None = None, load=None, save=None):
        self._rows = ByteLRU(max_bytes)
        self._load, self._save = load, save

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def put(self, key: str, feats: torch.Tensor) -> None:
        """Features computed elsewhere (a server restoring its uploads)."""
        self._rows.put(key, feats, _nbytes(feats))

    def get(self, key: str) -> torch.Tensor:
        got = self._fetch([key])
        if key not in got:
            raise KeyError(key)
        return got[key]

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys with no features here nor in ``load``'s store (each once, in order)."""
        got = self._fetch(keys)
        return [k for k in dict.fromkeys(keys) if k not in got]

    def _fetch(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """{key: features} of the keys known in memory or to ``load`` (the loaded ones kept)."""
        got, rest = {}, []
        for k in dict.fromkeys(keys):
            v = self._rows.get(k)
            if v is None:
                rest.append(k)
            else:
                got[k] = v
        if rest and self._load is not None:
            for k, v in self._load(rest).items():
                self.put(k, v)
                got[k] = v
        return got

    def get_or_encode(self, images: Images, encode, chunk: int) -> tuple[torch.Tensor, int]:
        """(B, E) features, encoding only the misses; returns (features, number encoded)."""
        got = self._fetch(images.keys)
        n = self._encode_misses(images, got, encode, chunk)
        return torch.stack([got[k] for k in images.keys]), n

    def upload(self, images: Images, encode, chunk: int) -> int:
        """Encode the images whose keys are not cached, ``chunk`` at a time in the order given
        (a key repeated in the batch is encoded once); returns how many were encoded."""
        return self._encode_misses(images, self._fetch(images.keys), encode, chunk)

    def _encode_misses(self, images: Images, got: dict, encode, chunk: int) -> int:
        """Encode the images not in ``got`` into it (and the cache, and ``save``)."""
        miss, seen = [], set()
        for i, k in enumerate(images.keys):
            if k not in got and k not in seen:
                seen.add(k)
                miss.append(i)
        if miss and images.pixels is None:
            k = images.keys[miss[0]]
            raise BadInput(f"{len(miss)} image id(s) were never uploaded, e.g. {k!r}; upload them first")
        for c0 in range(0, len(miss), chunk):
            part = miss[c0 : c0 + chunk]
            contiguous = part[-1] - part[0] + 1 == len(part)
            px = images.pixels[part[0] : part[-1] + 1] if contiguous else images.pixels[torch.tensor(part)]  # a view when it can
            feats = encode(px)  # (n, E)
            new = {images.keys[i]: feats[j].clone() for j, i in enumerate(part)}  # own storage: evicted alone
            for k, v in new.items():
                self.put(k, v)
            got.update(new)
            if self._save is not None:
                self._save(new)
        return len(miss)


@runtime_checkable
class BlackBoxAPI(Protocol):
    """What a method may use of a black box: all that a model-as-a-service API offers.

    Implemented in process by :class:`BlackBox` and over HTTP by
    :class:`bbpt.serve.client.RemoteBlackBox`; methods are written against this alone, so
    every method runs unchanged against either. Nothing here reaches weights, features or
    gradients (CoOp's white-box path is :class:`bbpt.models.whitebox.WhiteBox`)."""

    meter: QueryMeter  # the run's own count; a refused query is never charged
    classnames: list[str]

    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...  # S: images are (B, 3, S, S) in [0, 1]
    @property
    def pixel_mean(self) -> tuple: ...
    @property
    def pixel_std(self) -> tuple: ...
    @property
    def ctx_dim(self) -> int: ...  # D of a soft prompt's tokens
    @property
    def context_length(self) -> int: ...
    @property
    def visual_width(self) -> int | None: ...  # a ViT's token width (visual prompt tokens), None otherwise
    @property
    def max_images_per_call(self) -> int: ...  # the pricing: B images cost ceil(B / this) api_calls per candidate
    @property
    def model_name(self) -> str: ...
    @property
    def encode_chunk(self) -> int: ...  # a sizing hint, per implementation: images per forward / upload

    def query(self, prompt: TextPrompt | SoftPrompt, images: Images,
              visual: VisualPrompt | None = None) -> torch.Tensor: ...  # logits (P, B, C), charged
    def embed_words(self, text: str) -> torch.Tensor: ...  # (m, D): an initial soft prompt; free
    def embed_patches(self, images: Images) -> torch.Tensor: ...  # (B, N, W): visual prompt scale; free
    def upload(self, images: Images) -> int: ...  # keyed images' features, encoded once; free
    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None,
                    purpose: str | None = None) -> BlackBoxAPI: ...  # the same model over other classes
    @property
    def capabilities(self) -> "Capabilities": ...  # what it accepts, returns, bills (bbpt.boxes.capabilities)
    # boxes that return embeddings (capabilities.returns has "embeddings"); charged (QueryMeter.embed_cost)
    def embed_images(self, images: Images) -> torch.Tensor: ...  # (B, E), L2-normalised
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...  # (N, E), L2-normalised


class QueryChecks:
    """The checks every black box makes before it charges (types, shapes, dtypes, ranges,
    NaN/Inf), from its public metadata alone: shared by :class:`BlackBox` and the HTTP
    client :class:`bbpt.serve.client.RemoteBlackBox`."""

    def check_shapes(self, prompt, images: Images, visual: VisualPrompt | None = None) -> int:
        """Every refusal that needs no tokenizer; returns P, the number of candidates."""
        self._check_images(images)
        Pt = self._check_prompt(prompt)
        Pv = self._check_visual(visual)
        P = max(Pt, Pv, images.num_prompts)
        for what, n in (("text prompts", Pt), ("visual prompts", Pv), ("per-candidate image batches", images.num_prompts)):
            if n not in (1, P):
                raise BadInput(f"{n} {what} for {P} candidates: each part of a query comes in P or 1")
        if images.pixels is None and visual is not None:
            raise BadInput("visual prompt tokens re-encode the images: send their pixels, not uploaded ids")
        return P

    def _check_images(self, images) -> None:
        if not isinstance(images, Images):
            raise BadInput(f"images must be bbpt.models.Images, got {type(images).__name__}")
        if images.pixels is not None:
            self._check_pixels(images.pixels)
        _check_keys(images)  # again: the keys may have been replaced since construction

    def _check_pixels(self, px: torch.Tensor) -> None:
        S = self.image_size
        if _is_numpy(px):
            raise BadInput(
                "images are a numpy array; pass a torch tensor: torch.from_numpy(x).float() / 255 for uint8, "
                "torch.from_numpy(x) for floats in [0, 1]"
            )
        if torch.is_tensor(px) and not torch.is_floating_point(px):
            fix = "pixels.float()" if px.dtype == torch.bool else "pixels.float() / 255"
            raise BadInput(f"images are {px.dtype}; bbpt expects float RGB in [0, 1]: use {fix}")
        if not torch.is_tensor(px) or px.ndim not in (4, 5) or tuple(px.shape[-3:]) != (3, S, S):
            shape = tuple(px.shape) if torch.is_tensor(px) else type(px).__name__
            raise BadInput(
                f"images must be (B, 3, {S}, {S}) RGB in [0, 1] for {self.model_name} "
                f"(or (P, B, 3, {S}, {S}) prompted per candidate); got {shape}"
            )
        if px.numel() == 0:
            raise BadInput("a query needs at least one image")
        lo, hi = (float(v) for v in torch.aminmax(px))  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise BadInput("images contain NaN or inf")
        if lo < 0.0 or hi > 1.0:
            raise BadInput(
                f"images have values in [{_fmt(lo)}, {_fmt(hi)}], outside [0, 1]; pass unnormalised RGB "
                "in [0, 1] (bbpt applies the model's mean/std itself)"
            )

    def _check_visual(self, visual) -> int:
        if visual is None:
            return 1
        if not isinstance(visual, VisualPrompt):
            raise BadInput(f"visual must be a bbpt.models.VisualPrompt, got {type(visual).__name__}")
        W = self.visual_width
        if W is None:
            raise BadInput(f"{self.model_name} has no ViT image tower: visual prompt tokens are not supported")
        t = visual.tokens
        if not torch.is_tensor(t):
            raise BadInput(f"visual prompt tokens must be a torch tensor (P, n, {W}), got {type(t).__name__}")
        if not torch.is_floating_point(t):
            raise BadInput(f"visual prompt tokens are {t.dtype}; they must be floating point, e.g. tokens.float()")
        if t.ndim != 3 or t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] != W:
            raise BadInput(f"visual prompt tokens must be (P, n, {W}) with P, n >= 1; got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise BadInput("visual prompt tokens contain NaN or inf")
        return visual.num_prompts

    def _check_prompt(self, prompt) -> int:
        if isinstance(prompt, TextPrompt):
            return prompt.num_prompts
        if not isinstance(prompt, SoftPrompt):
            raise BadInput(f"prompt must be a TextPrompt or SoftPrompt, got {type(prompt).__name__}")
        ctx, D, C = prompt.ctx, self.ctx_dim, self.num_classes
        if not torch.is_tensor(ctx):
            raise BadInput(f"soft prompt ctx must be a torch tensor (P, m, {D}), got {type(ctx).__name__}")
        if not torch.is_floating_point(ctx):
            raise BadInput(f"soft prompt ctx is {ctx.dtype}; context vectors must be floating point, e.g. ctx.float()")
        if not isinstance(prompt.suffix, str):
            raise BadInput(f"soft prompt suffix must be a string such as '.', got {type(prompt.suffix).__name__}")
        ok = ctx.ndim == 3 and ctx.shape[-1] == D or ctx.ndim == 4 and ctx.shape[1] == C and ctx.shape[-1] == D
        if not ok or ctx.shape[0] == 0 or ctx.shape[-2] == 0:
            raise BadInput(
                f"soft prompt ctx must be (P, m, {D}) or class-specific (P, {C}, m, {D}) with P, m >= 1; "
                f"got {tuple(ctx.shape)}"
            )
        if not torch.isfinite(ctx).all():
            raise BadInput("soft prompt ctx contains NaN or inf")
        return prompt.num_prompts



@torch.no_grad()
def _image_tokens(bb: Backbone) -> int | None:
    """1 + G of a ViT image tower (None without one): one blank image's patch embedding, once
    per backbone."""
    if bb.visual_width is None:
        return None
    if bb not in _IMAGE_TOKENS:
        S = bb.image_size
        _IMAGE_TOKENS[bb] = int(bb.patch_tokens(torch.zeros(1, 3, S, S)).shape[1])
    return _IMAGE_TOKENS[bb]


class BlackBox(QueryChecks):
    """Metered class scores (P, B, C) for images under candidate prompts.

    Public metadata a client may use: ``classnames``, ``num_classes``, ``image_size`` (the
    side of the pixels to send), ``max_images_per_call`` (the API's images-per-call limit:
    a query of B images costs ``ceil(B / max_images_per_call)`` calls per candidate),
    ``ctx_dim`` (D, width of a soft context vector), ``context_length``, ``visual_width``,
    ``pixel_mean`` / ``pixel_std``, and :meth:`embed_words` (the API's tokenise-and-embed
    service, used to initialise soft prompts from words such as "a photo of a").

    A query that would be refused (any :class:`BadInput`) is refused before the meter is
    charged, so it costs nothing; and one the budget refuses is refused before any text is
    tokenised or any image encoded.

    Limits: ``max_visual_tokens`` visual prompt tokens per candidate (None: :data:`VISUAL_TOKENS`,
    or the model's own image sequence, :attr:`image_tokens`, if longer; a ViT's attention
    grows with the square of the sequence). Caches: the token ids of the prompts' texts (``text_cache_bytes``,
    shared with :meth:`for_classes` boxes) and image features (``FeatureCache``) are bounded
    by bytes, least recently used first out.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        meter: QueryMeter | None = None,
        *,
        fast: bool = True,
        precision: str = "fp32",
        text_chunk: int = 4096,
        image_chunk: int = 2048,
        max_visual_tokens: int | None = None,
        text_cache_bytes: int | None = TEXT_CACHE_BYTES,
        _cache: FeatureCache | None = None,
        _text_cache: ByteLRU | None = None,
    ):
        if not classnames:
            raise BadInput("a black box needs at least one class name")
        if precision not in PRECISIONS:
            raise BadInput(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and backbone.device.type != "cuda":
            raise BadInput(f"precision {precision} needs a CUDA device; use --precision fp32 on CPU")
        self._bb = backbone
        self.classnames = list(classnames)
        self.meter = meter if meter is not None else QueryMeter()
        self.fast, self.precision, self.text_chunk, self.image_chunk = fast, precision, text_chunk, image_chunk
        if max_visual_tokens is not None and (isinstance(max_visual_tokens, bool) or not isinstance(max_visual_tokens, int)
                                              or max_visual_tokens < 1):
            raise BadInput(f"max_visual_tokens must be an integer >= 1 or None, got {max_visual_tokens!r}")
        self._max_visual_tokens = max_visual_tokens
        self._cache = _cache if _cache is not None else FeatureCache()
        self._texts = _text_cache if _text_cache is not None else ByteLRU(text_cache_bytes)  # token ids (N, L)
        self._classes_key = tuple(self.classnames)
        _image_tokens(backbone)  # known before any query asks

    # ---- metadata -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def image_size(self) -> int:
        return self._bb.image_size

    @property
    def max_images_per_call(self) -> int:
        """The API's images-per-call limit (from the meter): B images cost ceil(B / this) calls."""
        return self.meter.max_images_per_call

    @property
    def ctx_dim(self) -> int:
        return self._bb.text.width

    @property
    def context_length(self) -> int:
        return self._bb.text.context_length

    @property
    def model_name(self) -> str:
        return self._bb.name

    @property
    def cached_images(self) -> int:
        return len(self._cache)

    @property
    def visual_width(self) -> int | None:
        """W, the width of a visual prompt token; None when the image tower is not a ViT."""
        return self._bb.visual_width

    @property
    def image_tokens(self) -> int | None:
        """1 + G, the tokens of the ViT's own image sequence (CLS and patches); None without a ViT."""
        return _image_tokens(self._bb)

    @property
    def max_visual_tokens(self) -> int | None:
        """Visual prompt tokens a candidate may have (None: no ViT, so none). By default
        :data:`VISUAL_TOKENS` or the model's own sequence length if longer (the options of
        every method stay within it); a server sets its own (``bbpt serve``: 1 + G)."""
        if self._max_visual_tokens is not None:
            return self._max_visual_tokens
        return None if self.image_tokens is None else max(VISUAL_TOKENS, self.image_tokens)

    @property
    def pixel_mean(self) -> tuple:
        """The model's published input normalisation (what ``(x - mean) / std`` it applies)."""
        return tuple(self._bb.mean)

    @property
    def pixel_std(self) -> tuple:
        return tuple(self._bb.std)

    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None, purpose: str | None = None) -> "BlackBox":
        """The same model (and image-feature cache) over other classes and/or another meter.
        ``purpose`` (train / eval / side) labels the queries for a remote API's usage report."""
        return BlackBox(
            self._bb, classnames, meter if meter is not None else self.meter,
            fast=self.fast, precision=self.precision, text_chunk=self.text_chunk, image_chunk=self.image_chunk,
            max_visual_tokens=self._max_visual_tokens, _cache=self._cache, _text_cache=self._texts,
        )

    @property
    def capabilities(self):
        from ..boxes.local import capabilities

        return capabilities()

    def white_box(self, meter: QueryMeter):
        """The model itself, for the white-box reference alone (CoOp; ``Env.white_box``)."""
        from .whitebox import WhiteBox

        return WhiteBox(self._bb, self.classnames, meter)

    # ---- embeddings (a multimodal embedding API's service) -----------------------------------
    @torch.no_grad()
    def embed_images(self, images: Images) -> torch.Tensor:
        """L2-normalised image embeddings (B, E) of one batch of images: charged as an
        embedding request (:meth:`QueryMeter.embed_cost`), cached by key like any query."""
        self._check_images(images)
        if images.per_candidate:
            raise BadInput("embed_images takes one batch of images (B, 3, S, S); send prompted images one batch at a time")
        if images.pixels is None:
            missing = self._cache.missing(images.keys) if self.fast else list(images.keys)
            if missing:
                raise BadInput(f"{len(missing)} image id(s) were never uploaded, e.g. {missing[0]!r}; upload them first")
        self.meter.charge_cost(self.meter.embed_cost(0, len(images)))
        with self._autocast():
            return self._image_features(images, None)[0].float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, E) of ``texts``: charged as an embedding request."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not len(texts):
            raise BadInput("embed_texts takes a non-empty list of strings")
        ids = self._tokenize_checked(list(texts), lambda t, n, limit: (
            f"text {_preview(t)!r} has {n} tokens, more than the model's {limit}; shorten it"))
        self.meter.charge_cost(self.meter.embed_cost(len(texts), 0))
        tower = self._bb.text
        with self._autocast():
            L = tower.real_length(ids)
            feats = [tower.encode(tower.embed(ids[i:i + self.text_chunk, :L]), ids[i:i + self.text_chunk, :L], cut=False)
                     for i in range(0, len(ids), self.text_chunk)]
        return torch.nn.functional.normalize(torch.cat(feats).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_words(self, text: str) -> torch.Tensor:
        """Word embeddings of ``text`` without SOS/EOT, (m, D). Not a query: no images scored."""
        if not isinstance(text, str):
            raise BadInput(f"embed_words takes a string, got {type(text).__name__}")
        ids = self._tokenize_checked([text], lambda t, n, limit: (
            f"text {_preview(t)!r} has {n} tokens, more than the model's {limit}; shorten it"))[0]
        n = int(self._bb.text.eos_positions(ids[None])[0])
        return self._bb.text.embed(ids[self._bb.text.prefix:n]).float().cpu()

    @torch.no_grad()
    def embed_patches(self, images: Images) -> torch.Tensor:
        """The ViT's input tokens [CLS, patches] + positions, (B, 1 + G, W), of ``images``: the
        visual analogue of :meth:`embed_words` (scale for visual prompt tokens). Not a query."""
        self._check_images(images)
        if images.pixels is None:
            raise BadInput("embed_patches needs pixels, not image ids")
        px = images.pixels[0] if images.per_candidate else images.pixels
        return self._bb.patch_tokens(px).float().cpu()

    @torch.no_grad()
    def upload(self, images: Images) -> int:
        """Put the image features of keyed images (B, 3, S, S) into the feature cache, encoding
        the uncached ones ``image_chunk`` at a time in the order given; returns how many were
        newly encoded. Not a query: nothing is charged and ``images_encoded`` is not counted.
        With ``fast=False`` (the reference path never caches) it checks its input and returns 0.

        Why: features computed for different batch compositions can differ in the last float
        bits (BLAS blocking, GPU kernels), and a query encodes only its cache misses, so the
        batches a run encodes depend on its history. A run that uploads its whole few-shot set
        once, in a fixed order, gets the same features whether it ran straight through or was
        resumed from a checkpoint. It is also what a remote API's image upload does.
        """
        self.check_upload(images)
        if not self.fast:
            return 0
        with self._autocast():
            return self._cache.upload(images, self._bb.encode_images, self.encode_chunk)

    def check_upload(self, images: Images) -> None:
        """Every refusal :meth:`upload` makes, before it encodes anything."""
        self._check_images(images)
        if images.pixels is None:
            raise BadInput("upload needs the images' pixels")
        if images.per_candidate:
            raise BadInput(
                "upload takes one batch of images (B, 3, S, S) with keys; per-candidate (prompted) "
                "pixels (P, B, 3, S, S) are never cached, send them with query()"
            )
        if images.keys is None:
            raise BadInput("upload needs Images with keys, one string per image, to cache the features under")

    # ---- the query ------------------------------------------------------------------
    def query(self, prompt: TextPrompt | SoftPrompt, images: Images, visual: VisualPrompt | None = None) -> torch.Tensor:
        """Logits (P, B, C) of B images under P candidates. Checked in full, then charged,
        then computed: a refused query (BadInput, BudgetExhausted) costs nothing.

        The candidates' text prompts, per-candidate images and visual tokens each come in
        P or 1 (shared by all candidates).
        """
        return query_many([(self, prompt, images, visual)])[0]

    def check_query(self, prompt, images: Images, visual: VisualPrompt | None = None) -> int:
        """Everything that can make the query refuse, before anything is charged; returns P."""
        P = self.check_request(prompt, images, visual)
        self.check_text(prompt)
        return P

    def check_request(self, prompt, images: Images, visual: VisualPrompt | None = None) -> int:
        """Every refusal that needs no tokenizer and no encoder (shapes, limits, unknown image
        ids); returns P. What the budget is checked after, before any text is tokenised."""
        P = self.check_shapes(prompt, images, visual)
        if visual is not None and visual.tokens.shape[1] > self.max_visual_tokens:
            n, lim = visual.tokens.shape[1], self.max_visual_tokens
            raise BadInput(f"{n} visual prompt tokens per candidate, over the limit of {lim} (max_visual_tokens; "
                           f"{self.model_name}'s own image sequence has {self.image_tokens}); send at most {lim}")
        if images.pixels is None and not self.fast:
            raise BadInput("images by id need the fast path (fast=True): the reference path never caches")
        if images.pixels is None:
            missing = self._cache.missing(images.keys)
            if missing:
                raise BadInput(f"{len(missing)} image id(s) were never uploaded, e.g. {missing[0]!r}; upload them first")
        return P

    def check_text(self, prompt) -> torch.Tensor:
        """Tokenise the prompt's texts (or find them cached), refusing any that does not fit
        the text context; returns their ids (P·C or C, L)."""
        return self._prepare_text(prompt)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @property
    def encode_chunk(self) -> int:
        """Images per image-tower forward: ``image_chunk``, fewer at high resolution, so one
        forward's input stays under ENCODE_BYTES (memory flat at 224 px and beyond)."""
        S = self.image_size
        return max(1, min(self.image_chunk, ENCODE_BYTES // (3 * S * S * 4)))

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E), ``encode_chunk`` images per forward."""
        n = self.encode_chunk
        if len(pixels) <= n:
            return self._bb.encode_images(pixels)
        return torch.cat([self._bb.encode_images(pixels[i : i + n]) for i in range(0, len(pixels), n)])

    def _image_features(self, images: Images, visual: VisualPrompt | None) -> torch.Tensor:
        """(P or 1, B, E) image features; cached only without any visual prompt."""
        if visual is None and not images.per_candidate:
            if self.fast and images.keys is not None:
                feats, n = self._cache.get_or_encode(images, self._bb.encode_images, self.encode_chunk)
            else:
                feats, n = self._encode(images.pixels), len(images)
            self.meter.record_encoded(n)
            return feats[None]
        bb, B = self._bb, len(images)
        px = images.pixels if images.per_candidate else images.pixels[None]  # (Pi, B, 3, S, S)
        if visual is None:  # prompted pixels only
            feats = torch.stack([self._encode(x) for x in px])
            self.meter.record_encoded(feats.shape[0] * B)
            return feats
        tok = visual.tokens.to(bb.device)  # (Pv, n, W)
        P = max(len(px), len(tok))
        per = max(1, self.encode_chunk // B)  # candidates per forward
        base = None if images.per_candidate else bb.patch_tokens(px[0])  # (B, 1+G, W), shared
        out = []
        for p0 in range(0, P, per):
            ps = range(p0, min(P, p0 + per))
            x = torch.stack([base if base is not None else bb.patch_tokens(px[p]) for p in ps])  # (p, B, 1+G, W)
            t = torch.stack([tok[p if len(tok) > 1 else 0] for p in ps])  # (p, n, W)
            t = t[:, None].expand(-1, B, -1, -1)
            f = bb.encode_tokens(x.flatten(0, 1), t.flatten(0, 1))  # (p*B, E)
            out.append(f.view(len(ps), B, -1))
        self.meter.record_encoded(P * B)
        return torch.cat(out)

    # ---- text side ------------------------------------------------------------------
    def _prepare_text(self, prompt) -> torch.Tensor:
        """Token ids of the prompt's texts, (P·C, L) of a text prompt or (C, L) of a soft one's
        template: tokenised once per template set / context length and kept in the text cache,
        refusing any text that does not fit the text context."""
        if isinstance(prompt, TextPrompt):
            return self._hard_ids(prompt.templates)
        return self._soft_ids(prompt.num_ctx, prompt.suffix)

    def _cached_ids(self, key: tuple, make) -> torch.Tensor:
        key = (self._classes_key, *key)
        ids = self._texts.get(key)
        if ids is None:
            ids = make()
            texts = sum(map(len, self.classnames)) + sum(len(str(k)) for k in key[1:])  # the key's strings
            self._texts.put(key, ids, _nbytes(ids) + texts)
        return ids

    def _hard_ids(self, templates: tuple[str, ...]) -> torch.Tensor:
        def make():
            texts = [t.format(c) for t in templates for c in self.classnames]
            return self._tokenize_checked(texts, lambda t, n, limit: (
                f"prompt {_preview(t)!r} has {n} tokens, more than the model's {limit}; "
                "shorten the template or the class name"))  # (P*C, 77)

        return self._cached_ids(("hard", templates), make)

    def _soft_ids(self, m: int, suffix: str) -> torch.Tensor:
        def make():
            head = " ".join(["X"] * m) + " "
            shown = "X " * m if m <= 3 else "X X .. X "

            def too_long(t, n, limit):
                return (f"prompt {_preview(shown + t[len(head):])!r} ({m} context tokens) has {n} tokens, more "
                        f"than the model's {limit}; use fewer context tokens (n_ctx) or a shorter class name")

            ids = self._tokenize_checked([head + c + suffix for c in self.classnames], too_long)  # (C, 77)
            k = self._bb.text.prefix
            if self._bb.placeholder_id is None:
                raise self._bb.no_placeholder()
            if not bool((ids[:, k : k + m] == self._bb.placeholder_id).all()):
                raise BadInput(f"{self.model_name}: the tokenizer merges the context placeholders with the text "
                               f"after them; put a space or a word between context and class (suffix {suffix!r})")
            return ids

        return self._cached_ids(("soft", m, suffix), make)

    def _sequences(self, prompt, ids: torch.Tensor | None = None, L: int | None = None):
        """Embeddings (P, C, L, D) and ids (P, C, L) of all candidate-class sequences, from the
        prompt's token ids (:meth:`_prepare_text`) cut to their first ``L`` positions (None:
        all) before they are embedded."""
        C = self.num_classes
        ids = self._prepare_text(prompt) if ids is None else ids
        ids = ids if L is None else ids[:, :L]
        emb = self._bb.text.embed(ids)  # (P*C or C, L, D)
        if isinstance(prompt, TextPrompt):
            P = prompt.num_prompts
            return emb.view(P, C, *emb.shape[1:]), ids.reshape(P, C, -1)
        ctx = prompt.ctx.to(emb.device, emb.dtype)
        P, m = prompt.num_prompts, prompt.num_ctx
        ctx = ctx[:, None].expand(P, C, m, -1) if ctx.ndim == 3 else ctx  # (P, C, m, D)
        k = self._bb.text.prefix  # special tokens before the text (CLIP's SOS), then the context
        emb = torch.cat([emb[None, :, :k].expand(P, -1, -1, -1), ctx, emb[None, :, k + m :].expand(P, -1, -1, -1)], dim=2)
        return emb, ids[None].expand(P, -1, -1)

    def _tokenize_checked(self, texts: list[str], too_long) -> torch.Tensor:
        """Token ids (N, L) of ``texts``; BadInput(too_long(text, n_tokens, limit)) if a text has
        more tokens than the context leaves beside the special ones (CLIP: 77 - SOS - EOT).

        Tokenised once: the tokenizer truncates silently, but only a row that fills the window
        (EOT at or past the model's last position, or no padding left) can have been cut, so
        only those are counted exactly with the tokenizer's ``encode`` (skipped if it has none).
        """
        bb, tower = self._bb, self._bb.text
        ids = bb.tokenize(texts)
        limit = self.context_length - tower.prefix - 1
        eos = tower.eos_positions(ids)
        full = (eos >= min(ids.shape[1], self.context_length) - 1) | (ids[:, -1] != tower.pad_id)
        for i in full.nonzero().flatten().tolist():
            n = bb.count_tokens(texts[i])
            if n is not None and n > limit:
                raise BadInput(too_long(texts[i], n, limit))
        return ids

    def _text_features(self, prompt) -> torch.Tensor:
        """(P, C, E) normalised text features of every candidate for every class."""
        return _text_features_many([(self, prompt)])[0]


def _text_features_many(items: list[tuple["BlackBox", object]], ids: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Text features (P, C, E) of several prompts (on class sets of one backbone), their
    P·C sequences encoded together: one text-tower forward per ``text_chunk`` sequences, all
    cut to the longest real length before they are embedded (exact under the causal mask, up
    to float rounding). ``ids``: each prompt's token ids, if already at hand."""
    box0 = items[0][0]
    tower = box0._bb.text
    ids = ids if ids is not None else [box._prepare_text(prompt) for box, prompt in items]  # (P·C or C, 77) each
    if not box0.fast:  # reference loop: one candidate per forward, full context length
        out = []
        for (box, prompt), i in zip(items, ids):
            emb, ids_ = box._sequences(prompt, i)
            feats = [tower.encode(emb[p], ids_[p], cut=False) for p in range(emb.shape[0])]
            out.append(torch.nn.functional.normalize(torch.stack(feats).float(), dim=-1))
        return out
    L = max(tower.real_length(i) for i in ids)
    seqs = [box._sequences(prompt, i, L) for (box, prompt), i in zip(items, ids)]  # (P, C, L, D), (P, C, L) each
    flat = [(emb.reshape(-1, *emb.shape[2:]), i.reshape(-1, i.shape[-1])) for emb, i in seqs]  # (P·C, L, ·)
    emb = torch.cat([e for e, _ in flat]) if len(flat) > 1 else flat[0][0]
    idx = torch.cat([i for _, i in flat]) if len(flat) > 1 else flat[0][1]
    n = box0.text_chunk
    feats = torch.cat([tower.encode(emb[i : i + n], idx[i : i + n], cut=False) for i in range(0, len(emb), n)])
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    out, i = [], 0
    for emb_, _ in seqs:
        P, C = emb_.shape[:2]
        out.append(feats[i : i + P * C].view(P, C, -1))
        i += P * C
    return out


@torch.no_grad()
def query_many(items: list[tuple[BlackBox, object, Images, VisualPrompt | None]]) -> list[torch.Tensor]:
    """Several queries, possibly on different class sets of one backbone, answered together
    (a server's dynamic batching): all are checked (the budget before any text is tokenised),
    then all charged (all or nothing: a batch that does not fit the budget is refused whole
    and charges nothing), then one text-tower forward serves every candidate-class sequence
    of every query. Each result (P, B, C) equals its query answered alone up to float rounding (1e-5); one query is exactly query()."""
    Ps = [box.check_request(prompt, images, visual) for box, prompt, images, visual in items]
    queries = [(box.meter, P, len(images)) for (box, _, images, _), P in zip(items, Ps)]
    check_all(queries)  # the budget, before any text is tokenised
    ids = [box.check_text(prompt) for box, prompt, _, _ in items]  # refuses texts that do not fit
    charge_all(queries)  # all or nothing
    box0 = items[0][0]
    with box0._autocast():
        imgs = [box._image_features(images, visual) for box, _, images, visual in items]  # (P or 1, B, E) each
        txts = _text_features_many([(box, prompt) for box, prompt, _, _ in items], ids)  # (P or 1, C, E) each
    out = []
    for (box, *_), P, img, txt in zip(items, Ps, imgs, txts):
        img, txt = img.float().expand(P, -1, -1), txt.float().expand(P, -1, -1)
        logits = box._bb.logit_scale * torch.einsum("pbe,pce->pbc", img, txt)
        out.append((logits + box._bb.logit_bias).cpu())
    return out
