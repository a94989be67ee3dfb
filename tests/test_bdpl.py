"""BDPL (bbpt.methods.bdpl): vocabularies, exact query counts, the policy gradient lowering the
loss on a real offline task, and a run end to end through the Hugging Face zero-shot protocol
against a `bbpt serve` subprocess (text prompts in, probabilities out)."""
from __future__ import annotations

import httpx
import pytest
import torch

from test_methods import build

from bbpt import boxes
from bbpt.engine import evaluate, make_run_config, run
from bbpt.errors import BadInput, BudgetExhausted
from bbpt.methods import METHODS, make_config
from bbpt.methods.bdpl import WORDS, CategoricalPolicy, vocabulary
from bbpt.models import create_backbone
from bbpt.models import QueryMeter
from bbpt.results import load_prompt

SMALL = {"prompt_length": 3, "search_space": 12, "sample_size": 4}


def test_defaults_are_the_official_script_and_zips_budget():
    cfg = make_config(METHODS.get("bdpl"), {})
    assert (cfg.prompt_length, cfg.search_space, cfg.sample_size, cfg.lr, cfg.weight_decay, cfg.max_norm,
            cfg.batch_size) == (10, 200, 20, 1e-4, 0.1, 3.0, 128)
    assert cfg.budget == 5000 and METHODS.get("bdpl").budget_unit == "api_calls"
    src = METHODS.get("bdpl").Config.source
    assert src("lr").startswith("official") and src("budget").startswith("bbpt") and src("p_min").startswith("bbpt")


def test_the_bundled_words_are_one_clip_token_each(mini):
    """1000 words, most frequent in CLIP's training text first; each is one token of CLIP's
    tokenizer, so a sampled word is a sampled token, as in the official code."""
    words = vocabulary("clip-frequent", {})
    assert len(words) == 1000 and len(set(words)) == 1000 and words[:3] == ["the", "and", "for"]
    ids = mini.tokenize(words[:200])  # (200, 77): <sot> word <eot>
    assert (ids[:, 3] == 0).all() and (ids[:, 2] == ids[0, 2]).all()
    assert WORDS.read_text().startswith("# BDPL's candidate words")


def test_task_and_file_vocabularies(tmp_path):
    task = {"classnames": ["red circle", "square"], "templates": ["a photo of a {}."]}
    assert vocabulary("task", task) == ["red", "circle", "square", "a", "photo", "of"]
    (tmp_path / "w.txt").write_text("# mine\nbig\n\nsmall\nodd {}\n")
    assert vocabulary(str(tmp_path / "w.txt"), task) == ["big", "small"]
    with pytest.raises(BadInput, match="neither 'clip-frequent', 'task' nor a file"):
        vocabulary(str(tmp_path / "nope.txt"), task)


def test_the_gradient_is_twice_the_score_function_estimate():
    """The official ±1/p derivative: since the centred losses sum to 0, the -1/p terms cancel
    and the estimate is 2·Σ_k (L_k − L̄)/(I−1)·e_{j_k}/p (the paper's ∇ log P), up to rounding."""
    pol = CategoricalPolicy(2, 5, lr=1e-3, weight_decay=0.0, max_norm=1e9, p_min=0.0, seed=0)
    idx = pol.sample(6)
    losses = [1.0, 2.0, 0.5, 3.0, 1.5, 2.5]
    p0 = pol.probs.detach().clone()
    pol.update(idx, losses)
    want = torch.zeros(2, 5)
    for k, row in enumerate(idx):
        want[torch.arange(2), row] += 2 * (losses[k] - sum(losses) / 6) / 5 / p0[torch.arange(2), row]
    assert torch.allclose(pol.probs.grad, want, atol=1e-5)


def test_a_run_is_metered_exactly(tmp_path):
    """sample_size api_calls a step (one query of I templates on one batch of at most 128
    images): a budget of 10 at I = 4 is 2 steps and 8 api_calls (a third step would pass it)."""
    r = run(make_run_config(method="bdpl", dataset="shapes", shots=1, seed=1, test_subset=60,
                            options={**SMALL, "budget": 10}), out=tmp_path / "r", progress=False)
    q = r.queries
    assert r.steps == 2 and q == {"api_calls": 8, "prompt_evals": 8, "images_forwarded": 8 * 10}
    assert [c.api_calls for c in r.curve] == [0, 4, 8]  # a curve point a step
    words = vocabulary("clip-frequent", {})[:12]
    (t,) = load_prompt(tmp_path / "r" / "prompt.safetensors")[0].templates
    *ws, tail = t.split(" ")
    assert tail == "{}." and len(ws) == 3 and set(ws) <= set(words)


def test_epochs_stop_the_run_and_batches_split_calls():
    """epochs=2 with 10 images in one batch: 2 steps, then finished. A batch of 200 images costs
    2 api_calls per template (ceil(200 / 128))."""
    r = run(make_run_config(method="bdpl", dataset="shapes", shots=1, seed=1, test_subset=30,
                            options={**SMALL, "epochs": 2}), progress=False)
    assert r.status == "finished" and r.steps == 2 and r.queries["api_calls"] == 8
    meter = QueryMeter()
    assert meter.cost(4, 200)["api_calls"] == 8


