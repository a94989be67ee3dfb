"""SharpZO against its official code (tests/parity/sharpzo.json, written by tools/parity/sharpzo.py
from ``main_sharpzo.py`` run as ``run_all_final_exps.sh`` runs it, on the toy CLIP): three
sharpness-aware CMA-ES generations (the CGE gradient at the re-asked rows' mean, ε, populations,
fitness, mean, σ, the re-asked rows) and three ZO-SGD steps (losses, projected gradient, the
parameter after the never-reset accumulator's update)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load, toy_env

from bbpt.methods import make_config
from bbpt.methods.base import Budget
from bbpt.methods.sharpzo import SharpZO


def run(fx: dict, options: dict):
    """bbpt's SharpZO (the fixture's preset, intrinsic_dim and change point) on the fixture's
    inputs: yields (step, official record, method, what it asked / was told)."""
    inp = fx["inputs"]
    box, env = toy_env(fx, SharpZO, seed=inp["cfg"]["seed"])
    opts = {"augment": False, "preset": inp["cfg"]["dataset"], "intrinsic_dim": inp["cfg"]["intrinsic_dim"],
            "change_point": inp["args"]["change_point"], **options}
    cfg = SharpZO.resolve_config(make_config(SharpZO, opts), 16)
    m = SharpZO(cfg, env)
    close(m.param.ctx0, inp["ctx0"], what="p0 = the embeddings of 'a photo of a'")
    m.param.A = torch.from_numpy(inp["A"])  # the official nn.Linear's weight (m·D, d), drawn by torch there
    if cfg.reask:
        m.z_rows = torch.from_numpy(inp["rows"]).mean(0)  # input_param = torch.rand(40, d), drawn by torch there
    budget = Budget.of(box.meter, "prompt_evals", cfg.budget)
    seen = {}
    ask, tell, losses = m.es.ask, m.es.tell, m.losses
    m.es.ask = lambda: seen.setdefault("pop", ask())
    m.es.tell = lambda f: (seen.setdefault("fitness", f), tell(f))[1]
    m.losses = lambda z: seen.setdefault("cge_losses", losses(z))  # the CGE's 2d evaluations
    zo_tell, switch = m.zo.tell, m.switch
    m.switch = lambda: (switch(), seen.setdefault("start", m.zo.w.clone()))
    m.zo.tell = lambda f: (seen.setdefault("losses", f), zo_tell(f))[1]
    for k, off in enumerate(fx["trajectory"]):
        seen.clear()
        if off["stage"] == 2:  # z from torch.manual_seed(np.random.randint(1e9)) there: the direction it gave
            m.zo.est.directions = lambda d, gen, z=torch.from_numpy(off["direction"]): z[None].clone()
        m.step(budget)
        yield k, off, m, seen, box


def check(k, off, m, seen, box):
    close(box.meter.counts["prompt_evals"], off["evals"], what=f"step {k}: evaluations")
    if off["stage"] == 1:
        assert m.stage == 1, f"step {k}: still in stage 1"
        # the CGE losses agree to a few float32 ulps (A·mean(rows) here, mean(A·rows) there); their
        # differences over 2μ = 2e-3 carry that rounding into g (1e-5 / 2e-3), and g into ε and the fitness
        close(seen["cge_losses"], off["cge_losses"], rtol=3e-6, atol=1e-6, what=f"step {k}: the CGE losses")
        close(m.grad, off["grad"], rtol=0, atol=1e-2, what=f"step {k}: the CGE gradient")
        close(m.eps, off["eps"], rtol=0, atol=3e-5, what=f"step {k}: eps")
        close(seen["pop"], off["population"], what=f"step {k}: the asked population")
        close(seen["fitness"], off["fitness"], rtol=1e-4, atol=1e-6, what=f"step {k}: fitness CE(z_i + eps)")
        close(m.es.mean, off["mean"], what=f"step {k}: CMA-ES mean")
        close(m.es.sigma, off["sigma"], rtol=1e-6, what=f"step {k}: sigma")
        close(m.z_rows, off["reask"].mean(0), what=f"step {k}: the re-asked rows' mean (input_param)")
    else:
        assert m.stage == 2, f"step {k}: in stage 2"
        if off["start"] is not None:
            close(seen["start"], off["start"], what=f"step {k}: stage 2 starts at the last re-ask's mean")
        close(seen["losses"], off["losses"], rtol=2e-6, atol=1e-6, what=f"step {k}: L(w ± mu z)")
        close(m.zo.w, off["w"], rtol=0, atol=3e-5, what=f"step {k}: w after the update")  # lr · (g's rounding)


def test_sharpzo_follows_the_released_script_for_three_generations_and_three_zo_steps():
    """preset=eurosat (the script's config: std 1, bound 5; its dense zo trainer; the release's
    re-asked rows and never-reset accumulator), intrinsic_dim 64, change_point 3."""
    fx = load("sharpzo")
    stages = [off["stage"] for k, off, m, seen, box in run(fx, {}) if check(k, off, m, seen, box) is None]
    assert stages == [1, 1, 1, 2, 2, 2]


def test_the_rows_and_the_broadcast_are_the_releases():
    """The fixture's own record of what the options model: ε of radius ρ/√40, the CGE at the
    re-asked rows' mean, z of 40 rows from the second stage-2 step on."""
    fx = load("sharpzo")
    t = fx["trajectory"]
    for g in t[:3]:
        assert np.linalg.norm(g["eps"]) == pytest.approx(0.1 / 40**0.5, rel=1e-5)
    close(t[0]["cge_at"], fx["inputs"]["rows"].mean(0), what="generation 0: the CGE at the uniform rows' mean")
    close(t[1]["cge_at"], t[0]["reask"].mean(0), what="generation 1: at the re-ask's mean")
    assert t[3]["z"].shape == (128,) and t[4]["z"].shape == t[5]["z"].shape == (40, 128)


