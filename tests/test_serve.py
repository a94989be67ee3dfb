"""`bbpt serve` against real servers: uvicorn in a subprocess on 127.0.0.1 and a free port,
started and stopped by the tests, every request loop bounded in count and time."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import torch

from method_cases import shipped

from bbpt.engine import make_run_config, run
from bbpt.methods import METHODS
from bbpt.models import BlackBox, BlackBoxAPI, Images, SoftPrompt, TextPrompt, create_backbone
from bbpt.serve.client import RemoteBlackBox
from bbpt.serve.wire import CONTENT_TYPE, pack, unpack

BBPT = [sys.executable, "-m", "bbpt.cli"]
NAMES = ["circle", "square", "triangle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db, *extra):
        self.db, self.extra, self.port = str(db), extra, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout=90.0):
        self.proc = subprocess.Popen([*BBPT, "serve", "--port", str(self.port), "--db", self.db, *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def key(self, name, *budget):
        p = subprocess.run([*BBPT, "serve", "keys", "add", name, *sum((["--budget", b] for b in budget), []),
                            "--db", self.db], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "serve.db").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(server):
    return server.key("tests")


def post(server, key, path, body=b"", ctype=CONTENT_TYPE, **headers):
    h = {"Content-Type": ctype, **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + path, content=body, headers=h, timeout=60)


def query_body(ctx=None, pixels=None, classes=NAMES, **meta):
    m = {"prompt": {"type": "soft"} if ctx is not None else {"type": "text", "templates": ["a photo of a {}."]},
         "classes": classes, **meta}
    t = {}
    if ctx is not None:
        t["ctx"] = ctx
    t["pixels"] = torch.rand(2, 3, 32, 32) if pixels is None else pixels
    return pack(m, t)


def err(r):
    return r.json()["error"]


# ---- status codes ------------------------------------------------------------------------------
def test_status_codes_and_error_bodies(server, key):
    ok = query_body()
    assert post(server, None, "/v1/query", ok).status_code == 401
    assert err(post(server, None, "/v1/query", ok))["code"] == "missing_api_key"
    r = post(server, key[:-2] + "xx", "/v1/query", ok)
    assert r.status_code == 401 and err(r)["code"] == "invalid_api_key" and err(r)["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/nope").status_code == 404
    assert httpx.get(server.url + "/v1/query", headers={"Authorization": f"Bearer {key}"}).status_code == 405
    r = post(server, key, "/v1/query", ok, ctype="application/json")
    assert r.status_code == 415 and err(r)["param"] == "content-type"
    r = post(server, key, "/v1/query", ok)
    assert r.status_code == 200 and unpack(r.content)[1]["logits"].shape == (1, 2, 3)
    for body, param, what in [
        (query_body(pixels=torch.rand(2, 3, 16, 16)), None, "(B, 3, 32, 32)"),
        (query_body(pixels=torch.full((2, 3, 32, 32), float("nan"))), None, "NaN"),
        (query_body(pixels=torch.randint(0, 9, (2, 3, 32, 32), dtype=torch.int32)), "pixels", "dtype torch.int32"),
        (query_body(ctx=torch.zeros(2, 4, 7)), None, "soft prompt ctx must be (P, m, 128)"),
        (query_body(ctx=torch.zeros(2, 4, 128, dtype=torch.int64)), "ctx", "send float32"),
        (query_body(class_set="cs-nope", classes=None), "class_set", "unknown class set"),
        (query_body(classes=[]), "classes", "non-empty list"),
        (pack({"prompt": {"type": "text", "templates": ["a {}"]}, "classes": NAMES, "images": ["img-never"]}), None,
         "never uploaded"),
        (b"\x00" * 16, "body", "safetensors"),
    ]:
        r = post(server, key, "/v1/query", body)
        assert r.status_code == 422, (what, r.text)
        e = err(r)
        assert what in e["message"] and e["type"] == "invalid_request_error", (what, e)
        if param:
            assert e["param"] == param, (what, e)


def test_413_for_a_body_over_the_limit(tmp_path):
    s = Server(tmp_path / "small.db", "--max-request-mb", "1").start()
    try:
        k = s.key("k")
        r = post(s, k, "/v1/query", query_body(pixels=torch.rand(100, 3, 32, 32)))  # 1.2 MB
        assert r.status_code == 413 and err(r)["code"] == "request_too_large"
    finally:
        s.stop()


def test_budgets_429_with_counts_and_refused_queries_cost_nothing(server):
    k = server.key("small", "api_calls=3")
    body = query_body(ctx=torch.zeros(2, 4, 128))  # 2 candidates on 2 images: 2 api_calls
    assert post(server, k, "/v1/query", body).status_code == 200
    r = post(server, k, "/v1/query", body)
    assert r.status_code == 429
    e = err(r)
    assert e["code"] == "budget_exhausted" and e["used"]["api_calls"] == 2 and e["cost"]["api_calls"] == 2
    assert "budget exhausted" in e["message"] and "api_calls=3" in e["message"]
    assert post(server, k, "/v1/query", query_body(pixels=torch.rand(2, 3, 8, 8))).status_code == 422
    u = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()
    assert u["total"]["api_calls"] == 2 and u["total"]["requests"] == 1 and u["remaining"]["api_calls"] == 1
    box = RemoteBlackBox(server.url, k, NAMES)  # the client maps 429 to BudgetExhausted
    from bbpt.errors import BudgetExhausted

    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        box.query(SoftPrompt(torch.zeros(2, 4, 128)), Images(torch.rand(2, 3, 32, 32)))
    assert box.meter.counts["api_calls"] == 0  # refused: the run's meter is not charged either


def test_idempotency_key_replays_without_a_second_charge(server):
    k = server.key("idem")
    body, other = query_body(ctx=torch.randn(3, 4, 128) * 0.02), query_body()
    r1 = post(server, k, "/v1/query", body, **{"Idempotency-Key": "abc"})
    r2 = post(server, k, "/v1/query", body, **{"Idempotency-Key": "abc"})
    assert r1.status_code == r2.status_code == 200 and r1.content == r2.content
    assert r2.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in r1.headers
    u = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()
    assert u["total"]["requests"] == 1 and u["total"]["api_calls"] == 3
    r3 = post(server, k, "/v1/query", other, **{"Idempotency-Key": "abc"})
    assert r3.status_code == 409 and err(r3)["code"] == "idempotency_mismatch"


def test_concurrent_retries_of_one_idempotency_key_do_the_work_once(server):
    """Eight identical requests at once under one Idempotency-Key: one computes and is
    charged; the others are told it is in progress (409) or get its stored reply."""
    from concurrent.futures import ThreadPoolExecutor

    k = server.key("idem-race")
    body = query_body(ctx=torch.randn(4, 4, 128) * 0.02, pixels=torch.rand(64, 3, 32, 32))
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: post(server, k, "/v1/query", body, **{"Idempotency-Key": "race"}), range(8)))
    computed = [r for r in rs if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    assert len(computed) == 1, [r.status_code for r in rs]
    assert all(r.status_code == 409 and err(r)["code"] == "idempotency_in_progress" or
               (r.status_code == 200 and r.content == computed[0].content) for r in rs)
    u = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()
    assert u["total"]["requests"] == 1 and u["total"]["api_calls"] == 4


def test_uploads_png_and_raw_give_ids_and_cached_features(server, key, tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    buf = tmp_path / "a.png"
    Image.fromarray(img).save(buf)
    r = post(server, key, "/v1/images", buf.read_bytes(), ctype="image/png")
    assert r.status_code == 200 and r.json()["ids"][0].startswith("img-")
    px = torch.rand(3, 3, 32, 32)
    ids = post(server, key, "/v1/images", pack({}, {"pixels": px})).json()["ids"]
    again = post(server, key, "/v1/images", pack({}, {"pixels": px})).json()
    assert again["ids"] == ids and again["encoded"] == 0  # content-hash ids: the same pixels, the same ids
    by_id = post(server, key, "/v1/query", pack({"prompt": {"type": "text", "templates": ["a {}."]}, "classes": NAMES,
                                                 "images": ids}))
    inline = post(server, key, "/v1/query", pack({"prompt": {"type": "text", "templates": ["a {}."]}, "classes": NAMES},
                                                 {"pixels": px}))
    a, b = unpack(by_id.content)[1]["logits"], unpack(inline.content)[1]["logits"]
    assert torch.allclose(a, b, atol=1e-5)
    r = post(server, key, "/v1/images", b"not a png", ctype="image/png")
    assert r.status_code == 422 and err(r)["code"] == "invalid_image"


def test_remote_box_matches_the_in_process_box(server, key):
    local = BlackBox(create_backbone("mini"), NAMES)
    remote = RemoteBlackBox(server.url, key, NAMES)
    assert isinstance(local, BlackBoxAPI) and isinstance(remote, BlackBoxAPI)
    metadata = [n for n, v in vars(BlackBoxAPI).items() if isinstance(v, property) and n not in ("encode_chunk", "capabilities")]
    metadata += ["classnames"]  # encode_chunk: a sizing hint, each implementation's own; capabilities: each transport's own
    assert len(metadata) >= 10
    for name in metadata:  # the protocol's public metadata, equal on both
        assert getattr(remote, name) == getattr(local, name), name
    assert torch.equal(remote.embed_words("a photo of a"), local.embed_words("a photo of a"))
    px = torch.rand(4, 3, 32, 32)
    assert torch.allclose(remote.embed_patches(Images(px)), local.embed_patches(Images(px)), atol=1e-6)
    ctx = local.embed_words("a photo of a")[None] + 0.01 * torch.randn(2, 4, local.ctx_dim)
    keys = [f"k{i}" for i in range(4)]
    remote.upload(Images(px, keys))
    local.upload(Images(px, keys))
    for prompt in (SoftPrompt(ctx), TextPrompt(("a photo of a {}.",))):
        for images in (Images(px, keys), Images(px)):
            assert torch.equal(remote.query(prompt, images), local.query(prompt, images))
    assert remote.meter.counts == local.meter.counts


# ---- every method, unchanged, through the API ----------------------------------------------------
SHIPPED = shipped()
SMALL = {"intrinsic_dim": 16, "dim_text": 16, "dim_visual": 16, "popsize": 4, "epochs": 3, "n_perturb": 2, "q": 2,
         "change_point": 2, "sample_size": 4}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_method_runs_unchanged_against_the_server(name, server, tmp_path, monkeypatch):
    fields = METHODS.get(name).Config.model_fields
    opts = {k: v for k, v in SMALL.items() if k in fields}
    kw = dict(method=name, dataset="shapes", shots=1, seed=5, max_steps=4, test_subset=200, options=opts)
    k = server.key(f"m-{name}")
    monkeypatch.setenv("BBPT_API_KEY", k)
    if not METHODS.get(name).black_box:
        with pytest.raises(Exception, match=r"lacks model \(the model itself \(white-box\)\)"):
            run(make_run_config(**kw, remote=server.url), out=tmp_path / "r", progress=False)
        return
    from bbpt import boxes

    if METHODS.get(name).needs.missing(boxes.capabilities(server.url)):  # embeddings out: the openai transport's
        with pytest.raises(Exception, match=r"lacks embeddings out \(it returns logits\)"):
            run(make_run_config(**kw, remote=server.url), out=tmp_path / "r", progress=False)
        return
    here = run(make_run_config(**kw), out=tmp_path / "l", progress=False)
    there = run(make_run_config(**kw, remote=server.url), out=tmp_path / "r", progress=False)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "l" / "prompt.safetensors"), load_file(tmp_path / "r" / "prompt.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[t].float(), b[t].float(), atol=1e-5) for t in a)
    assert there.accuracy == here.accuracy and there.curve == here.curve
    assert there.queries == here.queries and there.eval_queries == here.eval_queries
    used = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]
    meters = {"train": there.queries, "eval": there.eval_queries, "side": there.aux_queries}
    for purpose, counts in meters.items():  # the server's counts equal the run's meters
        if counts is not None and any(counts.values()):
            assert {u: used[purpose][u] for u in counts} == counts, purpose


def test_bbpt_run_remote_from_the_command_line(server, tmp_path):
    k = server.key("cli")
    env = {**os.environ, "BBPT_API_KEY": k}
    args = ["run", "--method", "zip", "--dataset", "shapes", "--shots", "2", "--budget", "200", "--test-subset", "200"]
    p = subprocess.run([*BBPT, *args, "--remote", server.url, "--out", str(tmp_path / "r"), "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    q = subprocess.run([*BBPT, *args, "--out", str(tmp_path / "l"), "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert q.returncode == 0, q.stderr
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("r", "l"))
    assert a["accuracy"] == b["accuracy"] and a["queries"] == b["queries"] == {
        "api_calls": 200, "prompt_evals": 200, "images_forwarded": 4000}
    p = subprocess.run([*BBPT, *args, "--remote", server.url, "--out", str(tmp_path / "x")],
                       env={**os.environ, "BBPT_API_KEY": "bbpt-00000000-wrong"}, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: the server at ") and "refused the API key" in p.stderr


# ---- robustness: malformed requests, concurrency, kill -9 -----------------------------------------
def test_fuzz_500_malformed_requests_get_4xx_and_the_server_keeps_answering(server, key):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    metas = st.dictionaries(st.sampled_from(["prompt", "classes", "class_set", "images", "purpose", "x"]),
                            st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=20),
                                         lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=3), max_leaves=8))
    shapes = st.lists(st.integers(0, 40), min_size=0, max_size=5)
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int64, torch.bool, torch.float64])
    tensors = st.dictionaries(st.sampled_from(["ctx", "pixels", "visual", "other"]),
                              st.tuples(shapes, dtypes, st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -3.0])),
                              max_size=3)
    raw = st.binary(max_size=64)
    paths = st.sampled_from(["/v1/query", "/v1/images", "/v1/embed_patches", "/v1/embed_words", "/v1/class_sets"])
    ctypes = st.sampled_from([CONTENT_TYPE, "application/json", "image/png", "text/plain", ""])
    auths = st.sampled_from([f"Bearer {key}"] * 6 + ["", "Bearer", "Basic abc", f"Bearer {key}x", "Bearer bbpt-1-2"])
    seen = []
    client = httpx.Client(base_url=server.url, timeout=60)

    def make(meta, ts):
        t = {}
        for name, (shape, dtype, fill) in ts.items():
            if np.prod(shape, dtype=np.int64) > 200_000:
                shape = shape[:2]
            x = torch.full(shape, fill) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
            t[name] = x
        return pack(meta, t)

    @settings(max_examples=520, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(path=paths, ctype=ctypes, auth=auths, meta=metas, ts=tensors, junk=raw, use_junk=st.booleans())
    def fuzz(path, ctype, auth, meta, ts, junk, use_junk):
        body = junk if use_junk else (json.dumps(meta).encode() if ctype == "application/json" else make(meta, ts))
        r = client.post(path, content=body, headers={"Content-Type": ctype, "Authorization": auth})
        seen.append(r.status_code)
        assert 400 <= r.status_code < 500 or r.status_code == 200, (r.status_code, r.text[:300])
        if r.status_code >= 400:
            e = r.json()["error"]
            assert set(e) >= {"message", "type", "code", "param"}

    fuzz()
    assert len(seen) >= 500 and sum(400 <= s < 500 for s in seen) >= 450
    r = post(server, key, "/v1/query", query_body())
    assert r.status_code == 200  # still answering


def test_32_clients_kill_9_and_restart_lose_and_double_count_nothing(tmp_path):
    """32 concurrent clients for a bounded time; the server is killed with SIGKILL mid-load and
    restarted on the same database; every client retries its in-flight query under the same
    Idempotency-Key. Then the stored counts equal the charges the clients saw acknowledged."""
    s = Server(tmp_path / "kill.db").start()
    k = s.key("load")
    acked: dict[str, int] = {}  # idempotency key -> api_calls acknowledged
    lock, stop = threading.Lock(), threading.Event()
    errors = []

    def client(i):
        c = httpx.Client(base_url=s.url, timeout=30, headers={"Authorization": f"Bearer {k}",
                                                               "Content-Type": CONTENT_TYPE})
        g = torch.Generator().manual_seed(i)
        sent = 0
        while not stop.is_set() and sent < 200:
            P = 1 + i % 4
            body = pack({"prompt": {"type": "soft"}, "classes": NAMES},
                        {"ctx": torch.randn(P, 4, 128, generator=g) * 0.02, "pixels": torch.rand(3, 3, 32, 32, generator=g)})
            idem, t_end = uuid.uuid4().hex, time.time() + 120
            while time.time() < t_end:  # bounded retries of one logical query
                try:
                    r = c.post("/v1/query", content=body, headers={"Idempotency-Key": idem})
                except httpx.TransportError:
                    time.sleep(0.1)
                    continue
                if r.status_code == 200:
                    with lock:
                        acked[idem] = unpack(r.content)[0]["charged"]["api_calls"]
                    break
                if r.status_code in (409, 502, 503, 504):
                    time.sleep(0.05)
                    continue
                errors.append((r.status_code, r.text[:200]))
                break
            sent += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(4)
    s.proc.kill()  # SIGKILL mid-load
    s.proc.wait(timeout=20)
    time.sleep(1)
    s.start()  # the same port and database
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    used = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["total"]
    s.stop()
    assert len(acked) > 32  # load before and after the kill
    assert used["requests"] == len(acked) and used["api_calls"] == sum(acked.values())


def test_ray_serve_replicas_answer_as_one_server_and_share_budgets(tmp_path, monkeypatch):
    """`bbpt serve --ray --replicas 2` on a local Ray instance that the server starts: requests
    reach both replicas; a ZIP run through it equals the in-process run; one key's budget
    holds across replicas; an idempotent retry is charged once whichever replica answers;
    SIGTERM stops Serve, the replicas and Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    s = Server(tmp_path / "ray.db", "--ray", "--replicas", "2").start(timeout=240)
    try:
        pids = set()
        for _ in range(100):  # bounded: the proxy spreads requests over the replicas
            pids.add(httpx.get(s.url + "/v1/health", timeout=10).json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2

        k = s.key("ray-run")
        monkeypatch.setenv("BBPT_API_KEY", k)
        kw = dict(method="zip", dataset="shapes", shots=1, seed=5, max_steps=4, test_subset=200)
        here = run(make_run_config(**kw), out=tmp_path / "l", progress=False)
        there = run(make_run_config(**kw, remote=s.url), out=tmp_path / "r", progress=False)
        assert there.accuracy == here.accuracy and there.queries == here.queries
        used = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]
        assert {u: used["train"][u] for u in here.queries} == here.queries

        kb = s.key("ray-budget", "api_calls=40")
        body = query_body()  # one candidate, 2 images: 1 api_call
        idem = uuid.uuid4().hex
        replies = [post(s, kb, "/v1/query", body, **{"Idempotency-Key": idem}) for _ in range(6)]
        assert all(r.status_code == 200 for r in replies)
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 5
        codes, lock = [], threading.Lock()

        def client(i):
            g = torch.Generator().manual_seed(100 + i)
            for _ in range(20):  # bounded: 8 x 20 attempts at a budget of 40
                b = pack({"prompt": {"type": "soft"}, "classes": NAMES},
                         {"ctx": torch.randn(1, 4, 128, generator=g) * 0.02, "pixels": torch.rand(2, 3, 32, 32, generator=g)})
                r = post(s, kb, "/v1/query", b)
                with lock:
                    codes.append(r.status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        assert set(codes) == {200, 429} and codes.count(200) == 39  # 1 + 39 = the budget, exactly
        total = httpx.get(s.url + "/v1/usage", headers={"Authorization": f"Bearer {kb}"}).json()["total"]
        assert total["api_calls"] == 40 and total["requests"] == 40
    finally:
        s.stop()
    assert s.proc.returncode == 0
    t_end = time.time() + 60
    while time.time() < t_end and any(_alive(p) for p in pids):
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- limits, quotas, bounded memory, the event loop kept free (issue 25) -----------------------------
SPY = r"""
import json, sys
from bbpt.serve import app

log, make = open(sys.argv[3], "a", buffering=1), app.create_backbone


def spied(*a, **k):  # every tokenising and encoding call of the server's model: one line in the log
    bb = make(*a, **k)
    for obj, names in ((bb, ("tokenize", "encode_images", "patch_tokens", "encode_tokens")), (bb.text, ("embed", "encode"))):
        for name in names:
            setattr(obj, name, lambda *a, _f=getattr(obj, name), _n=name, **k: (log.write(_n + "\n"), _f(*a, **k))[1])
    return bb


app.create_backbone = spied
app.serve_forever(app.ServeConfig(**json.loads(sys.argv[1])), port=int(sys.argv[2]))
"""


class SpyServer(Server):
    """A server of a given ServeConfig, its model's tokenising and encoding calls logged to a file:
    `python -c SPY` on 127.0.0.1 and a free port, stopped by the test."""

    def __init__(self, tmp, **cfg):
        super().__init__(tmp / "spy.db")
        self.cfg, self.log = {"db": self.db, **cfg}, tmp / "calls.log"

    def start(self, timeout=90.0):
        self.proc = subprocess.Popen([sys.executable, "-c", SPY, json.dumps(self.cfg), str(self.port), str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.time() + timeout
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def calls(self) -> list[str]:
        return self.log.read_text().split()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture
def spy(tmp_path):
    servers = []

    def start(**cfg):
        servers.append(SpyServer(tmp_path, **cfg).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def templates(n, tag=""):
    return [f"a {tag}{i} photo of a {{}}." for i in range(n)]


def test_refused_requests_tokenise_and_encode_nothing_and_memory_stays_flat(spy):
    s = spy()
    k = s.key("poor", "api_calls=1")
    classes = [f"class {i}" for i in range(10)]
    before = s.calls()
    for i in range(2):  # warm-up: the pool's threads, the first parse
        assert post(s, k, "/v1/query", query_body(classes=classes, prompt={"type": "text", "templates": templates(300, i)})
                    ).status_code == 429
    rss0 = s.rss_mb()
    for i in range(5):  # 300 templates x 10 classes, 300 api_calls each: refused by the budget, nothing tokenised
        r = post(s, k, "/v1/query", query_body(classes=classes, prompt={"type": "text", "templates": templates(300, 10 + i)}))
        assert r.status_code == 429 and err(r)["code"] == "budget_exhausted" and err(r)["cost"]["api_calls"] == 300
    grown = s.rss_mb() - rss0
    assert s.calls() == before, s.calls()[len(before):][:5]  # no tokenize, embed, encode of any kind
    assert grown < 50, f"the server grew {grown:.0f} MB on refused requests"
    r = post(s, k, "/v1/query", query_body(classes=classes * 200, prompt={"type": "text", "templates": templates(9)}))
    assert r.status_code == 413 and err(r)["limit"] == "max_query_rows"  # 9 x 2000 = 18000 sequences
    r = post(s, k + "x", "/v1/query", query_body(classes=classes, prompt={"type": "text", "templates": templates(300)}))
    assert r.status_code == 401
    r = post(s, k, "/v1/query", query_body(classes=classes, pixels=torch.full((2, 3, 32, 32), 2.0),
                                           prompt={"type": "text", "templates": templates(300)}))
    assert r.status_code == 422 and "outside [0, 1]" in err(r)["message"]
    grown = s.rss_mb() - rss0
    assert s.calls() == before, s.calls()[len(before):][:5]  # no tokenize, embed, encode of any kind
    assert grown < 50, f"the server grew {grown:.0f} MB on refused requests"
    r = post(s, k, "/v1/query", query_body(classes=classes))  # the one api_call: tokenised and encoded now
    assert r.status_code == 200 and {"tokenize", "encode_images", "encode"} <= set(s.calls()[len(before):])


def test_client_input_over_the_limits_gets_413_or_422_never_500(spy):
    s = spy()
    k = s.key("big")
    h = {"Authorization": f"Bearer {k}"}
    lim = httpx.get(s.url + "/v1/model", headers=h).json()["limits"]
    assert lim == {"max_classes": 4096, "max_query_rows": 16384, "max_query_images": 4096, "max_query_logits": 1 << 24,
                   "max_visual_tokens": 17, "max_text_chars": 1000}
    many = [f"class {i}" for i in range(100_000)]
    r = httpx.post(s.url + "/v1/class_sets", json={"names": many}, headers=h, timeout=60)
    assert r.status_code == 413 and err(r)["code"] == "limit_exceeded" and err(r)["param"] == "classes"
    assert err(r)["message"] == ("100000 classes, over the server's limit of 4096 (max_classes); send at most 4096 per "
                                 "query or class set, e.g. split the classes over several queries")
    assert (err(r)["limit"], err(r)["max"], err(r)["requested"]) == ("max_classes", 4096, 100_000)
    cases = [  # (body, status, limit or words in the message)
        (pack({"prompt": {"type": "soft"}, "classes": NAMES},
              {"ctx": torch.zeros(1, 4, 128), "pixels": torch.rand(1, 3, 32, 32), "visual": torch.zeros(1, 30000, 128)}),
         413, "max_visual_tokens"),
        (query_body(classes=[f"c{i}" for i in range(5000)]), 413, "max_classes"),
        (query_body(classes=["x" * 1001]), 413, "max_text_chars"),
        (query_body(prompt={"type": "text", "templates": ["a {}" + "!" * 1000]}), 413, "max_text_chars"),
        (pack({"prompt": {"type": "text", "templates": ["a {}."]}, "classes": NAMES,
               "images": [f"img-{i}" for i in range(5000)]}), 413, "max_query_images"),
        (pack({"prompt": {"type": "text", "templates": templates(16)}, "classes": [f"c{i}" for i in range(1000)],
               "images": [f"img-{i}" for i in range(2000)]}), 413, "max_query_logits"),
        (pack({"prompt": {"type": "soft"}, "classes": NAMES},
              {"ctx": torch.zeros(300, 4, 128), "pixels": torch.rand(20, 3, 32, 32), "visual": torch.zeros(300, 2, 128)}),
         413, "max_query_images"),  # 300 candidates x 20 images re-encoded
        (query_body(ctx=torch.zeros(1, 500, 128)), 422, "more than the model's whole context of 77"),
    ]
    for body, status, what in cases:
        r = post(s, k, "/v1/query", body)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        e = err(r)
        assert what in (e.get("limit") or e["message"]) and "\n" not in e["message"], (what, e)
        if status == 413:
            assert e["code"] == "limit_exceeded" and e["requested"] > e["max"] and e["limit"] in e["message"]
            assert "send" in e["message"] or "shorten" in e["message"]  # the fix
    r = httpx.post(s.url + "/v1/embed_words", json={"text": "a " * 1000}, headers=h)
    assert r.status_code == 413 and err(r)["limit"] == "max_text_chars"
    assert post(s, k, "/v1/query", query_body()).status_code == 200 and s.proc.poll() is None


def test_health_answers_while_a_big_query_runs(spy):
    s = spy()
    k = s.key("big")
    body = query_body(classes=[f"class number {i}" for i in range(1000)],
                      prompt={"type": "text", "templates": templates(16)})  # 16000 sequences: allowed, seconds of work
    done, replies = threading.Event(), []

    def big():
        replies.append(post(s, k, "/v1/query", body))
        done.set()

    t = threading.Thread(target=big)
    t.start()
    lat, t_end = [], time.time() + 120
    with httpx.Client(base_url=s.url, timeout=30) as c:
        while not done.is_set() and time.time() < t_end:  # bounded by the query and by time
            t0 = time.perf_counter()
            assert c.get("/v1/health").status_code == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
    t.join(timeout=120)
    assert replies and replies[0].status_code == 200 and unpack(replies[0].content)[1]["logits"].shape == (16, 2, 1000)
    assert len(lat) >= 20  # the query ran long enough to be measured
    lat.sort()
    assert lat[-1] < 1.0 and lat[int(0.9 * len(lat))] < 0.2, f"health latency p90 {lat[int(0.9 * len(lat))]:.3f}s, max {lat[-1]:.3f}s"


def test_per_key_quotas_on_class_sets_and_images_and_deleting_a_class_set(spy):
    row = 128 * 4  # one image's features
    s = spy(max_class_sets_per_key=2, max_images_per_key=5, feature_cache_bytes=3 * row)
    k, other = s.key("q"), s.key("other")
    h = {"Authorization": f"Bearer {k}"}

    def register(names, key=k):
        return httpx.post(s.url + "/v1/class_sets", json={"names": names}, headers={"Authorization": f"Bearer {key}"})

    a, b = register(["cat", "dog"]).json()["id"], register(["cat", "fox"]).json()["id"]
    assert register(["cat", "dog"]).json()["id"] == a  # one it has already: no quota spent
    r = register(["owl", "emu"])
    assert r.status_code == 403 and err(r)["code"] == "quota_exceeded" and (err(r)["stored"], err(r)["quota"]) == (2, 2)
    assert err(r)["message"] == ("quota exceeded: this key stores 2 class sets, at most 2 (max_class_sets_per_key), and "
                                 "this request would add 1; delete one with DELETE /v1/class_sets/{id}, or send "
                                 "'classes' in the query instead")
    assert register(["owl", "emu"], other).status_code == 200  # quotas are per key
    assert httpx.delete(f"{s.url}/v1/class_sets/{b}", headers=h).json() == {"id": b, "deleted": True}
    r = httpx.delete(f"{s.url}/v1/class_sets/{b}", headers=h)
    assert r.status_code == 404 and err(r)["code"] == "unknown_class_set"
    assert register(["owl", "emu"]).status_code == 200
    r = post(s, k, "/v1/query", pack({"prompt": {"type": "text", "templates": ["a {}."]}, "class_set": b},
                                     {"pixels": torch.rand(1, 3, 32, 32)}))
    assert r.status_code == 422 and err(r)["code"] == "unknown_class_set"  # deleted, and no other key had it

    px = torch.rand(6, 3, 32, 32)
    ids = post(s, k, "/v1/images", pack({}, {"pixels": px[:3]})).json()["ids"]
    ids += post(s, k, "/v1/images", pack({}, {"pixels": px[1:5]})).json()["ids"][2:]  # 2 new: 5 in all
    r = post(s, k, "/v1/images", pack({}, {"pixels": px[4:6]}))
    assert r.status_code == 403 and err(r)["code"] == "quota_exceeded" and "max_images_per_key" in err(r)["message"]
    assert post(s, k, "/v1/images", pack({}, {"pixels": px[:5]})).json() == {"ids": ids, "encoded": 0}
    assert post(s, other, "/v1/images", pack({}, {"pixels": px[4:6]})).status_code == 200
    u = httpx.get(s.url + "/v1/usage", headers=h).json()
    assert u["stored"] == {"class_sets": 2, "images": 5} and u["quotas"]["max_images_per_key"] == 5
    text = {"prompt": {"type": "text", "templates": ["a {}."]}, "classes": NAMES}
    by_id = unpack(post(s, k, "/v1/query", pack({**text, "images": ids})).content)[1]["logits"]  # 3 in memory, all in the db
    inline = unpack(post(s, k, "/v1/query", pack(text, {"pixels": px[:5]})).content)[1]["logits"]
    assert torch.allclose(by_id, inline, atol=1e-5)


def test_the_servers_caches_are_bounded_by_bytes(tmp_path):
    from bbpt.serve.app import ServeConfig
    from bbpt.serve.app import Server as App

    app = App(ServeConfig(db=str(tmp_path / "c.db"), box_cache_bytes=100_000, text_cache_bytes=200_000,
                          feature_cache_bytes=10_000))
    try:
        imgs = Images(torch.rand(2, 3, 32, 32))
        for i in range(30):  # 30 class sets of 100 names, each queried once
            box = app.box([f"class {i}-{j}" for j in range(100)])
            box.query(TextPrompt("a photo of a {}."), imgs)
            assert app.boxes.nbytes <= 100_000 and app.texts.nbytes <= 200_000
        assert 0 < len(app.boxes) < 30 and 0 < len(app.texts) < 30
        assert (app.boxes.max_bytes, app.texts.max_bytes, app.cache._rows.max_bytes) == (100_000, 200_000, 10_000)
    finally:
        app.close()


def test_serve_options_set_the_limits_and_quotas(tmp_path):
    """Every limit is a `bbpt serve` option: published in /v1/model and enforced."""
    s = Server(tmp_path / "opts.db", "--max-classes", "3", "--max-class-sets-per-key", "1", "--max-text-chars", "40",
               "--max-query-rows", "6", "--text-cache-mb", "1", "--workers", "2").start()
    try:
        info = httpx.get(s.url + "/v1/model", timeout=30).json()
        assert info["limits"]["max_classes"] == 3 and info["limits"]["max_query_rows"] == 6
        assert info["limits"]["max_text_chars"] == 40 and info["quotas"]["max_class_sets_per_key"] == 1
        k = s.key("k")
        r = post(s, k, "/v1/class_sets", json.dumps({"names": ["a", "b", "c", "d"]}).encode(), ctype="application/json")
        assert r.status_code == 413 and err(r)["code"] == "limit_exceeded" and "max_classes" in err(r)["message"]
        ok = post(s, k, "/v1/class_sets", json.dumps({"names": ["a", "b"]}).encode(), ctype="application/json")
        assert ok.status_code == 200, ok.text
        r = post(s, k, "/v1/class_sets", json.dumps({"names": ["c", "d"]}).encode(), ctype="application/json")
        assert r.status_code == 403 and err(r)["code"] == "quota_exceeded"
        r = post(s, k, "/v1/query", query_body(classes=["a", "b", "c"], prompt={"type": "text", "templates":
                                                 ["a {}.", "the {}.", "one {}."]}))  # 3 x 3 = 9 rows > 6
        assert r.status_code == 413 and "max_query_rows" in err(r)["message"]
    finally:
        s.stop()
