"""A name -> object registry with did-you-mean errors (methods, tasks, backbones).

A registry with a ``group`` also holds what plugins register (:mod:`bbpt.plugins`): that
entry-point group is loaded the first time the registry is listed or lacks a name asked for.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from . import plugins
from .errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, hint: str = "", group: str | None = None):
        self.kind, self.hint, self.group = kind, hint, group
        self._items: dict[str, T] = {}
        self._owner: dict[str, str] = {}  # name -> the plugin that registered it (bbpt's own: absent)

    def register(self, name: str, obj: T | None = None):
        """``reg.register("x", obj)`` or as a decorator ``@reg.register("x")``. A name is never
        registered twice: a plugin cannot replace a built-in (or another plugin's) name."""
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names must be lowercase and non-empty: {name!r}")

        def add(o: T) -> T:
            plugin = plugins.current()
            if name in self._items and plugin is not None:
                raise plugins.NameTaken(f"{self.kind} {name!r} is registered already (by {self.owner(name)}) and a "
                                        "plugin cannot replace it; give the plugin's another name")
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            if plugin is not None:
                self._owner[name] = plugin
            return o

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (tests that register a name of their own
        remove it afterwards, so the registry is the same whichever tests ran first)."""
        if name not in self._items:
            raise UnknownName(self.kind, name, self._items, self.hint)
        self._owner.pop(name, None)
        return self._items.pop(name)

    def owner(self, name: str) -> str:
        """Who registered ``name``: 'bbpt', or 'plugin NAME (package DIST VERSION)'."""
        return self._owner.get(name, "bbpt")

    def load_plugins(self) -> None:
        """Import the plugins of this registry's entry-point group (once; a broken one: PluginError)."""
        if self.group is not None:
            plugins.load(self.group)

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load_plugins()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(self.kind, name, self._items, self.hint) from None

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self.load_plugins()
        return name in self._items

    def items(self, with_plugins: bool = True) -> list[tuple[str, T]]:
        """(name, object) in the order registered; ``with_plugins=False``: without loading plugins."""
        if with_plugins:
            self.load_plugins()
        return list(self._items.items())

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
