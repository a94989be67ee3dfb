"""Optimisers and parameterisations against their formulas."""
import math

import numpy as np
import pytest
import torch

from bbpt.errors import BadInput
from bbpt.optim import CGE, CMAES, RGE, SPSA, SPSASchedule, ZOSGD, Constant, clip_factor
from bbpt.params import Direct, Fastfood, RandomProjection, ZIPProjection, fwht


def quad(w_star):
    return lambda W: 0.5 * ((W - w_star) ** 2).sum(-1)  # (n, d) -> (n,)


def test_spsa_single_pair_is_spalls_formula():
    d, c = 6, 0.01
    g = torch.Generator().manual_seed(3)  # fixed points: the float32 error of (L+ - L-) / 2c depends on them
    w, w_star = torch.randn(d, generator=g), torch.randn(d, generator=g)
    g_true = w - w_star
    for dist in ("rademacher", "segmented"):
        est = SPSA(1, dist)
        dirs = est.directions(d, torch.Generator().manual_seed(0))
        if dist == "segmented":
            assert dirs.abs().min() >= 0.5 and dirs.abs().max() <= 1.0
        else:
            assert set(dirs.abs().unique().tolist()) == {1.0}
        pts = est.points(w, dirs, c)
        assert torch.allclose(pts[0], w + c * dirs[0]) and torch.allclose(pts[1], w - c * dirs[0])
        g = est.estimate(quad(w_star)(pts), dirs, c)
        # (L+ - L-) / (2c) = Δ·∇f exactly on a quadratic; divided element-wise by Δ
        expect = (dirs[0] @ g_true) / dirs[0]
        assert torch.allclose(g, expect, atol=1e-4)


def test_spsa_average_is_unbiased_on_quadratic():
    d = 5
    w, w_star = torch.randn(d), torch.randn(d)
    est = SPSA(50000, "rademacher")
    dirs = est.directions(d, torch.Generator().manual_seed(1))
    g = est.estimate(quad(w_star)(est.points(w, dirs, 0.01)), dirs, 0.01)
    assert torch.allclose(g, w - w_star, atol=0.08)  # noise std ≈ ‖g‖/√N ≈ 0.016


def test_cge_exact_and_rge_unbiased():
    d = 7
    w, w_star = torch.randn(d), torch.randn(d)
    cge = CGE()
    dirs = cge.directions(d, None)
    assert cge.evals(d) == 2 * d
    g = cge.estimate(quad(w_star)(cge.points(w, dirs, 1e-3)), dirs, 1e-3)
    assert torch.allclose(g, w - w_star, atol=1e-3)
    rge = RGE(40000)
    dirs = rge.directions(d, torch.Generator().manual_seed(0))
    g = rge.estimate(quad(w_star)(rge.points(w, dirs, 1e-3)), dirs, 1e-3)
    assert torch.allclose(g, w - w_star, atol=0.1)


def test_intrinsic_clipping_exactly_at_sqrt_delta():
    delta = 417
    thr = math.sqrt(delta)
    g = torch.ones(delta) * 2.0  # norm 2·√δ
    assert clip_factor(g, thr) == pytest.approx(0.5)
    assert (clip_factor(g, thr) * g).norm() == pytest.approx(thr)
    small = torch.ones(delta) * 0.5
    assert clip_factor(small, thr) == 1.0
    # inside ZOSGD: clip="intrinsic" uses √d of the optimised vector
    opt = ZOSGD(torch.zeros(delta), SPSA(1), SPSASchedule(), clip="intrinsic")
    assert opt.threshold == pytest.approx(thr)
    opt.ask()
    stats = opt.tell(torch.tensor([1e6, -1e6]))  # huge estimate
    g = opt.last_grad
    assert float(g.norm()) == pytest.approx(thr, rel=1e-5)
    assert stats["clip"] == pytest.approx(thr / stats["grad_norm"]) and stats["lr"] == SPSASchedule().a_k(1)
    assert torch.allclose(opt.w, -SPSASchedule().a_k(1) * g)
    with pytest.raises(BadInput):
        ZOSGD(torch.zeros(3), SPSA(1), SPSASchedule(), clip=-1.0)


def test_schedules():
    s = SPSASchedule(a=0.01, c=0.01, o=1.0, alpha=0.4, gamma=0.1)
    assert s.a_k(1) == pytest.approx(0.01 / 2**0.4) and s.c_k(3) == pytest.approx(0.01 / 3**0.1)
    assert Constant(1e-3, 1e-3).a_k(100) == 1e-3


