"""Plugins: other packages add methods, backbones, datasets and transports through entry points.

| group              | the entry point names a module that, on import, ...                          |
|--------------------|-------------------------------------------------------------------------------|
| ``bbpt.methods``   | registers a method (``@register_method``, as :mod:`bbpt.methods.zeroshot`)     |
| ``bbpt.backbones`` | registers a backbone family (:func:`bbpt.models.catalog.register_backbone`)    |
| ``bbpt.datasets``  | registers an offline task (``TASKS.register``, :mod:`bbpt.data.offline`)       |
| ``bbpt.transports``| *is* a transport (``KIND``, ``SCHEMES``, ``open``, ...: :mod:`bbpt.boxes`)     |

A group's entry points are loaded once, lazily: when its registry is first listed or is asked
for a name it lacks, so a run naming only built-ins imports no plugin. A plugin never replaces
what is registered already (bbpt's own names, or an earlier plugin's): registering a taken
name is an error, as is any failure to load; both are one line naming the entry point and
its package (:class:`PluginError`).
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from .errors import BBPTError, excerpt

GROUPS = ("bbpt.methods", "bbpt.backbones", "bbpt.datasets", "bbpt.transports")

_loaded: dict[str, list[tuple[EntryPoint, Any]] | PluginError] = {}  # group -> its loaded entry points, or why not
_current: list[str] = []  # the plugin being loaded (what a registry names as the owner of what it registers)


class PluginError(BBPTError):
    """An installed plugin cannot be loaded (an import error, a taken name, a malformed module)."""


class NameTaken(ValueError):
    """A registration under a name already registered: a plugin never replaces it."""


def current() -> str | None:
    """'plugin NAME (package DIST)' while that plugin loads, else None (bbpt's own code)."""
    return _current[-1] if _current else None


def load(group: str, accept: Callable[[Any], None] | None = None) -> list[tuple[EntryPoint, Any]]:
    """Every entry point of ``group``, imported once (later calls return the same list; a
    failure is raised again). ``accept(obj)`` is called on each loaded object (a transport's
    check); an error there is the plugin's, like an import error."""
    done = _loaded.get(group)
    if isinstance(done, PluginError):
        raise done
    if done is not None:
        return done
    out = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        package = f"{dist.name} {dist.version}" if dist is not None else "an unknown package"
        _current.append(f"plugin {ep.name!r} (package {package})")
        try:
            obj = ep.load()
            if accept is not None:
                accept(obj)
        except Exception as e:
            why = str(e) if isinstance(e, NameTaken) else f"{type(e).__name__}: {excerpt(e, 200)}"
            name = dist.name if dist is not None else "PACKAGE"
            _loaded[group] = PluginError(f"plugin entry point {ep.name} = {ep.value} (group {group}, package {package}) "
                                         f"failed to load: {why}; fix the plugin or `pip uninstall {name}`")
            raise _loaded[group] from None
        finally:
            _current.pop()
        out.append((ep, obj))
    _loaded[group] = out
    return out