def test_the_policy_gradient_lowers_the_loss_on_shapes(mini):
    """40 steps on shapes (4 shots): the few-shot loss of the argmax prompt and the sampled
    prompts' mean loss both fall."""
    m, box, task = build("bdpl", mini, dataset="shapes", shots=4, seed=1, prompt_length=3, vocab="task",
                         sample_size=8, lr=0.05, budget=160)
    eval_box = box.for_classes(task.classnames, QueryMeter())
    before = evaluate(m, eval_box, m.data.set, 500, progress=False)
    losses = []
    with pytest.raises(BudgetExhausted):
        while True:
            losses.append(m.step()["train_loss"])
    after = evaluate(m, eval_box, m.data.set, 500, progress=False)
    assert len(losses) == 20 and box.meter.counts["api_calls"] == 160
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses


@pytest.mark.parametrize("kind", sorted(boxes.transports()))
def test_bdpl_fits_every_transport(kind):
    """Templates and pixels in, class scores out: probabilities (hf), logits (local, bbpt) or
    logits computed from embeddings (openai)."""
    spec = "local" if kind == "local" else f"{kind}:http://127.0.0.1:1"
    assert boxes.check_fit(METHODS.get("bdpl"), spec) is None


MINI_SCALE = float(create_backbone("mini").logit_scale)  # what a user of an embeddings API looks up (CLIP's: 100)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve import Server

    s = Server(tmp_path_factory.mktemp("serve") / "serve.db").start()
    yield s
    s.stop()


def test_bdpl_trains_through_the_hf_protocol_metered_exactly(server, tmp_path, monkeypatch):
    """BDPL against `bbpt serve`'s zero-shot-image-classification endpoint: I templates x B
    images requests a step, each a hypothesis_template 'w1 w2 w3 {}.'. bbpt's meter: I api_calls
    a step (one template on a batch); the server bills each request (one image, one template) as
    one of its api_calls: the run's billed requests equal the server's count, images too."""
    k = server.key("bdpl-hf")
    monkeypatch.setenv("HF_TOKEN", k)
    r = run(make_run_config(method="bdpl", dataset="shapes", shots=1, seed=2, test_subset=30,
                            box=f"hf:{server.url}/v1/zero-shot-image-classification", box_options={"image_size": 32},
                            options={**SMALL, "sample_size": 2, "batch_size": 4, "budget": 6}),
             out=tmp_path / "hf", progress=False)
    q = r.queries
    assert r.steps == 3 and q["api_calls"] == 6 and q["billed_requests"] == 6 * 4  # 2 templates x 4 images
    used = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]["train"]
    assert used["api_calls"] == used["images_forwarded"] == q["billed_requests"] == q["images_forwarded"]
    assert r.accuracy.test is not None and r.curve[-1].train_loss > 0


def test_bdpl_trains_through_the_openai_embeddings_protocol_metered_exactly(server, tmp_path, monkeypatch):
    """BDPL against `bbpt serve`'s OpenAI-style /embeddings: the sampled templates' class texts
    and the images are embedded there, the logits (scale x cosine) computed here. bbpt's units
    are the in-process box's (I api_calls a step), so a budget buys the same steps on every box;
    the requests and images the API counted are the run's billed_*."""
    k = server.key("bdpl-openai")
    monkeypatch.setenv("OPENAI_API_KEY", k)
    kw = dict(method="bdpl", dataset="shapes", shots=1, seed=2, test_subset=30,
              options={**SMALL, "sample_size": 2, "batch_size": 4, "budget": 6})
    here = run(make_run_config(**kw), out=tmp_path / "local", progress=False)
    r = run(make_run_config(**kw, box=f"openai:{server.url}/v1", box_options={"image_size": 32, "logit_scale": MINI_SCALE}),
            out=tmp_path / "oa", progress=False)
    q = r.queries
    assert r.steps == here.steps == 3 and {u: q[u] for u in here.queries} == here.queries \
        == {"api_calls": 6, "prompt_evals": 6, "images_forwarded": 6 * 4}  # 2 templates x 4 images a step
    used = httpx.get(server.url + "/v1/usage", headers={"Authorization": f"Bearer {k}"}).json()["purposes"]["train"]
    assert (used["api_calls"], used["images_forwarded"]) == (q["billed_requests"], q["billed_images"])
    assert q["billed_images"] == 3 * 4 and q["billed_tokens"] > 0  # each batch's 4 images once a step
    # the same embeddings and the model's own logit scale: the same trajectory as in process
    assert [round(c.train_loss, 4) for c in r.curve] == [round(c.train_loss, 4) for c in here.curve]
    assert r.accuracy.test == here.accuracy.test


def test_keep_template_puts_the_words_before_the_tasks_template(mini):
    m, _, task = build("bdpl", mini, shots=1, keep_template=True, **SMALL)
    assert m.prompt().templates == ("the the the " + task.templates[0],)
    m, _, _ = build("bdpl", mini, shots=1, **SMALL)
    assert m.prompt().templates == ("the the the {}.",)  # the argmax of uniform rows: the first word
