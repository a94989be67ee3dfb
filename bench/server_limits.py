"""The server's limits, measured: memory under refused requests, /v1/health under a big query.

    python bench/server_limits.py [--refused 100] [--repeats 2]

Starts `bbpt serve` (the embedded model `mini`, a temporary database) as a subprocess on
127.0.0.1 and a free port, stops it at the end, and prints:

1. the server's resident memory (VmRSS from /proc/PID/status) before and after ``--refused``
   heavy requests that are all refused: 1000 templates x 10 classes on a key with a budget
   of one api_call (429, the issue's case), 2000 templates x 10 classes (413
   max_query_rows), 100,000 class names to register (413 max_classes) and 30,000 visual
   prompt tokens (413 max_visual_tokens), in turn. Target: growth < 50 MB.
2. /v1/health latency (p50, p99, max) polled every 10 ms while the largest query the
   default limits allow runs (max_query_rows candidate x class sequences: 4 templates x
   max_classes classes, on as many images as max_query_logits leaves), ``--repeats``
   times. Target: p99 <= 50 ms.

Every loop is bounded in count and in time.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve import Server  # noqa: E402  (the tests' subprocess server: free port, health wait)

from bbpt.serve.wire import CONTENT_TYPE, pack  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}), {platform.python_version()}, torch {torch.__version__}, load average {load}"


def text_query(templates: int, classes: list[str], pixels: torch.Tensor) -> bytes:
    return pack({"prompt": {"type": "text", "templates": [f"a {i} photo of a {{}}." for i in range(templates)]},
                 "classes": classes}, {"pixels": pixels})


def refused(server: Server, n: int) -> None:
    poor = server.key("poor", "api_calls=1")
    ten = [f"class {i}" for i in range(10)]
    px = torch.rand(2, 3, 32, 32)
    kinds = [  # (what, path, request kwargs)
        ("429 1000 templates x 10 classes over the budget", "/v1/query",
         {"content": text_query(1000, ten, px), "headers": {"Content-Type": CONTENT_TYPE}}),
        ("413 2000 templates x 10 classes (max_query_rows)", "/v1/query",
         {"content": text_query(2000, ten, px), "headers": {"Content-Type": CONTENT_TYPE}}),
        ("413 100,000 class names (max_classes)", "/v1/class_sets",
         {"json": {"names": [f"class {i}" for i in range(100_000)]}}),
        ("413 30,000 visual prompt tokens (max_visual_tokens)", "/v1/query",
         {"content": pack({"prompt": {"type": "soft"}, "classes": ten},
                          {"ctx": torch.zeros(1, 4, 128), "pixels": px, "visual": torch.zeros(1, 30_000, 128)}),
          "headers": {"Content-Type": CONTENT_TYPE}}),
    ]
    codes: dict[str, list[int]] = {what: [] for what, _, _ in kinds}
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {poor}"}) as c:
        for what, path, kw in kinds:  # one of each first: the pool's threads, the first parse
            c.post(path, **kw)
        before = rss_mb(server.proc.pid)
        t0 = time.perf_counter()
        for i in range(n):
            what, path, kw = kinds[i % len(kinds)]
            codes[what].append(c.post(path, **kw).status_code)
        wall = time.perf_counter() - t0
    after = rss_mb(server.proc.pid)
    print(f"\n1. {n} refused heavy requests in {wall:.1f} s ({1000 * wall / n:.0f} ms each, client included)")
    for what, seen in codes.items():
        print(f"   {len(seen):4d} x {what}: status {sorted(set(seen))}")
    print(f"   server RSS {before:.0f} MB before, {after:.0f} MB after: {after - before:+.1f} MB (target < 50 MB)")


def big_query(server: Server, headers: dict, body: bytes, status: list, walls: list, done: threading.Event) -> None:
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/query", content=body, timeout=600, headers={**headers, "Content-Type": CONTENT_TYPE})
    status.append(r.status_code)
    walls.append(time.perf_counter() - t0)
    done.set()


def health_under_load(server: Server, repeats: int) -> None:
    key = server.key("big")
    h = {"Authorization": f"Bearer {key}"}
    lim = httpx.get(server.url + "/v1/model", headers=h).json()["limits"]
    C = lim["max_classes"]
    P = lim["max_query_rows"] // C
    B = min(lim["max_query_images"], lim["max_query_logits"] // (P * C))
    classes = [f"class number {i}" for i in range(C)]
    print(f"\n2. /v1/health while the largest allowed query runs: {P} templates x {C} classes = {P * C} sequences "
          f"on {B} images ({P * B * C} scores)")
    lat, walls = [], []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for r in range(repeats):
            body = text_query(P, [f"{n} {r}" for n in classes], torch.rand(B, 3, 32, 32))  # new texts each time
            done, status = threading.Event(), []
            t = threading.Thread(target=big_query, args=(server, h, body, status, walls, done))
            t.start()
            t_end = time.time() + 600
            while not done.is_set() and time.time() < t_end:
                t0 = time.perf_counter()
                c.get("/v1/health")
                lat.append(time.perf_counter() - t0)
                time.sleep(0.01)
            t.join(timeout=600)
            print(f"   query {r + 1}: status {status}, {walls[-1]:.1f} s")
    lat.sort()
    p50, p99 = (1000 * lat[min(len(lat) - 1, int(p * len(lat)))] for p in (0.5, 0.99))
    print(f"   {len(lat)} health requests: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {1000 * lat[-1]:.1f} ms "
          "(target p99 <= 50 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refused", type=int, default=100, help="refused heavy requests to send")
    ap.add_argument("--repeats", type=int, default=2, help="largest allowed queries to time health under")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "serve.db").start()
        try:
            print(f"server: bbpt serve --model mini, pid {server.proc.pid}, {server.url}")
            refused(server, args.refused)
            health_under_load(server, args.repeats)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
