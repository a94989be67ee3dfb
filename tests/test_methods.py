"""Seed methods: formula-level checks, exact query counts, determinism, and improvement."""
import copy

import pytest
import torch
import torch.nn.functional as F

from bbpt.data import fewshot_split, load_task
from bbpt.engine import make_run_config, run
from bbpt.errors import BadInput
from bbpt.methods import METHODS, FewShotData, make_config
from bbpt.methods.base import Budget, Env
from bbpt.methods.common import ce_per_candidate, kl_per_candidate
from bbpt.models import BlackBox, QueryMeter
from bbpt.models.whitebox import WhiteBox


def build(name, mini, dataset="shapes", shots=4, seed=1, **opts):
    """A method as the engine builds it; ``m.step()`` is told the budget as the engine tells it."""
    cls = METHODS.get(name)
    cfg = cls.resolve_config(make_config(cls, opts), shots)
    task = load_task(dataset)
    train, _ = fewshot_split(task, shots, seed)
    unit = cls.unit(cfg)
    meter = QueryMeter({unit: cfg.budget} if cfg.budget else {})
    box = BlackBox(mini, task.classnames, meter)
    info = {"name": task.name, "classnames": task.classnames, "templates": task.templates}
    env = Env(box, FewShotData(train, box.image_size), info, seed, cls,
              white_box=lambda: WhiteBox(mini, task.classnames, meter))
    m = cls(cfg, env)
    step, budget = m.step, Budget.of(meter, unit, cfg.budget)
    m.step = lambda: step(budget)
    return m, box, task


def test_zip_delta_417_and_10_calls_per_step(mini):
    m, box, _ = build("zip", mini, shots=16)
    assert m.param.dim == 417 and m.opt.threshold == pytest.approx(417**0.5)
    m.step()
    assert box.meter.counts == {"api_calls": 10, "prompt_evals": 10, "images_forwarded": 10 * 128}
    m.step()
    assert box.meter.counts["api_calls"] == 20
    assert m.opt.k == 3


def test_zip_ablations_and_zosgd(mini):
    assert build("zip", mini, low_rank=False)[0].param.dim == 8 * 62 + 62
    assert build("zip", mini, feature_sharing=False)[0].param.dim == 5 * 71
    assert build("zip", mini, clip="none")[0].opt.threshold is None
    assert build("zip", mini, clip=3.0)[0].opt.threshold == 3.0
    z, box, _ = build("zosgd", mini)
    assert z.param.dim == 8 * box.ctx_dim and z.opt.threshold is None
    r = build("zip", mini)[0]
    assert r.prompt().ctx.abs().max() < 0.2  # N(0, 0.02²) context, the official code's init (the default)


def test_zip_starts_from_template_words(mini):
    m, box, task = build("zip", mini, n_ctx=4, ctx_init="template")
    words = box.embed_words(task.templates[0].split("{}")[0].strip())
    assert torch.equal(m.prompt().ctx[0], words[-4:])


def test_craft_fitness_and_head_losses(mini):
    m, box, _ = build("craft", mini, shots=2, popsize=6, intrinsic_dim=32)
    C = box.num_classes
    assert m.lam == pytest.approx(0.1 / C) and m.beta == pytest.approx(0.1 / C)
    # residual head: refined = f + g(f)
    f = torch.randn(3, 5, C)
    assert torch.allclose(m.refine(f) - f, m.head(f), atol=1e-6)
    # capture what CMA-ES is told and the logits it came from
    told, seen = {}, {}
    orig_tell, orig_query = m.opt.tell, m.box.query

    def spy_query(prompt, images, visual=None):
        out = orig_query(prompt, images, visual)
        seen["logits"] = out
        return out

    m.box.query = spy_query
    m.opt.tell = lambda losses: (told.setdefault("f", losses.clone()), orig_tell(losses))[1]
    head0 = copy.deepcopy(m.head)
    m.step()
    logits = seen["logits"]
    with torch.no_grad():
        refined = logits + head0(logits)
        expect = ce_per_candidate(logits, m.data.labels) + m.lam * kl_per_candidate(refined, logits)
    assert torch.allclose(told["f"], expect, atol=1e-5)
    # KL(refined || raw) for the prompt, not the reverse
    assert not torch.allclose(kl_per_candidate(refined, logits), kl_per_candidate(logits, refined))
    # head loss: CE(refined) + β KL(raw || refined), on the aux meter's queries
    assert m.aux_box.meter.counts["prompt_evals"] == 1 and box.meter.counts["prompt_evals"] == 6


