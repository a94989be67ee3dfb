"""The caches of an in-process black box, bounded by bytes: :class:`ByteLRU` (the token ids
of prompt texts) and :class:`FeatureCache` (image features by key, shared by every box on one
backbone, optionally backed by a server's database)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from ..errors import BadInput
from .prompts import Images


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


def nbytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's elements."""
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
        self._rows.put(key, feats, nbytes(feats))

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
