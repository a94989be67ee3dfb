"""Exact resume through the real protocols: BDPL through bbpt's own API, the Hugging Face
zero-shot protocol and OpenAI-style embeddings, and LFA, the linear probe and Tip-Adapter
through embeddings, each against a `bbpt serve` subprocess on 127.0.0.1.

Each run is interrupted by a real SIGINT after a step, and crashed at a random query (the
process state lost, as with kill -9); each resumes to the uninterrupted run's result.json
and prompt file, bbpt's units included. The conformance table (tests/test_resume.py) does
the same for every method in process.
"""
import os
import random
import signal

import pytest

from method_cases import METHOD_CASES
from test_resume import Crash, config, on_charge, outputs
from test_serve import Server

from bbpt.engine import RunInterrupted, run

MINI_SCALE = 81.6419906616211  # mini's logit scale: openai: logits equal the in-process ones
BOXES = {"bbpt": ("{url}", {}), "hf": ("hf:{url}/v1/zero-shot-image-classification", {"image_size": 32}),
         "openai": ("openai:{url}/v1", {"image_size": 32, "logit_scale": MINI_SCALE})}
CASES = sorted((m, b) for m, case in METHOD_CASES.items() if case.remote_resume for b in BOXES if b in case.fits)


def test_the_cases_are_every_fitting_pair():
    assert sorted(CASES) == [("bdpl", "bbpt"), ("bdpl", "hf"), ("bdpl", "openai"), ("lfa", "openai"),
                             ("linprobe", "openai"), ("tipadapter", "openai")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server that answers each query alone (--max-batch 1). Dynamic batching merges
    concurrent queries by timing, and a merged answer equals a lone one within 1e-5, not
    bit for bit on every CPU: on AMD EPYC, MKL rounds a 1-11 image forward differently from a
    larger one by an ulp. The hf protocol sends a request per image and template, concurrently,
    so a resumed run through a batching server can differ in the last bits of a loss."""
    s = Server(tmp_path_factory.mktemp("serve") / "serve.db", "--max-batch", "1").start()
    yield s
    s.stop()


def bill_free(out):
    """result.json without what the API billed. A resumed run pays the API more than the
    uninterrupted one: a crashed query's requests reached the server but were never charged
    here, and a new process embeds the class texts again (the openai box caches them for its
    lifetime). bbpt's units, the budget, are the same."""
    r, prompt = outputs(out)
    billed = {k: v for key in ("queries", "eval_queries") for k, v in r[key].items() if k.startswith("billed_")}
    for key in ("queries", "eval_queries"):
        r[key] = {k: v for k, v in r[key].items() if not k.startswith("billed_")}
    return (r, prompt), billed


def same_but_billed_more(out, ref):
    (got, got_bill), (want, want_bill) = bill_free(out), bill_free(ref)
    assert got == want
    assert got_bill.keys() == want_bill.keys() and all(got_bill[k] >= want_bill[k] for k in want_bill), (got_bill, want_bill)


@pytest.mark.parametrize("method,box", CASES)
def test_resume_through_the_box_is_exact(method, box, server, tmp_path, monkeypatch):
    url, opts = BOXES[box]
    key = tmp_path / "key"
    key.write_text(server.key(f"resume-{method}-{box}") + "\n")
    extra = {"budget": 6, "batch_size": 4, "sample_size": 2} if method == "bdpl" else {}  # 3 steps
    cfg = config(method, box=url.format(url=server.url), box_options=opts or None)
    if extra:
        cfg = cfg.model_copy(update={"options": {**cfg.options, **extra}})
    go = lambda out, **kw: run(cfg, out=tmp_path / out, progress=False, key_file=str(key), **kw)  # noqa: E731
    charges = []
    on_charge(monkeypatch, lambda: charges.append(1))
    ref = go("ref")
    on_charge(monkeypatch, None)
    assert ref.status == "finished" and ref.queries["api_calls"] > 0
    assert ref.steps == 3 if method == "bdpl" else ref.steps >= 1
    rng = random.Random(f"{method}-{box}")

    if ref.steps >= 2:  # a real SIGINT after a step
        k = rng.randint(1, ref.steps - 1)
        with pytest.raises(RunInterrupted):
            go("int", on_step=lambda steps, stats: os.kill(os.getpid(), signal.SIGINT) if steps == k else None)
        notes = []
        go("int", log=notes.append)
        assert notes and f"at step {k}" in notes[0]
        same_but_billed_more(tmp_path / "int", tmp_path / "ref")

    j = rng.randint(1, len(charges))  # a crash at a random query, then resume
    seen = []

    def crashing():
        seen.append(1)
        if len(seen) == j:
            raise Crash

    on_charge(monkeypatch, crashing)
    with pytest.raises(Crash):
        go("crash")
    on_charge(monkeypatch, None)
    go("crash", log=lambda m: None)
    same_but_billed_more(tmp_path / "crash", tmp_path / "ref")
