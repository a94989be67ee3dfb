"""BDPL against the official training loop, step for step (tests/parity/bdpl.json, written by
tools/parity/bdpl.py from ``run_glue_discrete_LM.py`` of shizhediao/Black-Box-Prompt-Learning
run on a toy masked LM): the draws from the seed, the clipped variance-reduced gradient, AdamW
and the bisection projection, given the official losses; the official zero-probability NaN and
bbpt's floor against it; the API limit inside a step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load

import bbpt.methods.bdpl as bdpl
from bbpt.errors import BudgetExhausted
from bbpt.methods.bdpl import CategoricalPolicy, project_rows

# Probabilities after AdamW: bit for bit on the CPU that wrote the fixture (Intel); on others
# (AMD EPYC) torch's vectorised AdamW rounds one step differently: 1 float32 ulp at 0.14
# (1.49e-8), and the next gradients follow by as much. Draws stay exact; probabilities and
# gradients are held to a few ulps at their scale (probabilities ≤ 0.2, gradients ≤ 2).
ULP = 6e-8
GRAD_ULP = 5e-7


@pytest.fixture(scope="module")
def fx():
    return load("bdpl")


def policy(fx: dict, lr: float | None = None, p_min: float = 0.0) -> CategoricalPolicy:
    i = fx["inputs"]
    return CategoricalPolicy(i["prompt_length"], i["search_space"], lr=lr if lr is not None else i["lr"],
                             weight_decay=i["weight_decay"], max_norm=i["max_norm"], p_min=p_min, seed=i["seed"])


@pytest.mark.parametrize("p_min", [0.0, 1e-6])
def test_the_policy_follows_the_official_loop_step_for_step(fx, p_min):
    """Six steps: the Categorical draws (bbpt's generator from the seed is the
    official global stream) exactly, the clipped gradient and the probabilities after the
    projection within a few float32 ulps (ULP).
    The default floor (1e-6) is never reached here, so it changes nothing."""
    pol = policy(fx, p_min=p_min)
    close(pol.probs, fx["inputs"]["probs0"], rtol=0, atol=0, what="initial probabilities")
    P = fx["inputs"]["sample_size"]
    for k, off in enumerate(fx["trajectory"]):
        idx = pol.sample(P)  # (P, L)
        assert torch.equal(idx, torch.from_numpy(off["indices"])), f"step {k} draws"
        pol.update(idx, off["losses"].tolist())
        close(pol.probs.grad, off["grad"], rtol=0, atol=GRAD_ULP, what=f"step {k} clipped gradient")
        close(pol.probs, off["probs"], rtol=0, atol=ULP, what=f"step {k} probabilities")


def test_the_projection_is_the_official_bisection(fx):
    """bbpt's project_rows on the official probabilities after AdamW gives the official
    projected ones. The bisection searches v in [0, max p]: it only removes mass, so a row sums
    to at most 1 + 1e-3, and a row AdamW left below 1 stays below (Categorical renormalises)."""
    for name, traj in [("main", fx["trajectory"]), ("zero", fx["runs"]["zero"]["trajectory"][:1])]:
        for k, off in enumerate(traj):
            p = torch.from_numpy(off["after_adam"]).clone()
            project_rows(p)
            close(p, off["probs"], rtol=0, atol=0, what=f"{name} step {k} projection")
            assert p.sum(1).max() < 1 + 1e-3


def test_the_official_zero_probability_turns_nan_and_the_floor_prevents_it(fx):
    """At a large learning rate the official projection leaves probabilities at exactly 0; the
    next step's -1/p is -inf and every probability NaN (then Categorical refuses them: the
    users' issues 3 and 4). bbpt without its floor does the same; with it, it stays finite."""
    run = fx["runs"]["zero"]
    P = fx["inputs"]["sample_size"]
    first, second = run["trajectory"]
    assert (first["probs"] == 0).any() and np.isnan(second["probs"]).all() and "Simplex" in run["error"]

    raw = policy(fx, lr=run["lr"], p_min=0.0)
    for k, off in enumerate(run["trajectory"]):
        idx = raw.sample(P)
        assert torch.equal(idx, torch.from_numpy(off["indices"])), f"step {k} draws"
        raw.update(idx, off["losses"].tolist())
        np.testing.assert_array_equal(raw.probs.detach().numpy(), off["probs"], err_msg=f"step {k} (NaN included)")

    floored = policy(fx, lr=run["lr"], p_min=1e-6)
    idx = floored.sample(P)
    floored.update(idx, first["losses"].tolist())
    close(floored.probs, first["probs"], rtol=0, atol=1e-6, what="step 0, floored at 1e-6")
    assert float(floored.probs.detach().min()) == pytest.approx(1e-6)
    for losses in (second["losses"], first["losses"], second["losses"]):
        floored.update(floored.sample(P), losses.tolist())
        assert torch.isfinite(floored.probs).all() and floored.probs.min() >= 1e-6


def test_the_method_sends_the_drawn_words_and_updates_as_the_official_loop(fx, mini, monkeypatch):
    """bbpt's BDPL on the mini box, seeded as the fixture: each step one query of P templates
    'w_j1 .. w_jL {}.' from the official draws (P api_calls), and, given the official losses,
    the official probabilities; the prompt is the argmax word at each position."""
    from test_methods import build

    i = fx["inputs"]
    m, box, _ = build("bdpl", mini, shots=1, seed=i["seed"], prompt_length=i["prompt_length"],
                      search_space=i["search_space"], sample_size=i["sample_size"], lr=i["lr"])
    sent, losses = [], iter(fx["trajectory"])
    query = m.box.query
    monkeypatch.setattr(m.box, "query", lambda prompt, images, visual=None: sent.append(prompt.templates)
                        or query(prompt, images, visual))
    monkeypatch.setattr(bdpl, "ce_per_candidate", lambda logits, y: torch.from_numpy(next(losses)["losses"]))
    for k, off in enumerate(fx["trajectory"]):
        stats = m.step()
        assert sent[k] == tuple(" ".join(m.words[j] for j in row) + " {}." for row in off["indices"].tolist())
        close(m.policy.probs, off["probs"], rtol=0, atol=ULP, what=f"step {k} probabilities")
        assert stats["train_loss"] == pytest.approx(float(np.mean(off["losses"])))
        assert box.meter.counts["api_calls"] == (k + 1) * i["sample_size"]
    best = fx["trajectory"][-1]["probs"].argmax(1)
    assert m.prompt().templates == (" ".join(m.words[j] for j in best) + " {}.",)


def test_a_step_past_the_budget_is_refused_whole_where_the_official_spends_it(fx, mini, monkeypatch):
    """The official API limit (12 calls, 5 a step) raises inside the third step's draws: 12 calls
    spent, 2 updates. bbpt refuses the third step's query whole: 10 calls, the same 2 updates."""
    from test_methods import build

    run, i = fx["runs"]["limit"], fx["inputs"]
    m, box, _ = build("bdpl", mini, shots=1, seed=i["seed"], prompt_length=i["prompt_length"],
                      search_space=i["search_space"], sample_size=i["sample_size"], lr=run["lr"],
                      budget=run["api_limit"])
    losses = iter(run["trajectory"])
    monkeypatch.setattr(bdpl, "ce_per_candidate", lambda logits, y: torch.from_numpy(next(losses)["losses"]))
    m.step()
    m.step()
    with pytest.raises(BudgetExhausted):
        m.step()
    close(m.policy.probs, run["trajectory"][-1]["probs"], rtol=0, atol=ULP, what="after the last update")
    assert run["api_calls"] == 12 and box.meter.counts["api_calls"] == 10
