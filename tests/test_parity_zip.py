"""ZIP and plain ZO-SGD against the official ZIP trainer (tests/parity/zip.json, zosgd.json,
written by tools/parity/zip.py from ``trainers/zip.py`` run on the toy CLIP): the Fastfood
projection and the low-rank + shared reconstruction, the initial prompt, and three SPSA steps
(Δ, c_k, a_k, the five estimates, the √δ clipping, the update, the losses).

The official draws (θ0, V, the Fastfood B, Π, G and every Δ) come from torch's and numpy's
global generators there; they are injected here, and bbpt's own draws are checked for their
distribution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity_model import close, load, toy_env

from bbpt.methods import make_config
from bbpt.methods.base import Budget
from bbpt.methods.zip import ZIP
from bbpt.methods.zosgd import ZOSGDMethod

T = torch.from_numpy


class Batches:
    """Stands in for the BatchStream: the official loader's batches, in order."""

    def __init__(self, data, batches):
        self.data, self.batches = data, list(batches)

    def next(self):
        idx = self.batches.pop(0)
        return self.data.images(idx), self.data.labels[idx]


def build(fx: dict, cls, options: dict):
    """bbpt's method on the fixture's toy model, with the official draws injected."""
    box, env = toy_env(fx, cls, seed=fx["inputs"]["cfg"]["SEED"])
    m = cls(cls.resolve_config(make_config(cls, {"batch_size": fx["inputs"]["batch_size"], **options}), 16), env)
    inp = fx["inputs"]
    m.param.ctx0 = T(inp["ctx0"])  # θ0: N(0, 0.02²) from torch's global generator there
    if cls is ZIP:
        ff = m.param.M
        assert ff.LL == inp["LL"]
        ff.B, ff.Pi, ff.G = T(inp["B"]).float(), T(inp["Pi"]).long(), T(inp["G"])
        at = dict(zip([k for k, _ in m.param.sizes], np.cumsum([0] + [n for _, n in m.param.sizes])))
        m.param.V0 = T(inp["w0"][at["V"] : at["V"] + m.param.q * m.param.r]).view(m.param.q, m.param.r)  # N(0, 1)
    m.opt.move_to(m.param.init())
    traj = fx["trajectory"]
    m.opt.est.directions = lambda d, gen: T(traj[m.opt.k - 1]["perturbations"])  # the official Δ of step k
    m.batches = Batches(m.data, [t["batch"] for t in traj])
    return m, box


def steps(m, box, n: int):
    """Yields (step stats, asked points, losses told, the update ĝ) for n steps."""
    seen = {}
    ask, tell = m.opt.ask, m.opt.tell
    m.opt.ask = lambda: seen.setdefault("points", ask())
    m.opt.tell = lambda losses: (tell(seen.setdefault("losses", losses)), seen.setdefault("update", m.opt.last_grad))[0]
    budget = Budget.of(box.meter, "api_calls", m.cfg.budget)
    for _ in range(n):
        seen.clear()
        stats = m.step(budget)
        yield stats, seen["points"], seen["losses"], seen["update"]


def check(fx: dict, m, box, n: int | None = None) -> int:
    """Step by step against the fixture. The losses agree to float32 rounding (a few ulp: the toy's
    sums run in another order); ĝ divides their differences by 2 c_k Δ, so the update and w are
    held to the bound that rounding implies: |δĝ| <= 2 max|δL| / c_k (|Δ| >= 1/2). Each step then
    starts from the official w (teacher forcing): float32 noise is not carried into the next
    step's losses, where the loss's slope would amplify it."""
    traj = fx["trajectory"][:n]
    close(m.opt.w, fx["inputs"]["w0"], rtol=0, atol=0, what="w0 (the learner's parameter vector at init)")
    for (stats, points, losses, update), off in zip(steps(m, box, len(traj)), traj):
        k, c = off["k"], off["ck"]
        close(m.opt.sched.c_k(k), c, rtol=1e-12, what=f"step {k}: c_k")
        close(stats["lr"], off["ak"], rtol=1e-12, what=f"step {k}: a_k")
        close(points, off["points"], rtol=0, atol=1e-6, what=f"step {k}: the points w ± c_k Δ_j")
        if "ctx" in off:
            close(m.param.matrix(points), off["W"], rtol=1e-5, atol=1e-5, what=f"step {k}: W = U diag(s) Vᵀ + 1 uᵀ")
            close(m.param.decode(points), off["ctx"], rtol=1e-5, atol=1e-5, what=f"step {k}: θ0 + F_i(w_i)")
        close(losses, off["losses"], rtol=2e-6, atol=1e-6, what=f"step {k}: losses L+, L- per pair")
        dirs = T(off["perturbations"])
        for j, est in enumerate(off["estimates"]):  # ĝ_j from the official losses, by bbpt's estimator
            close(m.opt.est.estimate(T(off["losses"][2 * j : 2 * j + 2]), dirs[j : j + 1], c), est,
                  rtol=1e-6, atol=1e-6 * np.abs(est).max(), what=f"step {k}: estimate {j + 1}")
        g_err = 2 * float((losses - T(off["losses"])).abs().max()) / c + 1e-6
        close(stats["grad_norm"], np.linalg.norm(off["ghat"].astype(np.float64)), rtol=1e-5,
              atol=g_err * math.sqrt(len(dirs[0])), what=f"step {k}: ‖ĝ‖")
        if "norm" in off:
            close(stats["clip"], min(off["delta"] / off["norm"], 1.0), rtol=1e-4, what=f"step {k}: clip factor")
        close(update, off["update"], rtol=1e-5, atol=g_err, what=f"step {k}: the (clipped) update")
        close(m.opt.w, off["w"], rtol=0, atol=off["ak"] * g_err + 1e-6, what=f"step {k}: w after")
        m.opt.move_to(T(off["w"]))
        close(box.meter.counts["api_calls"], 10 * k, what=f"step {k}: api_calls")
        # logged only: bbpt reports the mean of all 2N losses, the release the last pair's mean
        close(stats["train_loss"], float(losses.mean()), rtol=1e-6)
        close(off["reported_loss"], off["losses"][-2:].mean(), rtol=1e-6)
    return len(traj)


