"""The API's cost, measured side by side in one run.

    python bench/serve.py [--seconds 10] [--clients 1,8,32] [--device cuda] [--no-zip] [--json out.json]

1. A default ZIP run (fashion-mnist, 16 shots, seed 1, 5000 api_calls) in process and
   through `bbpt serve` (`--remote`): wall-time ratio, and the images uploaded once. The
   remote run is timed twice: as is, and with the client at one torch thread. (Client and
   server share this machine's cores here; a client's idle OpenMP threads spin-wait on
   them while it waits for the server's answers, which a client on its own machine does
   not cost the server.)
2. Aggregate throughput (api_calls/s) from 1, 8 and 32 concurrent clients against a server
   with dynamic batching (up to 32 queries and 1024 text sequences per forward) and one without (``--max-batch
   1``), for two query shapes, both on 128 uploaded images and 10 classes:
   - ``zip``: 10 soft-prompt candidates per query (ZIP's, 10 api_calls);
   - ``single``: one candidate per query (1 api_call), where a forward is small.

Servers run as subprocesses on 127.0.0.1 (free ports) and are stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve import Server  # noqa: E402  (the tests' subprocess server: free port, health wait)

from bbpt.data import fewshot_split, load_task  # noqa: E402
from bbpt.engine import RunResult, make_run_config, run  # noqa: E402
from bbpt.serve.wire import CONTENT_TYPE, pack  # noqa: E402


def zip_run(remote: str | None, key: str | None, threads: int | None = None, device: str = "cpu") -> tuple[float, RunResult]:
    if key:
        os.environ["BBPT_API_KEY"] = key
    cfg = make_run_config(method="zip", dataset="fashion-mnist", shots=16, seed=1, remote=remote,
                          **({} if remote else {"device": device}))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        r = run(cfg, progress=False)
        return time.perf_counter() - t, r
    finally:
        torch.set_num_threads(before)


def throughput(server: Server, key: str, ids: list[str], classes: list[str], clients: int, seconds: float,
               P: int) -> float:
    """api_calls per second over ``seconds`` with ``clients`` threads sending queries back to back."""
    done, stop = [0] * clients, threading.Event()

    def client(i):
        c = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {key}",
                                                                      "Content-Type": CONTENT_TYPE})
        g = torch.Generator().manual_seed(i)
        while not stop.is_set():
            body = pack({"prompt": {"type": "soft"}, "classes": classes, "images": ids},
                        {"ctx": torch.randn(P, 8, 128, generator=g) * 0.02})
            r = c.post("/v1/query", content=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            if r.status_code == 200 and not stop.is_set():
                done[i] += P  # P candidates on one 128-image batch: P api_calls

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm-up: connections, first forwards
    done[:] = [0] * clients
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - t0
    total = sum(done)
    for t in threads:
        t.join(timeout=120)
    return total / elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--device", default="cpu", help="the servers' device (and the in-process ZIP run's)")
    ap.add_argument("--shapes", default="zip,single", help="query shapes for the throughput table")
    ap.add_argument("--no-zip", action="store_true", help="skip part 1 (the ZIP runs in process and remote)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    out = {"device": args.device, "seconds": args.seconds}
    tmp = Path(tempfile.mkdtemp(prefix="bbpt-serve-bench-"))
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    dev = ("--device", args.device)
    batched = Server(tmp / "b.db", *dev).start()
    unbatched = Server(tmp / "u.db", "--max-batch", "1", *dev).start()
    try:
        if not args.no_zip:
            out["zip"] = zip_part(batched, args.device)
        out["throughput"] = throughput_part(batched, unbatched, args)
    finally:
        batched.stop()
        unbatched.stop()
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def zip_part(batched: Server, device: str) -> dict:
    """1. ZIP in process vs remote."""
    zip_run(None, None, device=device)  # warm-up: data, caches, imports
    t_local, r_local = zip_run(None, None, device=device)
    key = batched.key("zip")
    t_remote, r_remote = zip_run(batched.url, key)
    u = httpx.get(batched.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    key1 = batched.key("zip-1thread")
    t_remote1, r_remote1 = zip_run(batched.url, key1, threads=1)
    same = all(r.accuracy == r_local.accuracy and r.queries == r_local.queries
               for r in (r_remote, r_remote1))
    print("\nZIP, fashion-mnist, 16 shots, seed 1, 5000 api_calls")
    print(f"  in process               {t_local:6.1f} s   test {100 * r_local.accuracy.test:.2f}%")
    print(f"  remote                   {t_remote:6.1f} s   ratio {t_remote / t_local:.2f}x")
    print(f"  remote, client 1 thread  {t_remote1:6.1f} s   ratio {t_remote1 / t_local:.2f}x")
    print(f"  same result (accuracy, query counts): {same}")
    print(f"  server counts: train {u['purposes']['train']['api_calls']} api_calls in "
          f"{u['purposes']['train']['requests']} requests, eval {u['purposes']['eval']['api_calls']} in "
          f"{u['purposes']['eval']['requests']}; the 160 few-shot images uploaded once, then sent as ids", flush=True)
    return {"local_s": t_local, "remote_s": t_remote, "remote_1thread_s": t_remote1, "same": same}


def throughput_part(batched: Server, unbatched: Server, args) -> list[dict]:
    """2. throughput, batching on vs off."""
    task = load_task("fashion-mnist")
    train, _ = fewshot_split(task, 16, 1)
    from bbpt.methods import FewShotData

    px = FewShotData(train, 32).images(range(128)).pixels
    rows = []
    for name, s in (("batched", batched), ("unbatched", unbatched)):
        k = s.key(f"tp-{name}")
        ids = httpx.post(s.url + "/v1/images", content=pack({}, {"pixels": px}),
                         headers={"Authorization": f"Bearer {k}", "Content-Type": CONTENT_TYPE}).json()["ids"]
        for shape, P in (s_ for s_ in (("zip", 10), ("single", 1)) if s_[0] in args.shapes.split(",")):
            for n in (int(c) for c in args.clients.split(",")):
                rate = throughput(s, k, ids, task.classnames, n, args.seconds, P)
                rows.append((shape, name, n, rate))
                print(f"  {shape:6s} {name:9s} {n:3d} clients: {rate:8.1f} api_calls/s", flush=True)
    print("\n| query shape | clients | batched api_calls/s | unbatched api_calls/s | batched / unbatched |")
    print("|---|---|---|---|---|")
    table = []
    for shape in sorted({r[0] for r in rows}, reverse=True):
        for n in sorted({r[2] for r in rows}):
            b = next(r[3] for r in rows if r[:3] == (shape, "batched", n))
            un = next(r[3] for r in rows if r[:3] == (shape, "unbatched", n))
            print(f"| {shape} | {n} | {b:.0f} | {un:.0f} | {b / un:.2f}x |")
            table.append({"shape": shape, "clients": n, "batched": b, "unbatched": un, "ratio": b / un})
    return table


if __name__ == "__main__":
    main()
