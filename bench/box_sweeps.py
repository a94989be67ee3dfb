"""The per-box rows of the README's api_methods table: sweeps whose runs reach the model through
a transport (``bbpt:``, ``hf:``, ``openai:``) of a ``bbpt serve`` this script starts.

    python bench/box_sweeps.py                     # every bench/sweeps/api_methods_*.toml with a box
    python bench/box_sweeps.py bench/sweeps/api_methods_hf.toml --workers 2

It makes a key in a fresh database (no budget of its own: each run's budget is its own),
serves ``mini`` on 127.0.0.1:PORT (the port the sweep files name, so the runs' folders, hashed
on their box URL, stay the same from one call to the next), hands the key to the runs through
BBPT_API_KEY, HF_TOKEN and OPENAI_API_KEY, runs each sweep (resuming what a previous call left)
and its report, and stops the server. Ctrl-C stops the sweep as ``bbpt sweep`` does (every run
checkpoints), then the server.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BBPT = [sys.executable, "-m", "bbpt.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", help="sweep files (default: bench/sweeps/api_methods_*.toml)")
    ap.add_argument("--port", type=int, default=8765, help="the port the sweep files' box URLs name")
    ap.add_argument("--workers", type=int, default=1, help="runs at once (each a client of the one server)")
    ap.add_argument("--server-workers", type=int, default=2, help="the server's threads")
    ap.add_argument("--no-report", action="store_true", help="skip `bbpt report` after each sweep")
    a = ap.parse_args()
    here = f"127.0.0.1:{a.port}"
    files = [Path(f) for f in a.sweeps] or [f for f in sorted((ROOT / "bench/sweeps").glob("api_methods_*.toml"))
                                            if here in f.read_text()]
    for f in files:
        if here not in f.read_text():
            sys.exit(f"error: {f} names no box on 127.0.0.1:{a.port}; pass --port with the port its [run] box uses")
    tmp = Path(tempfile.mkdtemp(prefix="bbpt-box-sweeps-"))
    db = str(tmp / "serve.db")
    p = subprocess.run([*BBPT, "serve", "keys", "add", "box-sweeps", "--db", db], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    key = p.stdout.strip()
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen([*BBPT, "serve", "--port", str(a.port), "--db", db, "--workers", str(a.server_workers)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, t_end = f"http://127.0.0.1:{a.port}/v1/health", time.time() + 120
        while True:
            if server.poll() is not None:
                sys.exit(f"error: bbpt serve exited ({server.returncode}); see {tmp / 'serve.log'}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > t_end:
                sys.exit(f"error: bbpt serve did not answer {url} within 120 s; see {tmp / 'serve.log'}")
            time.sleep(0.2)
        print(f"box_sweeps: bbpt serve on 127.0.0.1:{a.port} (log {tmp / 'serve.log'})", flush=True)
        env = dict(os.environ, BBPT_API_KEY=key, HF_TOKEN=key, OPENAI_API_KEY=key)
        for f in files:
            rc = subprocess.call([*BBPT, "sweep", str(f), "--workers", str(a.workers)], cwd=ROOT, env=env)
            if rc != 0:
                print(f"box_sweeps: {f} stopped with exit code {rc}", flush=True)
                return rc
            if not a.no_report:
                out = ROOT / "bench/results/sweeps" / f.stem
                subprocess.check_call([*BBPT, "report", str(f), "--out", str(out)], cwd=ROOT, env=env)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
