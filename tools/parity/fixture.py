"""Parity fixtures: one JSON file per fixture under ``tests/parity/``, written by the scripts in
``tools/parity/`` from an official checkout and read by ``tests/test_parity_*.py``.

Layout::

    {"method": "craft",                      # the registered bbpt method (or "optim:cmaes")
     "official": {"repo": "mrflogs/CraFT", "commit": "<40 hex>",
                  "statements": [{"file": "main_craft.py", "lines": [157, 190], "what": "..."}]},
     "regenerate": "python tools/parity/craft.py /path/to/CraFT",
     "environment": {"python": ..., "torch": ..., "numpy": ..., "cma": ...},
     "notes": [...],                          # what the fixture does not cover, and why
     "inputs": {...}, "trajectory": [{...}, ...]}

Arrays are ``{"dtype", "shape", "b64"}`` (little-endian bytes, base64): exact and compact.
Pure numpy; the tests import :func:`load` from here.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "parity"


def encode(x):
    """Arrays (numpy or torch) -> tagged dicts; containers recursively; scalars as they are."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        dt = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
        return {"dtype": dt.str, "shape": list(x.shape), "b64": base64.b64encode(x.astype(dt).tobytes()).decode()}
    if isinstance(x, dict):
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def decode(x):
    if isinstance(x, dict) and set(x) == {"dtype", "shape", "b64"}:
        return np.frombuffer(base64.b64decode(x["b64"]), dtype=np.dtype(x["dtype"])).reshape(x["shape"]).copy()
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v) for v in x]
    return x


def write(name: str, fixture: dict) -> Path:
    path = FIXTURES / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(encode(fixture), indent=1) + "\n")
    return path


def load(name_or_path) -> dict:
    p = Path(name_or_path)
    path = p if p.suffix == ".json" else FIXTURES / f"{name_or_path}.json"
    return decode(json.loads(path.read_text()))


def all_fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))
