"""The methods on returned embeddings (linear probe, Tip-Adapter, LFA): exact query counts,
a budget too small refused before anything is spent, saved fits re-applied by `bbpt eval`,
end to end through the OpenAI embeddings protocol against `bbpt serve`, and refusal on a
probabilities-only box. Accuracy over zero-shot: test_every_method.py (METHOD_CASES)."""
from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from method_cases import METHOD_CASES, cases
from test_serve import Server

from bbpt import boxes
from bbpt.data import load_task, stratified_subset
from bbpt.engine import TEST_SUBSET_SEED, evaluate, make_run_config, run
from bbpt.evaluation import SavedPrompt
from bbpt.errors import BadInput, BudgetExhausted
from bbpt.methods import METHODS
from bbpt.methods.linprobe import COOP_C_GRID, coop_search, logistic_regression
from bbpt.models import BlackBox, QueryMeter, create_backbone
from bbpt.results import load_prompt

EMBEDDING_METHODS = cases("embeds")  # METHOD_CASES' methods on returned embeddings


def quick(method, **kw):
    options = {**METHOD_CASES[method].tiny.options, **kw.pop("options", {})}  # fast; the counts do not depend on them
    return make_run_config(**{"method": method, "dataset": "shapes", "shots": 1, "seed": 1, "test_subset": 100,
                              "eval_batch": 100, "options": options, **kw})


def expected(method, n_train=10, n_val=10, classes=10, per=128) -> dict:
    """shapes, 1 shot: 10 training and 10 val images (one request each), C = 10 texts (one template)."""
    embeds = METHOD_CASES[method].embeds
    calls = math.ceil(n_train / per) + (math.ceil(n_val / per) if embeds.val else 0)
    texts = classes if embeds.texts else 0
    return {"api_calls": calls + math.ceil(texts / per), "prompt_evals": texts,
            "images_forwarded": n_train + (n_val if embeds.val else 0)}


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_queries_are_counted_exactly_and_the_saved_fit_reproduces_the_test_accuracy(method, tmp_path):
    r = run(quick(method), out=tmp_path / "r", progress=False)
    assert r.status == "finished" and r.stopped_by == "done" and r.steps == 1
    assert r.queries == expected(method)
    # evaluation: the start point is chance and free; then the val set (10) and the test subset (100), one
    # request each, with the saved class prototypes (no text request)
    assert r.eval_queries == {"api_calls": 2, "prompt_evals": 0, "images_forwarded": 110}
    assert r.curve[0].val_accuracy == pytest.approx(0.1)  # before the fit: zeros, class 0 of 10
    # `bbpt eval --prompt`'s path: the saved fit, re-applied through a fresh box, gives the run's test accuracy
    prompt, extra, meta = load_prompt(tmp_path / "r" / "prompt.safetensors")
    task = load_task("shapes")
    box = BlackBox(create_backbone("mini"), task.classnames, QueryMeter())
    again = evaluate(SavedPrompt(METHODS.get(meta["method"]), prompt, extra), box,
                     stratified_subset(task.test, 100, TEST_SUBSET_SEED), 100, progress=False)
    assert again["accuracy"] == r.accuracy.test and box.meter.counts["prompt_evals"] == 0


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_a_budget_too_small_is_refused_before_anything_is_spent(method):
    need = expected(method)["api_calls"]
    with pytest.raises(BudgetExhausted, match=rf"needs api_calls={need} but the budget is api_calls={need - 1}"):
        run(quick(method, options={"budget": need - 1}), progress=False)
    r = run(quick(method, options={"budget": need}), progress=False)
    assert r.queries["api_calls"] == need and r.stopped_by == "done"