def test_zip_follows_the_official_trainer_for_three_spsa_clip_steps():
    fx = load("zip")
    cfg = fx["inputs"]["cfg"]["TRAINER"]
    m, box = build(fx, ZIP, {})
    o, c, a, alpha, gamma = cfg["ZIP"]["SPSA_PARAMS"]  # the release's config, as bbpt's defaults
    assert (m.cfg.o, m.cfg.c, m.cfg.a, m.cfg.alpha, m.cfg.gamma) == (o, c, a, alpha, gamma)
    assert (m.cfg.n_perturb, m.cfg.n_ctx, m.cfg.intrinsic_dim, m.cfg.rank, m.cfg.clip) == (
        cfg["BASIC"]["SP_AVG"], cfg["ZIP"]["N_CTX"], cfg["ZIP"]["INTRINSIC_DIM"], cfg["ZIP"]["RANK"], "intrinsic")
    assert m.param.dim == 417 and m.opt.threshold == pytest.approx(math.sqrt(417))
    assert check(fx, m, box) == 3
    assert fx["trajectory"][-1]["api_calls"] == 30


def test_zip_fastfood_and_initial_prompt():
    """Each token's Fastfood map with the official (B, Π, G): its scale, and θ0 + F(0) = θ0."""
    fx = load("zip")
    inp = fx["inputs"]
    m, _ = build(fx, ZIP, {})
    ff = m.param.M
    close(1 / ff.scale, inp["divisor"] * math.sqrt(ff.D / ff.LL), rtol=1e-6, what="divisor · √(D/LL)")
    close(m.param.decode(m.opt.w)[0], inp["initial_prompt"], rtol=0, atol=0, what="the initial prompt")
    close(inp["initial_prompt"], inp["ctx0"], rtol=0, atol=0, what="official: the initial prompt is θ0")
    pts = T(fx["trajectory"][0]["points"])
    close(m.param.decode(pts), fx["trajectory"][0]["ctx"], rtol=1e-5, atol=1e-5, what="decode of step 1's points")


def test_bbpt_draws_what_the_official_code_draws_in_distribution():
    """θ0 ~ N(0, 0.02²) (m, D); Δ with |Δ_i| ~ U[0.5, 1] and a fair sign; V ~ N(0, 1); B = ±1."""
    fx = load("zip")
    inp = fx["inputs"]
    box, env = toy_env(fx, ZIP, seed=1)
    m = ZIP(ZIP.resolve_config(make_config(ZIP, {}), 16), env)
    for ctx0 in (m.param.ctx0, T(inp["ctx0"])):
        assert ctx0.shape == (8, 80) and abs(float(ctx0.std()) - 0.02) < 0.002 and abs(float(ctx0.mean())) < 0.003
    official = np.concatenate([t["perturbations"] for t in fx["trajectory"]])
    ours = m.opt.est.directions(m.param.dim, torch.Generator().manual_seed(0)).numpy()
    for d in (ours, official):
        a = np.abs(d)
        assert a.min() >= 0.5 and a.max() <= 1.0 and abs(a.mean() - 0.75) < 0.01 and abs((d > 0).mean() - 0.5) < 0.03
    assert abs(float(m.param.V0.std()) - 1) < 0.1 and set(m.param.M.B.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("departure, what", [
    ({"clip": "none"}, "step 1: clip factor"),  # every fixture step clips (‖ĝ‖ 261-445 > √417)
    ({"o": 0.0}, "step 1: a_k"),                # a_k = a / k^α, without the stability offset
    ({"c": 0.005}, "step 1: c_k"),              # train.py's default SPSA_PARAMS c, which the ZIP config overrides
])
def test_zip_departures_leave_the_release_trajectory(departure, what):
    fx = load("zip")
    m, box = build(fx, ZIP, departure)
    with pytest.raises(AssertionError, match=what):
        check(fx, m, box, 1)


def test_zosgd_follows_the_official_spsa_statements_on_the_raw_context():
    """OPT_TYPE 'spsa' (no clipping, no momentum) with the official PromptLearner's ctx as the
    parameter vector: bbpt's zosgd, Direct parameterisation."""
    fx = load("zosgd")
    m, box = build(fx, ZOSGDMethod, {})
    assert fx["inputs"]["cfg"]["TRAINER"]["BASIC"]["OPT_TYPE"] == "spsa" and m.opt.threshold is None
    assert m.param.dim == 8 * 32 and m.opt.momentum == 0
    close(m.param.decode(m.opt.w)[0], fx["inputs"]["initial_prompt"], rtol=0, atol=0, what="the initial prompt")
    assert check(fx, m, box) == 3


def test_zosgd_with_clipping_leaves_the_spsa_trajectory():
    fx = load("zosgd")
    m, box = build(fx, ZOSGDMethod, {"clip": "intrinsic"})
    with pytest.raises(AssertionError, match="step 1: the"):
        check(fx, m, box, 1)