def test_zosgd_descends_quadratic_and_momentum_formula():
    d = 10
    w_star = torch.linspace(-1, 1, d)
    f = quad(w_star)
    opt = ZOSGD(torch.zeros(d), SPSA(5), Constant(a=0.05, c=0.01), seed=0)
    start = float(f(opt.w[None]))
    for _ in range(300):
        opt.tell(f(opt.ask()))
    assert float(f(opt.w[None])) < 0.05 * start
    # SPSA-GC: m1 = g1, update = g1 + βm1; m2 = βm1 + g2, update = g2 + βm2
    f = quad(torch.tensor([1.0, -2.0]))
    opt = ZOSGD(torch.zeros(2), CGE(), Constant(a=1.0, c=1e-3), momentum=0.9)
    opt.tell(f(opt.ask()))
    g1 = opt.last_grad
    assert torch.allclose(opt.w, -(g1 + 0.9 * g1))
    w1 = opt.w.clone()
    opt.tell(f(opt.ask()))
    g2 = opt.last_grad
    assert torch.allclose(opt.w, w1 - (g2 + 0.9 * (0.9 * g1 + g2)), atol=1e-5)


def test_zosgd_mask_freezes_coordinates():
    opt = ZOSGD(torch.zeros(4), RGE(1), Constant(0.1, 1e-3), seed=0)
    opt.set_mask(torch.tensor([True, False, True, False]))
    pts = opt.ask()
    assert torch.all(pts[:, 1] == 0) and torch.all(pts[:, 3] == 0)
    opt.tell(quad(torch.ones(4))(pts))
    assert opt.w[1] == 0 and opt.w[3] == 0 and opt.w[0] != 0


def test_zosgd_resume_is_exact():
    f = quad(torch.ones(6))
    a = ZOSGD(torch.zeros(6), SPSA(2, "segmented"), SPSASchedule(), seed=3)
    for _ in range(3):
        a.tell(f(a.ask()))
    state = a.state_dict()
    b = ZOSGD(torch.zeros(6), SPSA(2, "segmented"), SPSASchedule(), seed=99)
    b.load_state_dict(state)
    for _ in range(3):
        a.tell(f(a.ask()))
        b.tell(f(b.ask()))
    assert torch.equal(a.w, b.w)


def test_cmaes_batched_deterministic_private_rng():
    f = quad(torch.full((8,), 2.0))

    def run(seed):
        es = CMAES(torch.zeros(8), 1.0, 10, seed=seed)
        for _ in range(30):
            z = es.ask()
            assert z.shape == (10, 8)
            np.random.rand(5)  # other code touching numpy's global RNG must not matter
            es.tell(f(z))
        return es

    a, b = run(0), run(0)
    assert torch.equal(a.mean, b.mean)
    assert float(f(a.mean[None])) < float(f(torch.zeros(1, 8)))
    assert not torch.equal(run(1).mean, a.mean)
    es = CMAES(torch.zeros(3), 1.0, 6, seed=0, bound=0.5)
    assert es.ask().abs().max() <= 0.5
    with pytest.raises(RuntimeError):
        CMAES(torch.zeros(3), 1.0, 6).tell(torch.zeros(6))


def test_fwht_matches_hadamard_matrix():
    H = torch.ones(1, 1)
    for _ in range(4):  # Sylvester's construction of the 16 x 16 Hadamard matrix
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, 16)
    assert torch.allclose(fwht(x), x @ H.T, atol=1e-4)


def test_zip_projection_dimensions_and_init():
    ctx0 = torch.randn(8, 512)
    p = ZIPProjection(ctx0, intrinsic_dim=500, rank=5, seed=0)
    assert p.q == 62 and p.dim == 417  # δ = r(q + m + 1) + q
    z = p.init()
    assert torch.equal(p.decode(z)[0], ctx0)  # U = 0, u = 0: the prompt starts at θ0
    n_no_lr = ZIPProjection(ctx0, 500, 5, low_rank=False).dim
    n_no_fs = ZIPProjection(ctx0, 500, 5, feature_sharing=False).dim
    assert n_no_lr == 8 * 62 + 62 and n_no_fs == 5 * (62 + 8 + 1)
    # W = U diag(s) Vᵀ + 1 uᵀ, row i fed to token i's own map
    zz = torch.randn(2, p.dim)
    W = p.matrix(zz)
    U = zz[:, :40].view(2, 8, 5)
    s = zz[:, 40:45]
    V = zz[:, 45:355].view(2, 62, 5)
    u = zz[:, 355:]
    assert torch.allclose(W, U @ torch.diag_embed(s) @ V.transpose(1, 2) + u[:, None], atol=1e-5)
    out = p.decode(zz)
    assert out.shape == (2, 8, 512)
    # token i depends on row i only
    zz2 = zz.clone()
    zz2[:, :5] += 1.0  # U row 0
    diff = (p.decode(zz2) - out).abs().sum(-1)
    assert diff[:, 0].min() > 0 and diff[:, 1:].max() == 0
    with pytest.raises(BadInput):
        ZIPProjection(ctx0, intrinsic_dim=4)