def test_craft_head_objective(mini):
    m, box, _ = build("craft", mini, shots=2, popsize=4, intrinsic_dim=16, batch_size=512)
    head0 = copy.deepcopy(m.head)
    f = m.aux_box.query(m.prompt(), m.data.images())[0]
    with torch.no_grad():
        r = f + head0(f)
        expect = F.cross_entropy(r, m.data.labels) + m.beta * kl_per_candidate(f[None], r[None])[0]
    got = m.train_head()  # one batch: the loss before its update
    assert got == pytest.approx(float(expect), rel=1e-5)


def test_craft_budget_by_shots():
    cls = METHODS.get("craft")
    cfg = make_config(cls, {})
    assert [cls.resolve_config(cfg, k).budget for k in (1, 2, 4, 8, 16)] == [2000, 4000, 4000, 8000, 8000]
    assert cls.resolve_config(make_config(cls, {"budget": 123}), 16).budget == 123
    p = cls.resolve_config(make_config(cls, {"preset": "dtd"}), 16)
    assert (p.sigma, p.proj_std, p.lam, p.bias) == (0.02, 1, 0.001, "reask")
    assert p.beta == p.lam  # the official code's one `weight` serves both KL terms
    for name in ("eurosat", "food101", "imagenet"):
        q = cls.resolve_config(make_config(cls, {"preset": name}), 16)
        assert q.beta == q.lam
    imagenet = make_config(cls, {"preset": "imagenet"})  # main_craft_imagenet.py: 4000 at 2-16 shots, 2000 at 1
    assert [cls.resolve_config(imagenet, k).budget for k in (1, 2, 16)] == [2000, 4000, 4000]
    assert cls.resolve_config(make_config(cls, {"preset": "oxford_pets"}), 16).batch_size == 64
    with pytest.raises(BadInput, match="unknown craft preset 'dtdd'; did you mean 'dtd'"):
        cls.resolve_config(make_config(cls, {"preset": "dtdd"}), 16)


def test_sharpzo_cge_cost_and_stage_switch(mini):
    d, pop = 16, 4
    m, box, _ = build("sharpzo", mini, intrinsic_dim=d, popsize=pop, change_point=2, sparsity=0.25)
    m.step()
    assert box.meter.counts["prompt_evals"] == 2 * d + pop  # CGE at the mean, then the population
    m.step()
    assert m.stage == 1 and box.meter.counts["prompt_evals"] == 2 * (2 * d + pop)
    s = m.step()
    assert m.stage == 2 and s["stage"] == 2
    assert box.meter.counts["prompt_evals"] == 2 * (2 * d + pop) + 2  # one RGE pair
    assert int(m.zo.mask.sum()) == 4  # 25 % of 16 coordinates
    moved = (m.zo.w - m.es.mean).abs() > 0
    assert moved.sum() <= 4 and not moved[m.zo.mask == 0].any()


