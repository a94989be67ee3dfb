"""BAR against the official trainers, step for step (fixtures from ``tools/parity/bar.py``):
ZIP's ``trainers/bar.py`` (bar.json, bbpt's defaults) and BlackVIP's
``trainers/reprogramming.py`` (bar_blackvip.json), each run with the official ``PROGRAM`` and
``FocalLoss`` on the toy CLIP. bbpt's BAR runs through the real metered black box with the
official W0, batches and unit directions injected (its OneSidedRGF draws its own)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import ToyBackbone, close, load, toy_env

from bbpt.methods.bar import BAR, BARConfig
from bbpt.methods.base import Budget
from bbpt.optim import ZOSGD, OneSidedRGF, PolyDecay

OFFICIAL = {"bar": lambda: load("bar"), "bar_blackvip": lambda: load("bar_blackvip")}  # ZIP's, BlackVIP's
FIXTURES = list(OFFICIAL)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class FixedBatches:
    """The official loader's batches, in the fixture's order."""

    def __init__(self, data, batches):
        self.data, self.batches, self.k = data, batches, 0

    def next(self):
        idx = self.batches[self.k]
        self.k += 1
        return self.data.images(idx), self.data.labels[idx]


def schedule(cfg: dict, cls=PolyDecay) -> PolyDecay:
    return cls(cfg["lrs"][0], cfg["lrs"][1], cfg["total_length"], cfg["power"], 0.9, cfg["beta"])


class OldPolyDecay(PolyDecay):
    """The counter bbpt had: t = k - 1 (the first step at t = 0, a_1 = lr0)."""

    def a_k(self, k: int) -> float:
        return super().a_k(k - 1)


def bar_method(fx: dict, monkeypatch, seed: int = 0, inject: bool = True) -> BAR:
    """bbpt's BAR on the fixture's toy model (normalising with CLIP's mean/std, as PROGRAM does),
    with (``inject``) the official W0, batches and directions."""
    monkeypatch.setattr(ToyBackbone, "mean", CLIP_MEAN)
    monkeypatch.setattr(ToyBackbone, "std", CLIP_STD)
    c, traj = fx["inputs"]["cfg"], fx["trajectory"]
    _, env = toy_env(fx, BAR, seed=seed)
    cfg = BARConfig(batch_size=c["batch_size"], q=c["q"], beta=c["beta"], lr0=c["lrs"][0], lr_min=c["lrs"][1],
                    power=c["power"], gamma=c["gamma"], decay_steps=c["total_length"])
    m = BAR(cfg, env)
    assert m.inner == c["inner"] and m.box.image_size == c["frame_size"]
    if not inject:
        return m
    m.opt.move_to(torch.from_numpy(fx["inputs"]["w0"]))
    m.opt.est.directions = lambda d, gen: torch.from_numpy(traj[m.opt.k - 1]["directions"])
    m.batches = FixedBatches(m.data, [s["batch"] for s in traj])
    return m


@pytest.mark.parametrize("name", FIXTURES)
def test_bar_follows_the_official_trainer_step_for_step(name, monkeypatch):
    """Programmed images, pivot and perturbed losses, a_k, and W after each of the 4 steps
    (the last with the decay counter clamped at 0.9·total_length)."""
    fx = OFFICIAL[name]()
    m = bar_method(fx, monkeypatch)
    seen, own = [], []
    toy = m.box._bb.toy
    encode = toy.encode_image
    monkeypatch.setattr(toy, "encode_image", lambda x: seen.append(x.clone()) or encode(x))
    loss = m.loss

    def official_losses(logits, y):  # bbpt's own losses are checked; the update gets the official ones
        own.append(loss(logits, y))
        return torch.from_numpy(fx["trajectory"][len(own) - 1]["losses"])

    m.loss = official_losses
    budget = Budget("api_calls", None, lambda: 0)
    for k, off in enumerate(fx["trajectory"]):
        seen.clear()
        stats = m.step(budget)
        q = len(off["directions"])
        assert len(seen) == q + 1  # the pivot, then q perturbed frames
        close(seen[0], off["pivot_image"], atol=2e-6, what=f"step {k} programmed image (pivot)")
        if "perturbed_image" in off:
            close(seen[1], off["perturbed_image"], atol=2e-6, what=f"step {k} programmed image (w + βu_1)")
        close(own[k], off["losses"], rtol=2e-6, atol=1e-5, what=f"step {k} focal losses")
        close(stats["lr"], off["lr"], rtol=1e-12, atol=0, what=f"step {k} a_k")
        close(stats["train_loss"], off["losses"][0], what=f"step {k} reported loss (the pivot)")
        close(m.opt.w, off["w_new"], rtol=1e-5, atol=2e-5, what=f"step {k} W")


@pytest.mark.parametrize("name", FIXTURES)
def test_one_sided_rgf_estimate_and_poly_decay_match_the_official_statements(name):
    """The optimiser alone: (d/q)·Σ u_j (L(w+βu_j) − L(w))/β from the official losses and
    directions, and a_k with t = k clamped at 0.9·total_length."""
    fx = OFFICIAL[name]()
    c = fx["inputs"]["cfg"]
    w = torch.from_numpy(fx["inputs"]["w0"])
    sched = schedule(c)
    for k, off in enumerate(fx["trajectory"], start=1):
        assert off["t"] == min(k, 0.9 * c["total_length"]) and off["decay_steps"] == 0.9 * c["total_length"]
        opt = ZOSGD(w, OneSidedRGF(c["q"]), sched)
        opt.k = k
        dirs = torch.from_numpy(off["directions"])
        opt.est.directions = lambda d, gen: dirs
        pts = opt.ask()
        close(pts, torch.cat([w[None], w + c["beta"] * dirs]), what=f"step {k} points")
        stats, g = opt.tell(torch.from_numpy(off["losses"])), opt.last_grad
        assert stats == opt.last
        close(g, off["ghat"], rtol=1e-5, atol=2e-6, what=f"step {k} ĝ")
        close(opt.last["lr"], off["lr"], rtol=1e-12, atol=0, what=f"step {k} a_k")
        close(opt.w, off["w_new"], rtol=1e-5, atol=2e-5, what=f"step {k} W")
        w = torch.from_numpy(off["w_new"])


@pytest.mark.parametrize("name", FIXTURES)
def test_the_old_decay_counter_leaves_the_official_trajectory(name, monkeypatch):
    """The fixture can fail: with t = k − 1 the first step runs at lr0, not a_1, and W departs."""
    fx = OFFICIAL[name]()
    c, off = fx["inputs"]["cfg"], fx["trajectory"][0]
    old = schedule(c, OldPolyDecay)
    assert [old.a_k(k) for k in (1, 2)] != pytest.approx([s["lr"] for s in fx["trajectory"][:2]])
    m = bar_method(fx, monkeypatch)
    m.opt.sched = old
    loss = m.loss
    m.loss = lambda logits, y: (loss(logits, y), torch.from_numpy(off["losses"]))[1]
    stats = m.step(Budget("api_calls", None, lambda: 0))
    assert stats["lr"] == c["lrs"][0] and abs(stats["lr"] - off["lr"]) > 1
    assert float(np.abs(m.opt.w.numpy() - off["w_new"]).max()) > 1.0


@pytest.mark.parametrize("name", FIXTURES)
def test_bbpts_own_draws_are_the_official_draws(name, monkeypatch):
    """Without injection: BAR's W0 from its seed is PROGRAM's randn(3, F, F) after
    set_random_seed(SEED), and OneSidedRGF's q unit directions are the official loop's
    torch.normal(0, 1, (d,)) / ‖u‖ from the same RNG state (the same numbers: d % 16 == 0).
    BlackVIP's train() reseeds before its first step; ZIP's continues after W0 (bbpt's optimiser
    has its own generator, seeded anew: only the BlackVIP stream continues as bbpt's does)."""
    fx = OFFICIAL[name]()
    c = fx["inputs"]["cfg"]
    m = bar_method(fx, monkeypatch, seed=c["seed"], inject=False)
    close(m.opt.w, fx["inputs"]["w0"], rtol=0, atol=0, what="W0")
    gen = torch.Generator().manual_seed(c["seed"])
    if name == "bar":
        torch.randn(m.opt.d, generator=gen)  # ZIP: the directions follow W0's draw on one stream
    for k, off in enumerate(fx["trajectory"][:2]):
        u = OneSidedRGF(c["q"]).directions(m.opt.d, gen)
        close(u, off["directions"], rtol=0, atol=0, what=f"step {k} directions")
        close(u.norm(dim=1), np.ones(c["q"]), what=f"step {k} |u|")