def test_fastfood_roughly_norm_preserving_and_linear():
    ff = Fastfood(m=4, q=62, D=128, seed=0)
    w = torch.randn(256, 4, 62)
    y = ff(w)
    ratio = y.norm(dim=-1) / w.norm(dim=-1)
    assert 0.5 < ratio.mean() < 1.5
    assert torch.allclose(ff(2 * w[:2] + w[2:4]), 2 * y[:2] + y[2:4], atol=1e-4)


def test_random_projection_bbt_std_and_decode():
    assert RandomProjection.bbt_std(0.02, 500, 1.0) == pytest.approx(0.02 / math.sqrt(500))
    p = RandomProjection(torch.zeros(4, 16), 8, std=0.5, seed=0)
    assert p.A.shape == (64, 8) and abs(float(p.A.std()) - 0.5) < 0.1
    z = torch.randn(3, 8)
    assert torch.allclose(p.decode(z), (z @ p.A.T).view(3, 4, 16))
    assert torch.equal(Direct(torch.ones(2, 3)).decode(torch.arange(6.0)), torch.arange(6.0).view(1, 2, 3))


def test_one_sided_rgf_formula_and_cost():
    from bbpt.optim import OneSidedRGF

    est, d = OneSidedRGF(q=5), 40
    torch.manual_seed(0)  # w and a below: float32 rounding of (L(w + βu) - L(w)) / β depends on them
    g = torch.Generator().manual_seed(0)
    u = est.directions(d, g)
    assert u.shape == (5, d) and torch.allclose(u.norm(dim=1), torch.ones(5))
    w, beta = torch.randn(d), 0.01
    pts = est.points(w, u, beta)
    assert est.evals(d) == 6 and torch.equal(pts[0], w) and torch.allclose(pts[1:], w + beta * u)
    a = torch.randn(d)  # linear loss: the one-sided difference is exact
    losses = pts @ a
    ghat = est.estimate(losses, u, beta)
    assert torch.allclose(ghat, (d / 5) * sum(u[j] * (u[j] @ a) for j in range(5)), atol=1e-3)
    # unbiased: E[(d/q) Σ u uᵀ] a = a for unit-uniform u
    gen, acc, n = torch.Generator().manual_seed(1), torch.zeros(d), 4000
    for _ in range(n):
        u = est.directions(d, gen)
        acc += est.estimate(est.points(w, u, beta) @ a, u, beta)
    assert torch.nn.functional.cosine_similarity(acc / n, a, dim=0) > 0.95


def test_poly_decay_schedule():
    from bbpt.optim import PolyDecay

    s = PolyDecay(lr0=10.0, lr_min=0.1, total=100, power=0.9, frac=0.9, beta=0.01)
    # the official trainers count the decay step before the step: the first step has t = 1
    assert s.a_k(1) == pytest.approx(9.9 * (1 - 1 / 90) ** 0.9 + 0.1)
    assert s.a_k(45) == pytest.approx(9.9 * (1 - 45 / 90) ** 0.9 + 0.1)
    assert PolyDecay(total=10).a_k(1) == pytest.approx(9.9 * (1 - 1 / 9) ** 0.9 + 0.1)  # 17 % below t = 0's
    assert s.a_k(90) == pytest.approx(0.1) and s.a_k(500) == pytest.approx(0.1)
    assert s.c_k(7) == 0.01


def test_cmaes_checkpoint_continues_the_same_samples(tmp_path):
    """pycma samples from numpy's global RNG: its pickle must not freeze a copy of it, or a
    resumed strategy draws other samples (and other numpy use must not perturb the stream)."""
    from bbpt.state import load_state, save_state

    f = lambda z: (z**2).sum(1)  # noqa: E731
    a = CMAES(torch.zeros(64), 1.0, 10, seed=3)
    for _ in range(2):
        z = a.ask()
        a.tell(f(z))
    save_state(tmp_path / "c.safetensors", {"es": a.state_dict()})
    b = CMAES(torch.zeros(64), 1.0, 10, seed=99)
    b.load_state_dict(load_state(tmp_path / "c.safetensors")["es"])
    for _ in range(3):
        np.random.rand(7)  # unrelated global numpy use in between
        za, zb = a.ask(), b.ask()
        assert torch.equal(za, zb)
        a.tell(f(za))
        b.tell(f(zb))
    assert torch.equal(a.best, b.best)