def test_sharpzo_perturbs_candidates_by_eps(mini):
    m, box, _ = build("sharpzo", mini, intrinsic_dim=8, popsize=4, change_point=1, rho=0.5)
    scored, asked = [], []
    orig_decode, orig_ask = m.param.decode, m.es.ask
    m.param.decode = lambda z: (scored.append(z.clone()), orig_decode(z))[1]
    m.es.ask = lambda: (asked.append(orig_ask()), asked[-1])[1]
    m.step()
    cge_points, population = scored
    assert cge_points.shape == (16, 8)  # 2d points around the mean
    assert torch.allclose(cge_points[0] - cge_points[1], torch.eye(8)[0] * 2e-3)
    assert float(m.eps.norm()) == pytest.approx(0.5, rel=1e-5)  # ε = ρ g / ‖g‖
    assert torch.allclose(m.eps, 0.5 * m.grad / m.grad.norm())
    assert torch.allclose(population, asked[0] + m.eps)  # scored at z_i + ε, told as z_i


def test_sharpzo_reask_follows_the_released_rows(mini):
    """reask=True: the CGE at the rows' mean (first U[0, 1) rows, then each untold re-ask), ε of
    radius ρ/√popsize, stage 2 and the prompt from the last re-ask's mean."""
    m, box, _ = build("sharpzo", mini, intrinsic_dim=8, popsize=4, change_point=2, rho=0.5, reask=True, sparsity=1.0)
    z0 = m.z_rows.clone()
    assert torch.equal(z0, build("sharpzo", mini, intrinsic_dim=8, popsize=4, reask=True)[0].z_rows)  # from the seed
    assert 0.2 < float(z0.mean()) < 0.8 and torch.equal(m.prompt().ctx, m.param.decode(z0))
    scored, reasked = [], []
    orig_decode, orig_reask = m.param.decode, m.es.reask
    m.param.decode = lambda z: (scored.append(z.clone()), orig_decode(z))[1]
    m.es.reask = lambda: (reasked.append(orig_reask()), reasked[-1])[1]
    m.step()
    assert torch.allclose(scored[0][0] - 1e-3 * torch.eye(8)[0], z0)  # the CGE around the rows' mean
    assert float(m.eps.norm()) == pytest.approx(0.5 / 4**0.5, rel=1e-5)
    assert torch.equal(m.z_rows, reasked[0].mean(0)) and not torch.equal(m.z_rows, m.es.mean)
    m.step()
    assert torch.allclose(scored[2][0] - 1e-3 * torch.eye(8)[0], reasked[0].mean(0))  # the previous re-ask's
    start = m.z_rows.clone()
    m.step()
    assert m.stage == 2 and len(reasked) == 2
    assert 0 < float((m.zo.w - start).abs().max()) < 1e-2  # one small step from the last re-ask's mean


def test_sharpzo_reask_state_resumes_exactly(mini):
    opts = dict(intrinsic_dim=8, popsize=4, change_point=3, reask=True)
    a, _, _ = build("sharpzo", mini, **opts)
    a.step()
    b, _, _ = build("sharpzo", mini, **opts)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.step(), b.step()
    assert torch.equal(a.z_rows, b.z_rows) and torch.equal(a.es.mean, b.es.mean)
    old = {k: v for k, v in a.state_dict().items() if k != "z_rows"}  # a checkpoint from before the option
    build("sharpzo", mini, intrinsic_dim=8, popsize=4)[0].load_state_dict(old)
    with pytest.raises(ValueError, match="z_rows"):
        build("sharpzo", mini, **opts)[0].load_state_dict(old)


