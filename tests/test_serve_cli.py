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


# ---- item: an unusable --db is one line naming the path, exit 2, before anything starts ----------
def cli_run(args, capsys):
    """The CLI in-process: (exit code, stdout, stderr)."""
    from bbpt import cli

    old = sys.argv
    sys.argv = ["bbpt", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def unusable_dbs(tmp_path) -> dict:
    """name -> (--db path, what the one line must say)."""
    import sqlite3

    (tmp_path / "folder.db").mkdir()
    (tmp_path / "random.db").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "afile").write_text("x")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE keys (x INTEGER)")
    other.commit()
    other.close()
    cases = {"folder": (tmp_path / "folder.db", "is a folder"),
             "random bytes": (tmp_path / "random.db", "is not an SQLite database"),
             "a file in the way": (tmp_path / "afile" / "serve.db", "a file is in the way"),
             "another schema": (tmp_path / "other.db", "another schema")}
    if os.path.isdir("/proc/self"):  # read-only even for root
        cases["read-only location"] = (os.path.join("/proc", f"bbpt-{os.getpid()}.db"), "cannot be opened or created")
    return cases


def test_unusable_db_for_keys_commands_is_one_line_exit_2(tmp_path, capsys):
    cases = unusable_dbs(tmp_path)
    before = {n: p.read_bytes() for n, (p, _) in cases.items() if os.path.isfile(p)}
    for name, (path, what) in cases.items():
        for args in (["serve", "keys", "list"], ["serve", "keys", "add", "me", "--budget", "api_calls=5"],
                     ["serve", "keys", "revoke", "me"]):
            code, out, err = cli_run([*args, "--db", str(path)], capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and out == "", (name, args, code, err)
            assert lines[0].startswith(f"error: serve database {path}") and what in lines[0], (name, lines)
            assert "--db" in lines[0], lines  # the fix
    for n, (p, _) in cases.items():  # nothing was written into a file that is not ours
        if n in before:
            assert p.read_bytes() == before[n], n


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_db_file_is_one_line_exit_2(tmp_path, capsys):
    from bbpt.serve.store import Store

    Store(tmp_path / "ro.db").close()
    os.chmod(tmp_path / "ro.db", 0o444)
    code, _, err = cli_run(["serve", "keys", "add", "me", "--db", str(tmp_path / "ro.db")], capsys)
    assert code == 2 and err.startswith(f"error: serve database {tmp_path / 'ro.db'}") and len(err.splitlines()) == 1


def test_serve_with_an_unusable_db_exits_2_in_one_line_before_starting(tmp_path):
    cases = unusable_dbs(tmp_path)
    for name in ("folder", "random bytes"):
        path, what = cases[name]
        p = bbpt("serve", "--port", str(free_port()), "--db", str(path), timeout=60)
        line = one_error_line(p)
        assert p.returncode == 2 and what in line and str(path) in line, (name, p.returncode, line)


# ---- item: --host (and --port) checked before anything starts ------------------------------------
def test_serve_refuses_a_bad_host_or_a_busy_port_in_one_line_exit_2(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [(["--host", "999.1.1.1", "--port", str(free_port())],
              "--host '999.1.1.1' is neither an IP address nor a host name this machine can resolve"),
             (["--host", "no-such-host.invalid", "--port", str(free_port())], "nor a host name this machine can resolve"),
             (["--host", "192.0.2.1", "--port", str(free_port())], "--host '192.0.2.1' is not an address of this machine"),
             (["--port", str(port)], f"port {port} on 127.0.0.1 is in use")]
    try:
        procs = [subprocess.Popen([*BBPT, "serve", *args, "--db", str(tmp_path / f"s{i}.db")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i, (args, _) in enumerate(cases)]
        for p, (args, what) in zip(procs, cases):
            try:
                out, err = p.communicate(timeout=90)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=20)
            line = one_error_line(subprocess.CompletedProcess(args, p.returncode, out, err))
            assert p.returncode == 2 and what in line, (args, p.returncode, line)
            assert "--host 127.0.0.1" in line or "another --port" in line  # the fix
    finally:
        busy.close()
    assert not any((tmp_path / f"s{i}.db").exists() for i in range(len(cases)))  # refused before the db


# ---- item: a clean shutdown exits 0 ----------------------------------------------------------------
def wait_healthy(proc, url, timeout=120.0):
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_exits_0_after_a_clean_shutdown_on_a_signal(sig, tmp_path):
    port = free_port()
    proc = subprocess.Popen([*BBPT, "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(tmp_path / "s.db")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert rc == 0, (rc, err[-2000:])
    assert "Traceback" not in err and "error" not in err.lower(), err[-2000:]


# ---- item: an unreachable --remote is refused at once ---------------------------------------------
def closed_port() -> int:
    """A port nothing listens on (bound and closed at once; nothing else binds it meanwhile here)."""
    return free_port()


def test_unreachable_or_wrong_server_is_refused_at_once():
    import http.server
    import threading

    from bbpt.errors import BadInput
    from bbpt.serve.client import RemoteBlackBox, RemoteError

    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as e:
        RemoteBlackBox(url, "bbpt-0-x", ["a", "b"])
    assert time.monotonic() - t0 < 5  # not the 120 s of retries a run under way gets
    assert str(e.value).startswith(f"cannot reach a bbpt server at {url} (ConnectError") and "bbpt serve" in str(e.value)
    assert len(str(e.value).splitlines()) == 1

    class NotBBPT(http.server.BaseHTTPRequestHandler):  # some other web server: 404 for /v1/model
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), NotBBPT)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"does not answer as a bbpt server \(GET /v1/model: HTTP 404\); check the"):
            RemoteBlackBox(url, "bbpt-0-x", ["a", "b"])
        assert time.monotonic() - t0 < 5
    finally:
        other.shutdown()
        other.server_close()
    for bad in ("localhost:8000", "ftp://127.0.0.1:8000", "http://"):
        with pytest.raises(BadInput, match=r"is not an http\(s\) URL of a server; e\.g\. --remote http://127\.0\.0\.1:8000"):
            RemoteBlackBox(bad, "bbpt-0-x", ["a", "b"])


def test_bbpt_run_remote_to_a_closed_port_fails_fast_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    p = bbpt("run", "--method", "zip", "--dataset", "shapes", "--shots", "1", "--remote", url, "--out",
             str(tmp_path / "r"), "--quiet", env={"BBPT_API_KEY": "bbpt-0-x"}, timeout=110)
    took = time.monotonic() - t0
    line = one_error_line(p)
    assert p.returncode == 2 and line.startswith(f"error: cannot reach a bbpt server at {url}"), (p.returncode, line)
    assert "check the URL and that `bbpt serve` is running there" in line
    assert took < 60, took  # start-up and data checks only: no retries
    assert not (tmp_path / "r").exists()  # nothing started, nothing left behind


# ---- item: a server key with less budget than the run ----------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `bbpt serve` subprocess on 127.0.0.1 and a free port; stopped with SIGTERM."""
    db = tmp_path_factory.mktemp("served") / "s.db"
    port = free_port()
    proc = subprocess.Popen([*BBPT, "serve", "--port", str(port), "--db", str(db)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield url, db
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def add_key(db, name, *budget) -> str:
    from bbpt.cli import _parse_budget
    from bbpt.serve.store import Store

    store = Store(db)
    try:
        return store.add_key(name, _parse_budget(list(budget)))
    finally:
        store.close()


def usage(url, key) -> dict:
    return httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()


def test_a_key_with_less_budget_than_the_run_stops_it_with_key_budget(served, tmp_path):
    url, db = served
    key = add_key(db, "small-key", "api_calls=150")
    p = bbpt("run", "--method", "zip", "--dataset", "shapes", "--shots", "2", "--budget", "300", "--test-subset", "100",
             "--remote", url, "--out", str(tmp_path / "r"), "--quiet", env={"BBPT_API_KEY": key}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "r" / "result.json").read_text())
    assert r["status"] == "finished" and r["stopped_by"] == "key_budget"
    spent = r["queries"]["api_calls"]
    assert 0 < spent < 300 and r["budget"] == {"api_calls": 300}
    k = r["key"]  # the key's counts as the server's 429 gave them
    assert k["budget"] == {"api_calls": 150, "prompt_evals": None}
    assert k["used"]["api_calls"] <= 150 < k["used"]["api_calls"] + k["refused"]["api_calls"]
    assert k["used"]["api_calls"] >= spent  # training and evaluation queries both count against the key
    lines = p.stderr.strip().splitlines()  # one line says the key ran out
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"training stopped after {spent} api_calls (stopped_by: key_budget): API key budget "
                               f"exhausted on {url}: this query needs api_calls={k['refused']['api_calls']} but "
                               f"the key's budget is api_calls=150 and api_calls={k['used']['api_calls']} are used; ")
    assert lines[0].endswith("ask the server's operator for a larger budget or a new key (`bbpt serve keys add`)")
    total = usage(url, key)["total"]
    assert total["api_calls"] <= 150  # never past the key's budget
    assert total["api_calls"] == spent + r["eval_queries"]["api_calls"]  # the server's counts are the run's


def test_the_runs_own_budget_still_stops_it_with_budget(served, tmp_path, monkeypatch):
    from bbpt.engine import make_run_config, run

    url, db = served
    monkeypatch.setenv("BBPT_API_KEY", add_key(db, "big-key", "api_calls=1000"))
    r = run(make_run_config(method="zip", dataset="shapes", shots=1, test_subset=100, remote=url,
                            options={"budget": 30}), out=tmp_path / "r", progress=False)
    assert r.stopped_by == "budget" and r.queries["api_calls"] == 30 and r.key is None


def test_a_key_spent_before_training_or_during_the_test_is_one_line_exit_2(served, tmp_path):
    url, db = served
    key = add_key(db, "tiny-key", "api_calls=1")  # not even the starting evaluation fits
    p = bbpt("run", "--method", "zip", "--dataset", "shapes", "--shots", "1", "--budget", "50", "--test-subset", "100",
             "--remote", url, "--out", str(tmp_path / "r"), "--quiet", env={"BBPT_API_KEY": key}, timeout=300)
    line = one_error_line(p)
    assert p.returncode == 2 and line.startswith(f"error: API key budget exhausted on {url}: "), line
    assert usage(url, key)["total"]["api_calls"] <= 1
