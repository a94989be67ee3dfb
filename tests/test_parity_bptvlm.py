"""BPT-VLM against the official code (``ECNU-ICALK/BPT-VLM``, ``BBT_VL_Shallow.py`` with
``shallow_cma``), statement for statement on the toy CLIP with a toy ViT: fixtures written by
``tools/parity/bptvlm.py``; each names its official files, lines and commit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load, toy_env

from bbpt.errors import BadInput
from bbpt.methods.base import Budget
from bbpt.methods.bptvlm import BPTVLM, BPTVLMConfig


def official_config(cfg: dict, **kw) -> BPTVLMConfig:
    """bbpt's options for the official config (``configs/shallow_prompt.yaml`` as the fixture ran it)."""
    return BPTVLMConfig(budget=cfg["budget"], n_text=cfg["n_prompt_tokens_L"], n_visual=cfg["n_prompt_tokens_V"],
                        dim_text=cfg["intrinsic_dim_L"], dim_visual=cfg["intrinsic_dim_V"], popsize=cfg["popsize"],
                        sigma=float(cfg["sigma"]), bound=float(cfg["bound"]), **kw)


def method(fx: dict, **kw) -> tuple[BPTVLM, object]:
    """bbpt's BPT-VLM on the fixture's toy, seeded as the official run (seed 42), with the
    official A_L and A_V injected (the official code draws them from an unseeded torch)."""
    cfg = fx["inputs"]["cfg"]
    box, env = toy_env(fx, BPTVLM, seed=cfg["seed"])
    m = BPTVLM(official_config(cfg, **kw), env)
    m.text.A, m.visual.A = torch.from_numpy(fx["inputs"]["A_L"]), torch.from_numpy(fx["inputs"]["A_V"])
    return m, box


