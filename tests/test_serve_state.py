"""The server as a state machine (hypothesis ``RuleBasedStateMachine``): keys with and without
budgets, revocations, queries by inline pixels or uploaded ids, class lists or registered
class sets, idempotent retries and reused Idempotency-Keys, malformed queries, and restarts
(a new app on the same SQLite file). After every step:

- the stored usage of every key equals the charges the client saw acknowledged;
- no key's usage passes its budget, and /v1/usage says so (remaining >= 0);
- no response was a 5xx.

The app runs in process (FastAPI's TestClient, lifespan included) on the embedded ``mini``
model, built once and shared by every restart (its weights are frozen; what a restart must
keep lives in the database)."""
import math
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bbpt.serve import app as serve_app
from bbpt.serve.store import Store
from bbpt.serve.wire import CONTENT_TYPE, pack, unpack

MAX_IMAGES_PER_CALL = 128
CLASS_LISTS = (["circle", "square"], ["circle", "square", "triangle"], ["red", "green", "blue", "black"])
UNITS = ("requests", "api_calls", "prompt_evals", "images_forwarded")


def cost(P: int, B: int) -> dict:
    calls = math.ceil(B / MAX_IMAGES_PER_CALL)
    return {"requests": 1, "api_calls": P * calls, "prompt_evals": P, "images_forwarded": P * B}


