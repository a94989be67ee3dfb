"""The wire format of the bbpt API: one safetensors blob per request or response body.

Tensors travel as safetensors (little-endian, shape and dtype in its header), never as JSON
lists of floats; everything else (prompt kind, templates, class names, image ids, usage) is
JSON under the header's ``__metadata__`` key ``"json"``. Content type
``application/x-safetensors``. Small replies without tensors (ids, usage, errors) are JSON.
"""
from __future__ import annotations

import json
import struct

import torch

CONTENT_TYPE = "application/x-safetensors"
MAX_HEADER = 1 << 20  # bytes of safetensors header a request may have


class WireError(ValueError):
    """A body that is not a valid bbpt request; ``param`` names the part."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def pack(meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    from safetensors.torch import save

    t = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    return save(t, metadata={"json": json.dumps(meta)})


def unpack(body: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a body made by :func:`pack`; WireError for anything else."""
    from safetensors.torch import load

    if len(body) < 8:
        raise WireError(f"body of {len(body)} bytes is not a safetensors blob ({CONTENT_TYPE})", "body")
    (n,) = struct.unpack("<Q", body[:8])
    if n > MAX_HEADER or 8 + n > len(body):
        raise WireError(f"safetensors header of {n} bytes does not fit the body of {len(body)}", "body")
    try:
        header = json.loads(body[8 : 8 + n])
        meta = json.loads((header.get("__metadata__") or {}).get("json", "{}"))
        tensors = load(bytes(body))
    except Exception as e:  # noqa: BLE001 -- any malformed blob is the client's error
        raise WireError(f"body is not a valid safetensors blob ({type(e).__name__}: {str(e)[:120]})", "body") from None
    if not isinstance(meta, dict):
        raise WireError("the body's JSON metadata must be an object", "body")
    return meta, tensors