def test_bptvlm_follows_the_official_run_generation_for_generation():
    """Four generations of the method's own step: populations, the decoded text contexts and
    visual tokens, the fitness (mean CE over the whole set, images re-encoded with the visual
    tokens after the patches), then CMA-ES's mean and σ after tell; then the best prompt."""
    fx = load("bptvlm")
    m, box = method(fx)
    rec = {}
    cand, loss = m.candidates, m.loss
    m.candidates = lambda p, im: rec.update(z=p, q=(q := cand(p, im))) or q
    m.loss = lambda lg, y: rec.update(f=(f := loss(lg, y))) or f
    budget = Budget.of(box.meter, "prompt_evals", m.cfg.budget)
    for g, off in enumerate(fx["trajectory"]):
        stats = m.step(budget)
        close(rec["z"], off["population"], what=f"generation {g} population")
        close(rec["q"].prompt.ctx, off["text"], what=f"generation {g} text contexts")
        close(rec["q"].visual.tokens, off["visual"], rtol=1e-5, atol=1e-5, what=f"generation {g} visual tokens")
        close(rec["f"], off["fitness"], rtol=1e-5, atol=1e-5, what=f"generation {g} fitness")
        close(m.opt.mean, off["mean"], what=f"generation {g} mean")
        close(m.opt.sigma, off["sigma"], rtol=1e-7, what=f"generation {g} sigma")
        assert stats["train_loss"] == pytest.approx(off["fitness"].min(), rel=1e-5)
    n = len(fx["trajectory"]) * m.cfg.popsize
    assert box.meter.counts["prompt_evals"] == n and box.meter.images_encoded == n * len(m.data)
    best = fx["inputs"]["best"]  # the official min_loss prompt (eval's best_prompt_text / _image)
    assert m.opt.es.result.fbest == pytest.approx(best["min_loss"], rel=1e-5)
    close(m.prompt().ctx[0], best["text"], what="best text context")
    close(m.extra_state()["visual"], best["visual"], rtol=1e-5, atol=1e-5, what="best visual tokens")
    images, y = m.batches.next()
    acc = float((m.predict(box, images).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(best["test_acc"], abs=1e-6)  # the official final test() (on the same toy images)


def test_bptvlm_focal_fitness_is_the_official_focal_loss():
    fx = load("bptvlm")
    m, box = method(fx, loss="focal")
    images, y = m.batches.next()
    q = m.candidates(torch.from_numpy(fx["trajectory"][0]["population"]), images)
    close(m.loss(box.query(q.prompt, q.images, q.visual), y), fx["inputs"]["focal_fitness"], rtol=1e-5, atol=1e-5,
          what="focal fitness")


def test_bptvlm_cma_es_at_the_official_dimension():
    """The method's defaults are the official config (500 + 500, population 30, σ 1, no bound,
    seed 42's stream): three generations told the official fitness."""
    fx = load("bptvlm_cma")
    cfg, keep = fx["inputs"]["cfg"], fx["inputs"]["keep"]
    assert BPTVLMConfig() == official_config(cfg)  # every default is the official value
    box, env = toy_env(fx, BPTVLM, seed=cfg["seed"])
    m = BPTVLM(BPTVLMConfig(), env)
    assert m.opt.d == cfg["intrinsic_dim_L"] + cfg["intrinsic_dim_V"]
    for g, off in enumerate(fx["trajectory"]):
        z = m.opt.ask()
        close(z[:keep], off["population"], what=f"generation {g} population")
        z64 = np.stack(m.opt._asked)  # what is told: pycma's float64 candidates
        close(z64.sum(1), off["sums"], rtol=1e-9, atol=1e-9, what=f"generation {g} candidate sums")
        close((z64**2).sum(1), off["squares"], rtol=1e-9, atol=1e-9, what=f"generation {g} candidate squares")
        m.opt.tell(torch.from_numpy(off["fitness"]))
        close(m.opt.mean, off["mean"], what=f"generation {g} mean")
        close(m.opt.sigma, off["sigma"], rtol=1e-7, what=f"generation {g} sigma")


def test_bptvlm_cma_es_at_40_dimensions():
    """Where pycma 4.5's CSA damps more than the releases' (mu_eff ~ 8.4 at population 30, d = 40:
    d_σ 1.68 against 1.21, σ 1.5 % off after the first tell): bbpt's CSA keeps pycma 4.0's
    damping (bbpt.optim.CSA). What remains is 4.5's exact χ_N against 4.0's series, about 1e-6 of σ
    over four generations here, within float32 tolerance."""
    fx = load("bptvlm_d40")
    cfg = fx["inputs"]["cfg"]
    box, env = toy_env(fx, BPTVLM, seed=cfg["seed"])
    m = BPTVLM(official_config(cfg), env)
    for g, off in enumerate(fx["trajectory"]):  # the χ_N residual moves samples by ~2e-6 by generation 3
        close(m.opt.ask(), off["population"], atol=1e-5, what=f"generation {g} population")
        m.opt.tell(torch.from_numpy(off["fitness"]))
        close(m.opt.mean, off["mean"], atol=1e-5, what=f"generation {g} mean")
        close(m.opt.sigma, off["sigma"], rtol=1e-5, what=f"generation {g} sigma")


def test_pycmas_own_step_size_rule_leaves_the_official_bptvlm_trajectory():
    """The fixture can fail: pycma 4.5's TPA (its default at d >= 300) departs at generation 2."""
    fx = load("bptvlm_cma")
    box, env = toy_env(fx, BPTVLM, seed=fx["inputs"]["cfg"]["seed"])
    m = BPTVLM(BPTVLMConfig(step_size="pycma"), env)
    gaps = []
    for off in fx["trajectory"][:2]:
        z = m.opt.ask()
        gaps.append(float(np.abs(z[: fx["inputs"]["keep"]].numpy() - off["population"]).max()))
        m.opt.tell(torch.from_numpy(off["fitness"]))
    assert gaps[0] < 1e-5 and gaps[1] > 1e-2


def test_visual_tokens_after_cls_would_leave_the_official_fitness():
    """The fixture can fail: the tokens where the official comment puts them (after CLS, before
    the patches) score otherwise than where its code puts them (after the patches)."""
    fx = load("bptvlm")
    m, box = method(fx)
    off = fx["trajectory"][0]
    images, y = m.batches.next()
    q = m.candidates(torch.from_numpy(off["population"]), images)
    bb = box._bb
    append = bb.encode_tokens
    bb.encode_tokens = lambda x, p=None: append(torch.cat([x[:, :1], p, x[:, 1:]], dim=1))  # after CLS
    f = m.loss(box.query(q.prompt, q.images, q.visual), y)
    assert float((f - torch.from_numpy(off["fitness"])).abs().max()) > 1e-2


def test_the_official_init_from_the_models_statistics():
    """embedding_std, conv_mean, conv_std give A_L, A_V the official distributions
    (``model/Shallow_Prompt_CLIP.py`` 55-76); by default bbpt estimates them from the API."""
    fx = load("bptvlm")
    arrays, stats = fx["inputs"]["model"], fx["inputs"]["init"]
    emb, conv = stats["Embedding"], stats["Conv"]
    # the official statistics are numpy's over the whole tables (population std)
    assert np.std(arrays["token_embedding"]) == pytest.approx(emb["std_hat"], rel=1e-6)
    assert np.mean(arrays["vit_conv1"]) == pytest.approx(conv["mu_hat"], rel=1e-5)
    assert np.std(arrays["vit_conv1"]) == pytest.approx(conv["std_hat"], rel=1e-6)
    cfg = fx["inputs"]["cfg"]
    box, env = toy_env(fx, BPTVLM, seed=cfg["seed"])
    m = BPTVLM(official_config(cfg, embedding_std=emb["std_hat"], conv_mean=conv["mu_hat"],
                               conv_std=conv["std_hat"]), env)
    assert m.proj_init["text"] == pytest.approx((emb["mu"], emb["std"]), rel=1e-6)
    assert m.proj_init["visual"] == pytest.approx((conv["mu"], conv["std"]), rel=1e-6)
    A_V = m.visual.A
    assert float(A_V.mean()) == pytest.approx(conv["mu"], abs=4 * conv["std"] / A_V.numel() ** 0.5)
    assert float(A_V.std()) == pytest.approx(conv["std"], rel=0.05)
    default = BPTVLM(official_config(cfg), env)  # the black-box estimates: another scale, A_V centred
    assert default.proj_init["visual"][0] == 0.0 and default.proj_init["text"][1] != pytest.approx(emb["std"], rel=1e-3)
    with pytest.raises(BadInput, match="conv_mean and conv_std"):
        BPTVLM(official_config(cfg, conv_std=1.0), env)
