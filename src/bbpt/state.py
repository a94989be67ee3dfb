"""Explicit, exact state: nested Python state <-> one safetensors file, written atomically.

A run's checkpoint is one nested structure (dicts, lists, numbers, strings, tensors, numpy
arrays, RNG states, pycma pickles). :func:`save_state` splits it into tensors, stored in
safetensors, and everything else, stored as JSON in the same file's metadata (floats keep
every bit: Python writes the shortest repr that reads back to the same double). One file,
replaced atomically, so a process killed at any moment leaves either the old checkpoint or
the new one, never half of either.

pycma's ``CMAEvolutionStrategy`` has no state format other than pickle. Its pickle travels
as a uint8 tensor with its SHA-256 in the JSON, and :func:`load_state` unpickles it only
after the hash matches. bbpt reads checkpoints only from the run folder it wrote them to
(``--out``), never from a path given for that purpose, because unpickling runs code. The
hash guards against corruption, not against a hostile folder: resume only run folders you
(or your own bbpt) made, as with any pickle.

The whole file is hashed too: its metadata holds the SHA-256 of the JSON and of every
tensor (name, dtype, shape, bytes), so a flipped byte anywhere is refused on load
(:class:`~bbpt.errors.CorruptCheckpoint`), not resumed from. Files of the previous format
(``bbpt-state-1``, pickles hashed only) still load.

Types kept exactly: tensors (dtype, shape), numpy arrays, tuples, dicts with non-string keys
(torch optimisers key their state by int), ints of any size (numpy's PCG64 state), floats
including inf/nan, bytes (pickles).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CorruptCheckpoint, WriteFailed, excerpt

FORMAT = "bbpt-state-2"  # + the SHA-256 of all content
READABLE = (FORMAT, "bbpt-state-1")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: all or nothing. A
    write that fails (a full disk) removes its temporary file and raises :class:`WriteFailed`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}; free space on that disk (or fix its permissions), "
                          "then rerun the same command: a run resumes from its last checkpoint") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- flatten / unflatten -------------------------------------------------------------------
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """obj -> a JSON-able tree; tensors (and arrays, pickles) moved into ``tensors`` by path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": path, "dtype": obj.dtype.str}
    if isinstance(obj, (bytes, bytearray)):
        tensors[path] = torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else torch.zeros(0, dtype=torch.uint8)
        return {"__bytes__": path, "sha256": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, np.generic):  # numpy scalars: keep the type
        return {"__npscalar__": obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[_flatten(k, tensors, f"{path}/k{i}"), _flatten(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]), copy=True)
    if "__bytes__" in obj:
        data = tensors[obj["__bytes__"]].numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != obj["sha256"]:
            raise ValueError(f"checkpoint blob {obj['__bytes__']!r} does not match its SHA-256")
        return data
    if "__npscalar__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__items__"]}
    return {k: _unflatten(v, tensors) for k, v in obj.items()}


def _digest(state_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the JSON and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(state_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(path: Path, state: dict) -> int:
    """Write ``state`` to ``path`` (one safetensors file) atomically; returns its size in bytes."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "")
    if not tensors:
        tensors["_empty"] = torch.zeros(0)
    state_json = json.dumps(tree, allow_nan=False)
    data = save(tensors, metadata={"format": FORMAT, "state": state_json, "sha256": _digest(state_json, tensors)})
    atomic_write_bytes(path, data)
    return len(data)


def load_state(path: Path) -> dict:
    """The state written by :func:`save_state`, verified by its hash (see the module doc);
    a damaged or foreign file raises :class:`CorruptCheckpoint`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for a damaged header
        raise CorruptCheckpoint(f"checkpoint {path} is damaged ({type(e).__name__}: {excerpt(e, 80)})") from None
    if meta.get("format") not in READABLE:
        raise CorruptCheckpoint(f"{path} is not a bbpt state file (format {meta.get('format')!r})")
    if meta.get("format") == FORMAT and meta.get("sha256") != _digest(meta.get("state", ""), tensors):
        raise CorruptCheckpoint(f"checkpoint {path} is damaged: its content does not match the SHA-256 it was saved with")
    try:
        return _unflatten(json.loads(meta["state"]), tensors)
    except (KeyError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} is damaged ({type(e).__name__}: {excerpt(e, 80)})") from None


def pickle_own(obj: Any, shared: dict[str, Callable[[], Any]] | None = None) -> bytes:
    """Pickle third-party state (pycma). ``shared`` names live objects to keep *out* of the
    pickle, stored as references and resolved again on load (numpy's global RNG: a copy of
    it inside the pickle would be a second, frozen stream)."""
    live = {id(get()): name for name, get in (shared or {}).items()}

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return live.get(id(o))

    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def unpickle_own(data: bytes, shared: dict[str, Callable[[], Any]] | None = None) -> Any:
    """Unpickle third-party state that bbpt itself pickled into a run's checkpoint."""

    class _Unpickler(pickle.Unpickler):  # noqa: S301 -- only bytes from this run's own, hash-checked checkpoint
        def persistent_load(self, pid):
            if not shared or pid not in shared:
                raise pickle.UnpicklingError(f"unknown shared object {pid!r} in a checkpoint")
            return shared[pid]()

    return _Unpickler(io.BytesIO(data)).load()


# ---- objects <-> state ----------------------------------------------------------------------
def get_state(obj: Any) -> Any:
    """The state of one attribute: ``state_dict()`` where it has one, RNG states, or the value."""
    if isinstance(obj, torch.Generator):
        return {"__torch_generator__": obj.get_state()}
    if isinstance(obj, np.random.Generator):
        return {"__numpy_generator__": obj.bit_generator.state}
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return {"__state_dict__": obj.state_dict()}
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return obj


def set_state(owner: Any, name: str, state: Any) -> None:
    """Restore attribute ``name`` of ``owner`` from :func:`get_state`'s output, in place where
    the attribute has ``load_state_dict`` (optimisers, modules), else by assignment."""
    cur = getattr(owner, name)
    if isinstance(state, dict) and "__torch_generator__" in state:
        cur.set_state(state["__torch_generator__"])
    elif isinstance(state, dict) and "__numpy_generator__" in state:
        cur.bit_generator.state = state["__numpy_generator__"]
    elif isinstance(state, dict) and "__state_dict__" in state:
        cur.load_state_dict(state["__state_dict__"])
    elif isinstance(cur, torch.nn.Parameter):  # in place: optimisers hold the parameter itself
        with torch.no_grad():
            cur.copy_(state)
    else:
        setattr(owner, name, state.clone() if isinstance(state, torch.Tensor) else state)


def global_rng_state() -> dict:
    """Python's, numpy's and torch's global RNGs (CUDA's too where present)."""
    import random

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_global_rng_state(s: dict) -> None:
    import random

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
