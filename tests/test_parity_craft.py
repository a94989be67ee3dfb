"""CraFT against its official code (tests/parity/craft*.json, written by tools/parity/craft.py
from ``main_craft.py`` / ``main_craft_imagenet.py`` run on the toy CLIP): three generations of
CMA-ES populations, fitness, means, σ, the re-asked bias, the head after each epoch (its
batches, Adam, the KL switch) and the refined test logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load, toy_env

from bbpt.methods import make_config
from bbpt.methods.base import Budget
from bbpt.methods.craft import CraFT
from bbpt.models import Images, QueryMeter


class Orders:
    """Stands in for the method's numpy Generator: each epoch's order is the official loader's."""

    def __init__(self, orders):
        self.orders = list(orders)

    def permutation(self, n):
        order = np.asarray(self.orders.pop(0))
        assert len(order) == n
        return order


def run(fx: dict, options: dict, generations: int | None = None):
    """bbpt's CraFT on the fixture's inputs: yields (generation, method, population, losses)."""
    box, env = toy_env(fx, CraFT, seed=fx["inputs"]["cfg"]["seed"])
    cfg = CraFT.resolve_config(make_config(CraFT, {"augment": False, **options}), 16)
    m = CraFT(cfg, env)
    inp, traj = fx["inputs"], fx["trajectory"][:generations]
    close(m.param.ctx0, inp["ctx0"], what="p0 = the embeddings of 'a photo of a'")
    m.param.A = torch.from_numpy(inp["A"])  # the official nn.Linear's weight (m·D, d), drawn by torch there
    m.head.load_state_dict({k: torch.from_numpy(v) for k, v in inp["head"].items()})  # same tensors: Adam keeps them
    m.rng = Orders([g["head_order"] for g in traj])
    budget = Budget.of(box.meter, "prompt_evals", cfg.budget)
    seen = {}
    ask, tell = m.opt.ask, m.opt.tell
    m.opt.ask = lambda: seen.setdefault("pop", ask())
    m.opt.tell = lambda losses: (seen.setdefault("losses", losses), tell(losses))[1]
    n = inp["n_train"]
    test = Images(box._bb.toy.pixels(inp["model"], np.arange(n, len(inp["model"]["labels"]))))
    for g, off in enumerate(traj):
        seen.clear()
        m.step(budget)
        yield g, off, m, seen["pop"], seen["losses"], test, box


def check_generation(g, off, m, pop, losses, test, box, *, bias: str):
    close(pop, off["population"], what=f"gen {g}: the asked population")
    close(losses, off["fitness"], rtol=2e-5, atol=1e-6, what=f"gen {g}: fitness CE + λ KL")
    close(m.opt.mean, off["mean"], what=f"gen {g}: CMA-ES mean")
    close(m.opt.sigma, off["sigma"], rtol=1e-6, what=f"gen {g}: σ")
    close(box.meter.counts["prompt_evals"], off["steps"], what=f"gen {g}: steps")
    if bias == "reask":
        close(m.z_bias, off["reask_mean"], what=f"gen {g}: the re-asked population's mean")
    else:
        close(m.z_bias, off["xbest"], what=f"gen {g}: xbest")
    close(m.param.decode(m.z_bias)[0] - m.param.ctx0, off["bias"], atol=1e-5, what=f"gen {g}: bias A z")
    for k, v in off["head"].items():
        close(m.head.state_dict()[k], v, what=f"gen {g}: head {k} after its epoch")
    free = box.for_classes(box.classnames, QueryMeter())  # evaluation is not charged to the run
    close(m.predict(free, test), off["test_logits"], rtol=1e-5, atol=1e-4, what=f"gen {g}: refined test logits")


def test_craft_follows_main_craft_py_for_three_generations():
    """preset=caltech101 (its craft_configs file), with the fixture's budget 160 (so the head's
    KL switches off after generation 1, steps > 160 // 4) and batch 16 (40 images: 16, 16, 8)."""
    fx = load("craft")
    cfg = fx["inputs"]["cfg"]
    gens = 0
    for g, off, m, pop, losses, test, box in run(fx, {"preset": "caltech101", "budget": cfg["budget"],
                                                         "batch_size": cfg["batch_size"]}):
        check_generation(g, off, m, pop, losses, test, box, bias="reask")
        gens += 1
    assert gens == 3


def test_craft_imagenet_preset_follows_main_craft_imagenet_py():
    """bias = A xbest, head C-512-C, A at nn.Linear's default init (injected: drawn by torch there), weight 0."""
    fx = load("craft_imagenet")
    cfg = fx["inputs"]["cfg"]
    for g, off, m, pop, losses, test, box in run(fx, {"preset": "imagenet", "batch_size": cfg["batch_size"]}):
        assert m.cfg.budget == 4000 and m.lam == 0 and m.head[0].out_features == 512
        check_generation(g, off, m, pop, losses, test, box, bias="xbest")


@pytest.mark.parametrize("departure, what", [
    ({"head_optim": "adamw"}, "head"),  # the paper's AdamW (weight decay 0.01), not the release's Adam
    ({"bias": "mean"}, "re-asked"),     # the CMA-ES mean, not the release's re-ask
])
def test_the_papers_choices_leave_the_release_trajectory(departure, what):
    fx = load("craft")
    cfg = fx["inputs"]["cfg"]
    opts = {"preset": "caltech101", "budget": cfg["budget"], "batch_size": cfg["batch_size"], **departure}
    with pytest.raises(AssertionError, match=what):
        for g, off, m, pop, losses, test, box in run(fx, opts, generations=2):
            check_generation(g, off, m, pop, losses, test, box, bias="reask")


def test_dropping_the_last_partial_batch_leaves_the_release_trajectory(monkeypatch):
    """The release keeps the last partial batch (build_data_loader drop_last=False): 40 images at
    batch 16 are three batches, not two."""
    from bbpt.methods import base

    fx = load("craft")
    cfg = fx["inputs"]["cfg"]
    real = base.FewShotData.batches
    monkeypatch.setattr(base.FewShotData, "batches", lambda self, bs, rng, drop_last=True: real(self, bs, rng, True))
    with pytest.raises(AssertionError, match="head"):
        for g, off, m, pop, losses, test, box in run(fx, {"preset": "caltech101", "budget": cfg["budget"],
                                                             "batch_size": cfg["batch_size"]}, generations=1):
            check_generation(g, off, m, pop, losses, test, box, bias="reask")