def test_coop_c_search_follows_linear_probe_py():
    """bbpt's search against a transcription of CoOp lpclip/linear_probe.py 53-118 (fits
    replaced by a scoring function with ties): the same C values fitted, in order, and the
    same final C."""

    def acc(c):  # a peak near C = 10^1.7, flat (tied) in steps of 0.5 decades
        return -round(abs(math.log10(c) - 1.7) * 2) / 2

    def reference(num_step=8):
        tried = []

        def score(c):
            tried.append(c)
            return acc(c)

        search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
        acc_list = [score(c) for c in search_list]
        c_peak = search_list[np.argmax(acc_list)]
        c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
        c_final = None
        for _ in range(num_step):
            acc_left, acc_right = score(c_left), score(c_right)
            if acc_left < acc_right:
                c_final = c_right
                c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
                c_right = np.log10(c_right)
            else:
                c_final = c_left
                c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
                c_left = np.log10(c_left)
            c_left, c_right = np.power(10, c_left), np.power(10, c_right)
        return c_final, tried

    want, want_tried = reference()
    tried = []
    got, model = coop_search(lambda c: (tried.append(c), c)[1], acc, steps=8)
    assert tried == pytest.approx(want_tried, rel=1e-15) and got == pytest.approx(want, rel=1e-15)
    assert model == got and tuple(want_tried[:7]) == COOP_C_GRID


def test_logistic_regression_reaches_the_regularised_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=-1)
    y = torch.arange(3).repeat(20)
    W, b = logistic_regression(x, y, 3, C=1.0, tol=1e-10)
    wb = torch.cat([W, b[:, None]], 1).requires_grad_(True)
    x64 = x.double()
    loss = torch.nn.functional.cross_entropy(x64 @ wb[:, :8].T + wb[:, 8], y, reduction="sum") / 60 + \
        (wb[:, :8] ** 2).sum() / (2 * 1.0 * 60)
    loss.backward()
    assert wb.grad.abs().max() < 1e-6  # the gradient of scikit-learn's objective vanishes


def test_they_are_refused_on_a_probabilities_only_box():
    caps = boxes.capabilities("hf:http://127.0.0.1:1")
    for name in EMBEDDING_METHODS:
        with pytest.raises(BadInput) as e:
            boxes.check_fit(METHODS.get(name), "hf:http://127.0.0.1:1")
        msg = str(e.value)
        assert "\n" not in msg and "lacks embeddings out (it returns probabilities)" in msg
    with pytest.raises(BadInput, match=r"method lfa cannot run on hf:http://127.0.0.1:1: the box lacks embeddings "
                                       r"out \(it returns probabilities\)"):
        run(quick("lfa", box="hf:http://127.0.0.1:1"), progress=False)  # refused before loading or querying
    assert not set(EMBEDDING_METHODS) & {n for n in METHODS.names() if not METHODS.get(n).needs.missing(caps)}
    openai = boxes.capabilities("openai:http://127.0.0.1:1")
    for name in EMBEDDING_METHODS:
        assert METHODS.get(name).needs.missing(openai) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "serve.db").start()
    yield s
    s.stop()


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_end_to_end_through_the_openai_embeddings_protocol(method, server, tmp_path):
    """The run against `bbpt serve`'s /v1/embeddings: metered exactly (bbpt's units equal the
    in-process run's and the server's own counts), the API's units beside, and the same
    accuracy (uint8 shapes: the PNGs carry the exact pixels)."""
    k = server.key(f"emb-{method}")
    (tmp_path / "key").write_text(k + "\n")
    here = run(quick(method), progress=False)
    there = run(quick(method, box=f"openai:{server.url}/v1", box_options={"image_size": 32}), progress=False,
                key_file=str(tmp_path / "key"))
    q = there.queries
    assert {u: q[u] for u in here.queries} == here.queries == expected(method)
    assert q["billed_images"] == q["images_forwarded"] and q["billed_requests"] >= 1
    assert ("billed_tokens" in q) == METHOD_CASES[method].embeds.texts
    used = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]
    assert {u: used["train"][u] for u in ("api_calls", "prompt_evals", "images_forwarded")} == expected(method)
    assert abs(there.accuracy.test - here.accuracy.test) <= 0.02


def test_requests_hold_at_most_128_images(monkeypatch):
    """160 few-shot images go in two requests (128 + 32): ceil(160 / 128) api_calls."""
    sizes = []
    orig = BlackBox.embed_images
    monkeypatch.setattr(BlackBox, "embed_images", lambda self, images: (sizes.append(len(images)), orig(self, images))[1])
    r = run(quick("tipadapter", shots=16, options={"search": False}), progress=False)
    assert r.queries == {"api_calls": 3, "prompt_evals": 10, "images_forwarded": 160}
    assert sizes[:2] == [128, 32]
