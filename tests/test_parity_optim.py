"""The shared optimisers against the official code, statement for statement (fixtures from
``tools/parity/``; each names its official file, lines and commit)."""
from __future__ import annotations

import numpy as np
import torch

from parity_model import close, load

from bbpt.optim import CMAES


def test_cmaes_follows_the_official_craft_strategy_generation_for_generation():
    """pycma as the releases ran it (CSA): populations, means and σ for four generations."""
    fx = load("optim_cmaes")
    cfg, target, scale = fx["inputs"]["cfg"], fx["inputs"]["target"], fx["inputs"]["scale"]
    es = CMAES(torch.zeros(cfg["intrinsic_dim"]), cfg["sigma"], cfg["popsize"], seed=cfg["seed"], bound=cfg["bound"])
    for g, off in enumerate(fx["trajectory"]):
        z = es.ask()
        close(z, off["population"], what=f"generation {g} population")
        f = (torch.from_numpy(scale) * (z.double() - torch.from_numpy(target)) ** 2).sum(1)
        close(f, off["fitness"], what=f"generation {g} fitness")
        es.tell(torch.from_numpy(off["fitness"]))
        close(es.mean, off["mean"], what=f"generation {g} mean")
        close(es.sigma, off["sigma"], rtol=1e-7, what=f"generation {g} sigma")


def test_pycmas_own_step_size_rule_leaves_the_official_trajectory():
    """The fixture can fail: pycma 4.5's TPA (its default at d >= 300) departs at generation 2."""
    fx = load("optim_cmaes")
    cfg = fx["inputs"]["cfg"]
    es = CMAES(torch.zeros(cfg["intrinsic_dim"]), cfg["sigma"], cfg["popsize"], seed=cfg["seed"], bound=cfg["bound"],
               step_size="pycma")
    gaps = []
    for off in fx["trajectory"][:2]:
        z = es.ask()
        gaps.append(float(np.abs(z.numpy() - off["population"]).max()))
        es.tell(torch.from_numpy(off["fitness"]))
    assert gaps[0] < 1e-5 and gaps[1] > 1e-2