class ServerMachine(RuleBasedStateMachine):
    keys = Bundle("keys")
    answered = Bundle("answered")  # idempotent queries that were answered: (key name, idem, body, reply)

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="bbpt-state-"))
        self.db = self.dir / "serve.db"
        self.client = None
        self.start()
        self.tokens: dict[str, str] = {}  # name -> bearer token
        self.ids: dict[str, str] = {}  # name -> key id
        self.budgets: dict[str, dict] = {}
        self.revoked: set[str] = set()
        self.acked: dict[str, dict] = {}  # name -> the charges the client saw acknowledged
        self.statuses: list[int] = []
        self.since_restart = 0  # requests the rules sent since the last (re)start
        self.uploads: list[list[str]] = []  # uploaded batches' ids
        self.class_sets: list[tuple] = []  # registered class sets: (id, names)
        self.gen = torch.Generator().manual_seed(0)

    # ---- the server's life ---------------------------------------------------------------------
    def start(self):
        self.since_restart = 0
        self.client = TestClient(serve_app.create_app(serve_app.ServeConfig(db=str(self.db))))
        self.client.__enter__()

    def stop(self):
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None

    def teardown(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, method, path, name=None, **kw):
        headers = kw.pop("headers", {})
        if name is not None:
            headers["Authorization"] = f"Bearer {self.tokens[name]}"
        r = self.client.request(method, path, headers=headers, **kw)
        self.statuses.append(r.status_code)
        self.since_restart += path != "/v1/usage"
        assert r.status_code < 500, (method, path, r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert set(r.json()["error"]) >= {"message", "type", "code", "param"}, r.text[:500]
        return r

    def pixels(self, B: int) -> torch.Tensor:
        return torch.randint(0, 256, (B, 3, 32, 32), generator=self.gen, dtype=torch.uint8)

    # ---- rules ---------------------------------------------------------------------------------
    @initialize(target=keys, api_calls=st.integers(0, 4))
    def first_keys(self, api_calls):
        """One key with a budget, one without, an upload and a class set: every run has them from
        its first step (so that a restart between an upload and its use comes early and often)."""
        names = self.add_key(api_calls, None), self.add_key(None, None)
        self.upload(names[1], 3)
        self.register_class_set(names[1], CLASS_LISTS[1])
        return multiple(*names)

    @precondition(lambda self: len(self.tokens) < 4)
    @rule(target=keys, api_calls=st.none() | st.integers(0, 8), prompt_evals=st.none() | st.integers(0, 8))
    def add_key(self, api_calls, prompt_evals):
        name = f"k{len(self.tokens)}"
        budget = {u: v for u, v in (("api_calls", api_calls), ("prompt_evals", prompt_evals)) if v is not None}
        store = Store(self.db)  # as `bbpt serve keys add` does, beside the running server
        try:
            self.tokens[name] = store.add_key(name, budget)
        finally:
            store.close()
        self.ids[name] = self.tokens[name].split("-")[1]
        self.budgets[name] = {"api_calls": api_calls, "prompt_evals": prompt_evals}
        self.acked[name] = {u: 0 for u in UNITS}
        return name

    @precondition(lambda self: not self.revoked and len(self.tokens) >= 3)  # most queries go to live keys
    @rule(name=keys)
    def revoke(self, name):
        store = Store(self.db)
        try:
            assert store.revoke(name)
        finally:
            store.close()
        self.revoked.add(name)

    @precondition(lambda self: len(self.uploads) + len(self.class_sets) < 6)
    @rule(name=keys, B=st.integers(1, 4))
    def upload(self, name, B):
        r = self.send("POST", "/v1/images", name, content=pack({}, {"pixels": self.pixels(B)}),
                      headers={"Content-Type": CONTENT_TYPE})
        if name in self.revoked:
            assert r.status_code == 401
            return
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert len(ids) == B and all(i.startswith("img-") for i in ids)
        self.uploads.append(ids)

    @precondition(lambda self: len(self.uploads) + len(self.class_sets) < 6)
    @rule(name=keys, names=st.sampled_from(CLASS_LISTS))
    def register_class_set(self, name, names):
        r = self.send("POST", "/v1/class_sets", name, json={"names": names})
        if name in self.revoked:
            assert r.status_code == 401
            return
        assert r.status_code == 200 and r.json()["num_classes"] == len(names), r.text
        self.class_sets.append((r.json()["id"], names))

    def body(self, P, images, classes):
        meta = {"prompt": {"type": "soft"}}
        tensors = {"ctx": torch.randn(P, 4, 128, generator=self.gen) * 0.02}
        if isinstance(classes, tuple):
            meta["class_set"] = classes[0]
        else:
            meta["classes"] = classes
        if isinstance(images, list):
            meta["images"] = images
        else:
            tensors["pixels"] = images
        return pack(meta, tensors)

    def query(self, name, body, P, B, idem):
        """Send a query and check the answer against the model; returns the response."""
        headers = {"Content-Type": CONTENT_TYPE, **({"Idempotency-Key": idem} if idem else {})}
        r = self.send("POST", "/v1/query", name, content=body, headers=headers)
        c = cost(P, B)
        if name in self.revoked:
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            return r
        used = self.acked[name]
        over = any(lim is not None and used[u] + c[u] > lim for u, lim in self.budgets[name].items())
        if over:
            assert r.status_code == 429, r.text
            e = r.json()["error"]
            assert e["code"] == "budget_exhausted" and e["budget"] == self.budgets[name]
            assert {u: e["used"][u] for u in UNITS} == used and e["cost"] == {u: c[u] for u in UNITS[1:]}
            return r
        assert r.status_code == 200, r.text
        meta, out = unpack(r.content)
        assert meta["charged"] == {u: c[u] for u in UNITS[1:]} and out["logits"].shape[:2] == (P, B)
        assert "idempotent-replayed" not in r.headers
        for u in UNITS:
            used[u] += c[u]
        return r

    @rule(target=answered, name=keys, P=st.integers(1, 3), B=st.sampled_from([1, 2, 3, 129]),
          classes=st.sampled_from(CLASS_LISTS), idem=st.booleans())
    def query_pixels(self, name, P, B, classes, idem):
        body, key = self.body(P, self.pixels(B), classes), uuid.uuid4().hex if idem else None
        r = self.query(name, body, P, B, key)
        return (name, key, body, r.content) if key and r.status_code == 200 else multiple()

    @rule(target=answered, name=keys, data=st.data(), P=st.integers(1, 3), idem=st.booleans())
    def query_uploaded(self, name, data, P, idem):
        """Uploaded ids and a registered class set, whoever registered them, before or after a restart."""
        ids, cs = data.draw(st.sampled_from(self.uploads)), data.draw(st.sampled_from(self.class_sets))
        body, key = self.body(P, ids, cs), uuid.uuid4().hex if idem else None
        r = self.query(name, body, P, len(ids), key)
        return (name, key, body, r.content) if key and r.status_code == 200 else multiple()

    @rule(prior=answered)
    def retry(self, prior):
        """The same Idempotency-Key and body: the stored reply, byte for byte, and no charge."""
        name, key, body, reply = prior
        r = self.send("POST", "/v1/query", name, content=body,
                      headers={"Content-Type": CONTENT_TYPE, "Idempotency-Key": key})
        if name in self.revoked:
            assert r.status_code == 401
            return
        assert r.status_code == 200 and r.content == reply and r.headers.get("idempotent-replayed") == "true"

    @rule(prior=answered, P=st.integers(1, 3))
    def reuse_key_with_another_body(self, prior, P):
        name, key, _, _ = prior
        r = self.send("POST", "/v1/query", name, content=self.body(P, self.pixels(2), CLASS_LISTS[0]),
                      headers={"Content-Type": CONTENT_TYPE, "Idempotency-Key": key})
        if name in self.revoked:
            assert r.status_code == 401
            return
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_mismatch"

    @rule(name=keys, what=st.sampled_from(["unknown class set", "never uploaded", "bad shape", "not safetensors"]))
    def malformed_query(self, name, what):
        """Refused with a 4xx and charged nothing."""
        body = {"unknown class set": lambda: self.body(1, self.pixels(2), ("cs-" + "0" * 16, None)),
                "never uploaded": lambda: self.body(1, ["img-" + "0" * 24], CLASS_LISTS[0]),
                "bad shape": lambda: pack({"prompt": {"type": "soft"}, "classes": CLASS_LISTS[0]},
                                          {"ctx": torch.zeros(1, 4, 7), "pixels": self.pixels(2)}),
                "not safetensors": lambda: b"\x00" * 16}[what]()
        r = self.send("POST", "/v1/query", name, content=body, headers={"Content-Type": CONTENT_TYPE})
        assert r.status_code == (401 if name in self.revoked else 422), (what, r.text)

    @precondition(lambda self: self.since_restart >= 2)  # or restarts, always enabled, crowd out the rest
    @rule()
    def restart(self):
        """A new app and Server on the same database file."""
        self.stop()
        self.start()

    # ---- invariants ----------------------------------------------------------------------------
    @invariant()
    def stored_usage_is_the_acknowledged_charges_and_within_budget(self):
        if self.client is None:
            return
        store = self.client.app.state.bbpt["server"].store
        for name, kid in self.ids.items():
            total = store.usage(kid)["total"]
            assert total == self.acked[name], (name, total, self.acked[name])
            for u, lim in self.budgets[name].items():
                assert lim is None or total[u] <= lim, (name, u, total[u], lim)
            if name not in self.revoked:
                u = self.send("GET", "/v1/usage", name).json()
                assert u["total"] == total and u["budget"] == self.budgets[name]
                assert all(v is None or v >= 0 for v in u["remaining"].values())

    @invariant()
    def no_5xx(self):
        assert all(s < 500 for s in self.statuses)


def test_server_state_machine(mini, monkeypatch):
    """Keys, budgets, idempotent retries, uploads, class sets and restarts, in any order."""
    monkeypatch.setattr(serve_app, "create_backbone", lambda *a, **k: mini)  # built once, shared by restarts
    run_state_machine_as_test(ServerMachine, settings=settings(
        max_examples=30, stateful_step_count=15, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
