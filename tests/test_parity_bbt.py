"""BBT on CLIP against the official ``bbt.py`` (tests/parity/bbt.json, written by
tools/parity/bbt.py: bbt.py's options, A, CMA-ES and ask -> eval -> tell loop run on the toy
CLIP, plus deepbbt.py's best prompt): four generations of populations, fitness, means, σ, xbest
and the prompt, A's std from BBT's formula, and maxiter = budget // popsize."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load, toy_env

from bbpt.errors import BudgetExhausted
from bbpt.methods import make_config
from bbpt.methods.base import Budget
from bbpt.methods.bbt import BBT
from bbpt.methods.common import embedding_std
from bbpt.params import RandomProjection


def build(fx: dict, **options):
    """bbpt's BBT on the fixture's toy CLIP, with the official run's budget, d and std_hat."""
    args = fx["inputs"]["args"]
    box, env = toy_env(fx, BBT, seed=args["seed"], meter_budget={"prompt_evals": args["budget"]})
    opts = {"augment": False, "budget": args["budget"], "intrinsic_dim": args["intrinsic_dim"],
            "embedding_std": fx["inputs"]["std_hat"], **options}
    return box, BBT(make_config(BBT, opts), env)


def run(fx: dict, m: BBT, box, generations: int | None = None):
    """Yields (generation, official, population, losses) after each step."""
    seen = {}
    ask, tell = m.opt.ask, m.opt.tell
    m.opt.ask = lambda: seen.setdefault("pop", ask())
    m.opt.tell = lambda losses: (seen.setdefault("losses", losses), tell(losses))[1]
    budget = Budget.of(box.meter, "prompt_evals", m.cfg.budget)
    for g, off in enumerate(fx["trajectory"][:generations]):
        seen.clear()
        m.step(budget)
        yield g, off, seen["pop"], seen["losses"]


def test_bbt_defaults_are_the_official_options():
    """bbpt's defaults are bbt.py's argparse defaults (popsize, σ, α, bound), as the fixture ran them."""
    fx = load("bbt")
    args, inp = fx["inputs"]["args"], fx["inputs"]
    cfg = make_config(BBT, {})
    official = (args["popsize"], args["sigma"], args["alpha"], args["bound"])
    assert (cfg.popsize, cfg.sigma, cfg.alpha, cfg.bound) == official
    assert args["random_proj"] == "normal" and args["cat_or_add"] == "add" and not args["parallel"]
    assert inp["cma_opts"]["maxiter"] == args["budget"] // args["popsize"] and "bounds" not in inp["cma_opts"]


def test_projection_std_is_the_official_formula():
    """std(A) = α · std_hat / (√d · σ) with the official std_hat; bbpt draws A ~ N(0, std²) with it."""
    fx = load("bbt")
    inp, args = fx["inputs"], fx["inputs"]["args"]
    std = RandomProjection.bbt_std(inp["std_hat"], args["intrinsic_dim"], args["sigma"], args["alpha"])
    close(std, inp["proj_std"], rtol=1e-7, what="std(A)")
    close(np.std(inp["model"]["token_embedding"]), inp["std_hat"], rtol=1e-6, what="std_hat = np.std(embedding table)")
    _, m = build(fx)
    g = torch.Generator().manual_seed(args["seed"])
    close(m.param.A, torch.randn(m.param.A.shape, generator=g) * inp["proj_std"], what="bbpt's A at the official std")
    assert m.param.A.shape == inp["A"].shape  # (m·D, d), the official nn.Linear's weight


def test_the_client_side_std_estimate_departs_from_the_official_table_std():
    """Without embedding_std, bbpt estimates std_emb from the words it received (class names and
    template words; a black box has no table): another value than np.std of the whole table. On
    the toy, whose rows are i.i.d., 0.8% apart; on a real model the words' rows are a biased
    sample of the table. embedding_std= takes the official statistic."""
    fx = load("bbt")
    inp, args = fx["inputs"], fx["inputs"]["args"]
    box, m = build(fx, embedding_std=None)
    est = embedding_std(box, inp["classnames"] + ["a photo of a ."])  # the task's template "a photo of a {}."
    assert abs(est / inp["std_hat"] - 1) > 5e-3, (est, inp["std_hat"])
    g = torch.Generator().manual_seed(args["seed"])
    scale = m.param.A / torch.randn(m.param.A.shape, generator=g)  # A = N(0, 1) draws · std
    close(scale, np.full(scale.shape, RandomProjection.bbt_std(est, args["intrinsic_dim"], args["sigma"])), rtol=1e-5,
          what="std(A) from the client-side estimate")
    with pytest.raises(AssertionError, match="std"):
        close(scale, np.full(scale.shape, inp["proj_std"]), rtol=1e-5, what="std(A) vs the official")


def test_bbt_follows_bbt_py_for_four_generations():
    """The official A injected (drawn by torch's global RNG there): populations, fitness (CE of
    p0 + A z on the whole set, through the real metered black box), means, σ, xbest and the
    prompt p0 + A xbest, then the budget ends where bbt.py's maxiter does."""
    fx = load("bbt")
    inp = fx["inputs"]
    box, m = build(fx)
    close(m.param.ctx0, inp["p0"], what="p0 = the embeddings of 'a photo of a'")
    m.param.A = torch.from_numpy(inp["A"])
    gens = 0
    for g, off, pop, losses in run(fx, m, box):
        close(pop, off["population"], what=f"gen {g}: the asked population")
        close(losses, off["fitness"], rtol=2e-5, atol=1e-6, what=f"gen {g}: fitness")
        close(m.opt.mean, off["mean"], what=f"gen {g}: CMA-ES mean")
        close(m.opt.sigma, off["sigma"], rtol=1e-6, what=f"gen {g}: σ")
        close(m.opt.best, off["xbest"], what=f"gen {g}: xbest")
        close(m.prompt().ctx[0], inp["p0"] + off["best_prefix"], atol=1e-5, what=f"gen {g}: prompt p0 + A xbest")
        assert box.meter.counts["prompt_evals"] == off["num_call"]
        gens += 1
    assert gens == 4 and fx["stop"] == {"maxiter": gens}
    with pytest.raises(BudgetExhausted):  # maxiter = budget // popsize: no fifth generation
        m.step(Budget.of(box.meter, "prompt_evals", m.cfg.budget))


def test_bbpts_own_projection_leaves_the_official_fitness():
    """The fixture can fail: bbpt's own A (from its seed, not the official draw) scores other fitness."""
    fx = load("bbt")
    box, m = build(fx)
    with pytest.raises(AssertionError, match="fitness"):
        for g, off, pop, losses in run(fx, m, box, generations=1):
            close(pop, off["population"], what=f"gen {g}: the asked population")
            close(losses, off["fitness"], rtol=2e-5, atol=1e-6, what=f"gen {g}: fitness")