def test_sharpzo_presets_are_the_released_script_on_each_config():
    from bbpt.errors import UnknownName

    cls = METHODS.get("sharpzo")
    assert set(cls.presets) == {"caltech101", "dtd", "eurosat", "fgvc", "food101", "imagenet", "oxford_flowers",
                                "oxford_pets", "stanford_cars", "sun397", "ucf101"}
    for name in cls.presets:
        p = cls.resolve_config(make_config(cls, {"preset": name}), 16)
        assert (p.sparsity, p.reask, p.grad_accumulate_bug, p.lr, p.eps_cge, p.sigma, p.popsize) == (
            1.0, True, True, 1e-3, 1e-3, 0.4, 40)
        assert (p.budget, p.change_point) == (20000, None)  # bbpt's budget and switch, not the script's schedule
        for field, (value, where) in cls.presets[name].values.items():
            assert getattr(p, field) == value and where
    e = cls.resolve_config(make_config(cls, {"preset": "eurosat"}), 16)
    f = cls.resolve_config(make_config(cls, {"preset": "fgvc"}), 16)
    assert (e.proj_std, e.bound, f.proj_std, f.bound) == (1.0, 5.0, 0.2, 0.0)
    mine = cls.resolve_config(make_config(cls, {"preset": "eurosat", "proj_std": 0.5, "reask": False}), 16)
    assert (mine.proj_std, mine.reask, mine.bound) == (0.5, False, 5.0)  # explicit options win
    with pytest.raises(UnknownName):
        cls.resolve_config(make_config(cls, {"preset": "mnist"}), 16)


def test_eval_reproduces_run_test_accuracy(tmp_path):
    """`bbpt eval --prompt`'s public path on the whole test split (test_every_method.py
    re-applies every method's saved prompt on a subset)."""
    from bbpt.engine import evaluate_prompt

    cfg = make_run_config(method="zip", dataset="shapes", shots=2, seed=1, options={"budget": 60})
    r = run(cfg, out=tmp_path / "zip", progress=False)
    e = evaluate_prompt(tmp_path / "zip" / "prompt.safetensors", "shapes", progress=False)
    assert e["accuracy"] == r.accuracy.test and e["method"] == "zip"
    assert (tmp_path / "zip" / "curve.csv").read_text().startswith("api_calls,prompt_evals,train_loss,val_accuracy")


def test_craft_reports_its_head_queries_apart():
    r = run(make_run_config(method="craft", dataset="shapes", shots=2, seed=1, test_subset=200,
                            options={"budget": 80}), progress=False)
    assert r.aux_queries["prompt_evals"] > 0 and r.queries["prompt_evals"] == 80
    assert r.queries_total["prompt_evals"] == r.queries["prompt_evals"] + r.aux_queries["prompt_evals"]


def test_zip_defaults_are_the_official_release():
    """ZIP's defaults where the paper is silent are the official code's: 8 random N(0, 0.02²)
    context tokens, segmented perturbations."""
    cls = METHODS.get("zip")
    cfg = make_config(cls, {})
    assert (cfg.ctx_init, cfg.perturbation, cfg.n_ctx, cfg.n_perturb, cfg.intrinsic_dim, cfg.rank) == (
        "random", "segmented", 8, 5, 500, 5)
    assert cls.Config.source("ctx_init").startswith("official") and cls.Config.source("clip").startswith("paper")


ORIGINS = ("paper", "official", "bbpt", "CoOp", "BBT", "ZIP's re-implementation", "CraFT's", "Dassl")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_option_says_where_its_default_comes_from(name):
    """Every option of every registered method names the source of its default: the paper,
    the official release (file or setting), or bbpt's own choice with the reason."""
    C = METHODS.get(name).Config
    for field in C.model_fields:
        src = C.source(field)
        assert src and src.startswith(ORIGINS) and len(src) > 8, (field, src)


def test_blackvip_and_bar_presets_are_the_releases_per_dataset_table():
    """docs/configuration.md of the BlackVIP release: BlackVIP's moms, gamma, spsa_c, p_eps and
    BAR's init_lr, min_lr per dataset; an explicit option wins."""
    vip, bar = METHODS.get("blackvip"), METHODS.get("bar")
    r = vip.resolve_config(make_config(vip, {"preset": "dtd", "c": 0.02}), 16)
    assert (r.momentum, r.gamma, r.c, r.p_eps) == (0.7, 0.2, 0.02, 0.3)
    r = bar.resolve_config(make_config(bar, {"preset": "eurosat"}), 16)
    assert (r.lr0, r.lr_min) == (5.0, 0.01)
    assert set(vip.presets) == set(bar.presets) and len(vip.presets) == 14
