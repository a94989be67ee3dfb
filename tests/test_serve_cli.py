"""`bbpt serve` and `bbpt run --remote` at their edges: public metadata, unusable databases and
hosts refused in one line before anything starts, a clean SIGTERM exiting 0, an unreachable
server refused at once, and a key that runs out of budget before the run does.

Servers bind 127.0.0.1 on a free port, are started and stopped by the test itself, and every
wait is bounded."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from bbpt.serve.app import ServeConfig, create_app

BBPT = [sys.executable, "-m", "bbpt.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bbpt(*args, timeout=120, env=None):
    return subprocess.run([*BBPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(p) -> str:
    """The single ``error: ...`` line a refused command prints (and nothing else on stderr)."""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


# ---- item: GET /v1/model is public metadata ---------------------------------------------------
def test_model_metadata_is_public_and_the_rest_needs_a_key(tmp_path):
    with TestClient(create_app(ServeConfig(db=str(tmp_path / "s.db")))) as c:
        r = c.get("/v1/model")
        assert r.status_code == 200
        info = r.json()
        assert info["model"] == "mini" and info["image_size"] == 32 and info["max_images_per_call"] == 128
        assert c.get("/v1/model", headers={"Authorization": "Bearer bbpt-0-wrong"}).status_code == 200
        r = c.get("/v1/usage")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert c.post("/v1/class_sets", json={"names": ["a", "b"]}).status_code == 401