def test_cmaes_reask_is_an_untold_ask_on_the_live_strategy():
    """CraFT's (and SharpZO's release's) re-ask: two in a row give two populations, each drawn
    from the optimiser's own stream exactly as a plain ``es.ask()`` on pycma draws it, and the
    next generation continues after them (the official loop's sequence ask, tell, ask, ask)."""
    import cma

    d, pop = 512, 40
    opt = CMAES(torch.zeros(d), 1.0, popsize=pop, seed=3, bound=5.0)
    ref = cma.CMAEvolutionStrategy(d * [0], 1.0, {"seed": 3, "popsize": pop, "verbose": -9, "bounds": [-5, 5],
                                                  "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA})
    for _ in range(2):
        x, X = opt.ask(), ref.ask()
        assert torch.allclose(x, torch.tensor(np.array(X)).float())
        f = (x.double() ** 2).sum(1)
        opt.tell(f)
        ref.tell(X, f.tolist())
        r1, r2 = opt.reask(), opt.reask()
        R1, R2 = ref.ask(), ref.ask()
        assert not torch.equal(r1, r2)
        assert torch.allclose(r1, torch.tensor(np.array(R1)).float()) and torch.allclose(r2, torch.tensor(np.array(R2)).float())
    assert torch.allclose(opt.ask(), torch.tensor(np.array(ref.ask())).float())
    assert isinstance(opt.es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaCSA)


def test_cmaes_reask_under_tpa_is_refused_with_the_fix():
    opt = CMAES(torch.zeros(512), 1.0, popsize=40, seed=0, step_size="pycma")
    x = opt.ask()
    opt.tell((x**2).sum(1))
    with pytest.raises(BadInput, match="step_size='csa'"):
        opt.reask()


def test_every_optimiser_speaks_the_protocol_and_tell_returns_its_stats():
    from bbpt.optim import Optimiser

    f = quad(torch.ones(5))
    zo = ZOSGD(torch.zeros(5), SPSA(2), SPSASchedule(), clip="intrinsic", seed=1)
    es = CMAES(torch.zeros(5), 0.5, 6, seed=1)
    for opt in (zo, es):
        assert isinstance(opt, Optimiser)
        stats = opt.tell(f(opt.ask()))
        assert all(type(v) is float for v in stats.values()), stats
    stats = zo.tell(f(zo.ask()))
    assert set(stats) == {"grad_norm", "clip", "lr"} and stats == zo.last
    assert stats["lr"] == SPSASchedule().a_k(2) and 0 < stats["clip"] <= 1
    assert stats["grad_norm"] == pytest.approx(float(zo.last_grad.norm()) / stats["clip"])
    before = es.sigma
    stats = es.tell(f(es.ask()))
    assert set(stats) == {"sigma"} and stats["sigma"] == es.sigma != before
    # the checkpoint formats are unchanged (old checkpoints resume)
    assert set(zo.state_dict()) == {"w", "k", "m", "gen", "mask", "pending", "last"}
    assert set(es.state_dict()) == {"es", "rng", "asked"}


def test_zosgd_move_to_and_set_mask_keep_the_step_count_and_stream():
    f = quad(torch.ones(4))
    a = ZOSGD(torch.zeros(4), RGE(1), Constant(0.1, 1e-3), seed=5)
    b = ZOSGD(torch.zeros(4), RGE(1), Constant(0.1, 1e-3), seed=5)
    for opt in (a, b):
        opt.tell(f(opt.ask()))
    w = torch.tensor([[3.0, -1.0], [0.5, 2.0]])  # any shape of d elements
    a.move_to(w)
    w[0, 0] = 99.0  # a copy is kept, not the caller's tensor
    assert torch.equal(a.w, torch.tensor([3.0, -1.0, 0.5, 2.0])) and a.k == b.k == 2
    b.w = torch.tensor([3.0, -1.0, 0.5, 2.0])  # the same move by hand: the same next step
    a.set_mask(torch.tensor([0, 1, 1, 0]))
    b.mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    for opt in (a, b):
        opt.tell(f(opt.ask()))
    assert torch.equal(a.w, b.w) and a.w[0] == 3.0 and a.w[3] == 2.0 and a.w[1] != -1.0
    a.set_mask(None)
    assert a.mask is None
    with pytest.raises(BadInput, match="3 elements, the optimiser 4"):
        a.move_to(torch.zeros(3))
    with pytest.raises(BadInput, match="5 elements, the optimiser 4"):
        a.set_mask(torch.ones(5))
