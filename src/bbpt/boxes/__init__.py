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
(found by :func:`transports`) plus its tests, or a plugin's module (entry-point group
``bbpt.transports``, :mod:`bbpt.plugins`): loaded when a ``--box`` names no built-in
transport or the transports are listed; its ``KIND`` and ``SCHEMES`` may not be taken already.
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


def builtin_transports() -> dict[str, ModuleType]:
    """Every transport module of this package, by ``KIND``."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_TRANSPORTS:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        out[mod.KIND] = mod
    return out


_PLUGINS: dict[str, ModuleType] = {}  # the plugins' transports, by KIND (filled once, by plugins.load)
_TRANSPORT_NAMES = ("KIND", "SUMMARY", "capabilities", "open")  # what a plugin's transport module must define


def _add_plugin(mod) -> None:
    from ..plugins import NameTaken

    missing = [a for a in _TRANSPORT_NAMES if not hasattr(mod, a)]
    if missing:
        raise TypeError(f"{getattr(mod, '__name__', mod)!r} is not a transport module: it lacks {', '.join(missing)}")
    taken = {**builtin_transports(), **_PLUGINS}
    if mod.KIND in taken:
        raise NameTaken(f"box transport {mod.KIND!r} is registered already and a plugin cannot replace it; "
                        "give the plugin's another KIND")
    for scheme in getattr(mod, "SCHEMES", ()):
        owner = next((k for k, m in taken.items() if scheme in getattr(m, "SCHEMES", ())), None)
        if owner is not None:
            raise NameTaken(f"URL scheme {scheme!r} belongs to the box transport {owner!r} already and a plugin "
                            "cannot take it; drop it from the plugin's SCHEMES")
    _PLUGINS[mod.KIND] = mod


def transports(with_plugins: bool = True) -> dict[str, ModuleType]:
    """Every transport by ``KIND``: this package's modules, then the plugins' (loaded once)."""
    out = builtin_transports()
    if with_plugins:
        from .. import plugins

        plugins.load("bbpt.transports", _add_plugin)
        out.update(_PLUGINS)
    return out


def _resolve(spec: str, kinds: dict[str, ModuleType]) -> BoxSpec | None:
    head, sep, rest = spec.partition(":")
    if sep and head in kinds and not rest.startswith("//"):
        return BoxSpec(head, rest or None)
    for kind, mod in kinds.items():
        if sep and head.lower() in getattr(mod, "SCHEMES", ()):
            return BoxSpec(kind, spec)
    return None


def parse(spec: str | None) -> BoxSpec:
    """``--box``'s value -> (transport kind, URL). None and ``local`` are the in-process box;
    ``KIND:URL`` names the transport; a bare URL goes to the transport claiming its scheme.
    The plugins' transports are loaded only when no built-in one fits."""
    if spec is None or spec == "local":
        return BoxSpec("local", None)
    found = _resolve(spec, transports(with_plugins=False))
    if found is not None:
        return found
    kinds = transports()
    found = _resolve(spec, kinds)
    if found is not None:
        return found
    forms = ", ".join(f"{k}:URL" for k in sorted(kinds) if k != "local")
    raise BadInput(f"--box {spec!r} names no transport; give a URL of a bbpt server (http://HOST:PORT), "
                   f"or KIND:URL with KIND one of {', '.join(sorted(kinds))} ({forms})")


def module(spec: BoxSpec) -> ModuleType:
    kinds = transports(with_plugins=False)
    if spec.kind not in kinds:
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
