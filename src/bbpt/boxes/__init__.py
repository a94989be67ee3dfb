"""Black boxes by transport: one module per wire protocol, found by name.

A run's box is named by ``--box``:

| ``--box``                  | transport (module)        | what the API is                                 |
|----------------------------|---------------------------|-------------------------------------------------|
| none (default), ``local``  | ``local``                 | the model in this process (``--model``)         |
| ``http(s)://HOST``, ``bbpt:URL`` | ``bbpt``            | a ``bbpt serve`` server (soft prompts, logits)  |
| ``hf:URL``                 | ``hf``                    | Hugging Face zero-shot-image-classification     |
| ``openai:URL``             | ``openai``                | OpenAI-style multimodal ``/embeddings``         |

Each transport is a module of this package that defines ``KIND`` (its name), ``SCHEMES``
(URL schemes it takes without a ``KIND:`` prefix), ``KEY_ENV`` (its key's environment
variable, or None), ``SUMMARY``, ``capabilities(url)`` and ``open(url, classnames, meter,
key=..., **options)``. Only that module knows its wire format; the engine calls
:func:`open_box` and never names a transport. A fifth transport is one new module here
(found by :func:`transports`) plus its tests.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from ..errors import BadInput, UnknownName
from .capabilities import Capabilities, Needs  # noqa: F401  (re-exported)

_NOT_TRANSPORTS = {"capabilities", "keys", "retry", "wire_images"}


@dataclass(frozen=True)
class BoxSpec:
    kind: str
    url: str | None

    def __str__(self) -> str:
        return self.kind if self.url is None else f"{self.kind}:{self.url}"


def transports() -> dict[str, ModuleType]:
    """Every transport module of this package, by ``KIND``."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_TRANSPORTS:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        out[mod.KIND] = mod
    return out


def parse(spec: str | None) -> BoxSpec:
    """``--box``'s value -> (transport kind, URL). None and ``local`` are the in-process box;
    ``KIND:URL`` names the transport; a bare URL goes to the transport claiming its scheme."""
    kinds = transports()
    if spec is None or spec == "local":
        return BoxSpec("local", None)
    head, sep, rest = spec.partition(":")
    if sep and head in kinds and not rest.startswith("//"):
        return BoxSpec(head, rest or None)
    for kind, mod in kinds.items():
        if sep and head.lower() in getattr(mod, "SCHEMES", ()):
            return BoxSpec(kind, spec)
    forms = ", ".join(f"{k}:URL" for k in sorted(kinds) if k != "local")
    raise BadInput(f"--box {spec!r} names no transport; give a URL of a bbpt server (http://HOST:PORT), "
                   f"or KIND:URL with KIND one of {', '.join(sorted(kinds))} ({forms})")


def module(spec: BoxSpec) -> ModuleType:
    kinds = transports()
    if spec.kind not in kinds:
        raise UnknownName("box transport", spec.kind, kinds, "`bbpt methods --box KIND:URL`")
    return kinds[spec.kind]


def capabilities(spec: str | BoxSpec | None) -> Capabilities:
    """What the box ``spec`` accepts and returns (no query, no network)."""
    spec = spec if isinstance(spec, BoxSpec) else parse(spec)
    return module(spec).capabilities(spec.url)


def open_box(spec: str | BoxSpec | None, classnames, meter, *, key: str | None = None, key_file: str | None = None,
             **options):
    """The black box ``spec`` over ``classnames``, charged on ``meter``. ``key`` / ``key_file``:
    the API key, else the transport's environment variable, else the key file (see
    :mod:`bbpt.boxes.keys`). ``options``: what the transport takes (the local one: model,
    pretrained, device, precision)."""
    from .keys import resolve_key

    spec = spec if isinstance(spec, BoxSpec) else parse(spec)
    mod = module(spec)
    if spec.kind != "local" and spec.url is None:
        raise BadInput(f"--box {spec.kind}: needs a URL, e.g. --box {spec.kind}:http://127.0.0.1:8000")
    k = resolve_key(spec, getattr(mod, "KEY_ENV", None), key, key_file)
    return mod.open(spec.url, classnames, meter, key=k, **options)


def check_fit(method_cls, spec: str | BoxSpec | None, caps: Capabilities | None = None) -> None:
    """BadInput (one line: what is missing, which methods fit) unless ``method_cls`` can run on
    the box ``spec``; called before any query."""
    from ..methods import METHODS
    from .capabilities import refusal

    spec = spec if isinstance(spec, BoxSpec) else parse(spec)
    caps = caps if caps is not None else capabilities(spec)
    others = {n: METHODS.get(n).needs for n in METHODS.names()}
    msg = refusal(method_cls.name, method_cls.needs, caps, str(spec), others)
    if msg is not None:
        raise BadInput(msg)


def matrix(methods: dict[str, Needs]) -> str:
    """The method x transport table, Markdown: "runs", or what the box lacks."""
    mods = transports()
    kinds = sorted(mods, key=lambda k: (k != "local", k != "bbpt", k))
    head = "| method | " + " | ".join(f"`{k}`" for k in kinds) + " |"
    rows = [head, "|" + "---|" * (len(kinds) + 1)]
    for name, needs in methods.items():
        cells = []
        for k in kinds:
            missing = needs.missing(mods[k].capabilities(None))
            cells.append("runs" if not missing else "lacks " + "; ".join(m.split(" (")[0] for m in missing))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