@pytest.mark.parametrize("departure, what", [
    ({"reask": False}, "CGE"),                 # the paper's CMA-ES mean: the gradient is taken elsewhere
    ({"grad_accumulate_bug": False}, "w after"),  # a reset accumulator: the first update already departs
])
def test_the_papers_choices_leave_the_release_trajectory(departure, what):
    fx = load("sharpzo")
    with pytest.raises(AssertionError, match=what):
        for k, off, m, seen, box in run(fx, departure):
            check(k, off, m, seen, box)


def test_eps_of_radius_rho_leaves_the_release_trajectory(monkeypatch):
    """ε normalised over one row (radius ρ) instead of the release's 40 identical rows (ρ/√40)."""
    fx = load("sharpzo")
    off = fx["trajectory"][0]
    k, _, m, seen, box = next(run(fx, {}))
    close(m.eps, off["eps"], rtol=0, atol=3e-5, what="eps")
    with pytest.raises(AssertionError, match="eps"):
        close(m.eps * 40**0.5, off["eps"], rtol=0, atol=3e-5, what="eps")


def test_the_released_directions_are_row_means_of_40_gaussians():
    """bbpt's own draws (not injected): plain N(0, I) at the first stage-2 step, then the mean of
    popsize rows, N(0, I / 40), as the broadcast parameter's z averaged by the forward pass."""
    fx = load("sharpzo")
    inp = fx["inputs"]
    box, env = toy_env(fx, SharpZO, seed=1)
    cfg = SharpZO.resolve_config(make_config(SharpZO, {"augment": False, "preset": "eurosat", "intrinsic_dim": 256,
                                                       "change_point": 1}), 16)
    m = SharpZO(cfg, env)
    budget = Budget.of(box.meter, "prompt_evals", cfg.budget)
    drawn, directions = [], m.zo._directions
    m.zo._directions = lambda: drawn.append(r := directions()) or r  # ask draws, tell redraws from the seed
    for _ in range(5):  # one generation, four ZO steps
        m.step(budget)
    assert len(drawn) == 8 and all(torch.equal(a, b) for a, b in zip(drawn[::2], drawn[1::2]))
    stds = [float(d.std()) for d in drawn[::2]]
    assert stds[0] == pytest.approx(1.0, rel=0.15) and all(s == pytest.approx(40**-0.5, rel=0.15) for s in stds[1:])
    assert inp["cfg"]["popsize"] == 40
