"""BlackVIP against the official code (fixtures from ``tools/parity/blackvip.py``): the
coordinator's decoder layer for layer (``DecoderManual``, ``trainers/visual_prompters.py``)
and three SPSA-GC steps (``trainers/blackvip.py``) on the toy CLIP at 224 px."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from parity_model import ToyBackbone, close, load
from toy import encode_image_pooled, stub_encoder

import bbpt.methods.blackvip as bv
from bbpt.methods.base import make_config


@pytest.fixture(autouse=True)
def one_thread():
    """The decoder's small transposed convolutions at 224 px run far faster on one CPU thread
    (40 ms against 0.5 s a forward on a busy 2-core machine); restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def up(pixels: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(np.repeat(pixels, k, axis=1), k, axis=2)  # every toy pixel a k×k block


class ToyCLIP224(ToyBackbone):
    """The toy CLIP behind bbpt's backbone protocol at 224 px with CLIP's normalisation: the
    image features read the normalised image through block means (``toy.encode_image_pooled``),
    as the fixture's official ``clip_model.visual`` does."""

    def __init__(self, arrays, classnames, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        super().__init__(arrays, classnames)
        self.image_size = 224

    def encode_images(self, pixels):
        return encode_image_pooled(self.toy, self.normalize(pixels))


class StubEncoder(torch.nn.Module):
    """The fixture's stub of the MAE encoder, fed [0, 1] pixels: z of the normalised image."""

    def __init__(self, bb: ToyCLIP224, w):
        super().__init__()
        self.bb, self.w = bb, torch.from_numpy(np.asarray(w)).float()

    def forward(self, pixels):
        return stub_encoder(self.bb.normalize(pixels), self.w)


def official_deltas(seed: int, d: int, n: int, steps: int) -> list[torch.Tensor]:
    """The perturbations as the official ``spsa_grad_estimate_bi`` draws them from torch's
    generator after ``torch.manual_seed(seed)``: |Δ| = (rand + 1) / 2, negative where
    bernoulli(1/2) is 1, one perturbation after the other; (n, d) per step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(n):
            p = (torch.rand(d, generator=g).reshape(-1, 1) + 1) / 2
            neg = torch.bernoulli(torch.ones_like(p) / 2, generator=g).bool()
            rows.append(torch.where(neg, -p, p).reshape(-1))
        out.append(torch.stack(rows))
    return out


def checked_deltas(fx) -> list[torch.Tensor]:
    cfg = fx["inputs"]["cfg"]
    deltas = official_deltas(fx["inputs"]["seed"], len(fx["w0"]), cfg["sp_avg"], len(fx["trajectory"]))
    for k, (dirs, off) in enumerate(zip(deltas, fx["trajectory"])):
        close(dirs[:, :16], off["delta_head"], rtol=0, atol=0, what=f"step {k + 1} Δ (first values)")
        got = [hashlib.sha256(d.contiguous().numpy().tobytes()).hexdigest() for d in dirs]
        assert got == off["delta_sha256"], f"step {k + 1}: Δ is not the official draw (torch's generator changed?)"
    return deltas


def build(fx, monkeypatch, **opts):
    """bbpt's BlackVIP on the fixture's toy model, images and stub encoder, fed the official Δ
    and the fixture's one batch (its 2 images in stored order)."""
    from bbpt.data.core import ImageSet
    from bbpt.methods.base import Env, FewShotData
    from bbpt.models import BlackBox, QueryMeter

    inp = fx["inputs"]
    arrays, classnames = inp["model"], list(inp["classnames"])
    bb = ToyCLIP224(arrays, classnames, inp["mean"], inp["std"])
    n = len(arrays["labels"])
    images = ImageSet(labels=arrays["labels"], ids=np.array([f"img{i}" for i in range(n)]),
                      array=up(arrays["pixels"], inp["upsample"]))
    box = BlackBox(bb, classnames, QueryMeter({}))
    data = FewShotData(images, bb.image_size)
    task = {"name": "toy", "classnames": classnames, "templates": list(inp["templates"])}
    env = Env(box, data, task, inp["seed"], bv.BlackVIP, white_box=lambda: None)
    monkeypatch.setattr(bv, "make_encoder", lambda kind: StubEncoder(bb, arrays["w_z"]))
    o, c, a, alpha, gamma = inp["cfg"]["spsa_params"]
    cfg = make_config(bv.BlackVIP, {"encoder": "conv", "batch_size": n, "n_perturb": inp["cfg"]["sp_avg"],
                                    "perturbation": "segmented", "a": a, "c": c, "o": o, "alpha": alpha, "gamma": gamma,
                                    "momentum": inp["cfg"]["moms"], "p_eps": inp["cfg"]["p_eps"], **opts})
    m = bv.BlackVIP(cfg, env)

    deltas = checked_deltas(fx)
    m.opt.est.directions = lambda d, gen: deltas[m.opt.k - 1].clone()  # ask and tell of step k

    class OneBatch:
        def next(self):
            return data.images(np.arange(n)), data.labels

    m.batches = OneBatch()
    return m


def run_steps(m, fx, steps: int = 3):
    """Per step: bbpt's 10 losses, then (the official losses told, so that the estimate is
    compared on the same inputs, not through float32 noise amplified ~100x by 1 / 2c_kΔ) ĝ,
    the update, a_k, c_k and the BatchNorm buffers."""
    seen = {}
    tell = m.opt.tell

    def spy(losses):
        seen["losses"] = losses.clone()
        stats = tell(torch.from_numpy(fx["trajectory"][m.opt.k - 1]["losses"]))
        seen["ghat"] = m.opt.last_grad.clone()
        return stats

    m.opt.tell = spy
    out = []
    for _ in range(steps):
        k, w = m.opt.k, m.opt.w.clone()
        m.step(None)
        out.append({"losses": seen["losses"], "ghat": seen["ghat"], "update": w - m.opt.w, "w": m.opt.w.clone(),
                    "m": m.opt.m.clone(), "a_k": m.opt.sched.a_k(k),
                    "c_k": m.opt.sched.c_k(k), "bn": {k: v.clone() for k, v in m.decoder.state_dict().items()
                                                     if "running" in k or "num_batches" in k}})
    return out


# ---- the decoder ---------------------------------------------------------------------------
def test_decoder_is_the_official_decoder_manual_layer_for_layer():
    """At 224 px with a 768-d z: the same state dict (names, shapes, order), 9,920 parameters,
    the same init after the same seed, the same output in train mode (batch statistics, the
    running statistics updated) and then in eval mode."""
    fx = load("blackvip_decoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fx["inputs"]["seed"])
        dec = bv.Decoder(768, 224)
    assert [[k, list(v.shape)] for k, v in dec.state_dict().items()] == fx["state_dict"]
    assert sum(p.numel() for p in dec.parameters()) == fx["n_params"] == 9920
    w = torch.nn.utils.parameters_to_vector(dec.parameters())
    close(w, fx["w0"], rtol=0, atol=0, what="initial weights")
    inp = fx["inputs"]
    bb_norm = (torch.from_numpy(up(inp["images"], inp["upsample"])).float().div(255).permute(0, 3, 1, 2)
               - torch.tensor(inp["mean"]).view(1, 3, 1, 1)) / torch.tensor(inp["std"]).view(1, 3, 1, 1)
    close(stub_encoder(bb_norm, torch.from_numpy(inp["w_z"]).float()), fx["z"], what="stub encoder z")
    z = torch.from_numpy(fx["z"])
    with torch.no_grad():
        for mode in ("train", "eval"):
            out = dec.train(mode == "train")(z)
            assert out.shape == (4, 3, 224, 224)
            close(out[:, :, :32, :32], fx[mode]["corner"], what=f"{mode} output, corner")
            close(out[:, :, 96:128, 96:128], fx[mode]["centre"], what=f"{mode} output, centre")
            close(out.double().mean((2, 3)), fx[mode]["mean"], what=f"{mode} output, channel means")
            if mode == "train":
                for k, v in fx["train"]["bn"].items():
                    close(dec.state_dict()[k], v, what=k)


def test_an_official_state_dict_loads_one_to_one():
    fx = load("blackvip_decoder")
    dec = bv.Decoder(768, 224)
    w = torch.from_numpy(fx["w0"])
    state, i = {}, 0
    for k, shape in fx["state_dict"]:  # the official names and shapes, parameters in their order
        if "running" in k or "num_batches" in k:
            state[k] = dec.state_dict()[k]
        else:
            n = int(np.prod(shape))
            state[k], i = w[i : i + n].view(shape), i + n
    dec.load_state_dict(state, strict=True)
    close(torch.nn.utils.parameters_to_vector(dec.parameters()), fx["w0"], rtol=0, atol=0, what="loaded")


# ---- SPSA-GC -------------------------------------------------------------------------------
def test_spsa_gc_follows_the_official_steps(monkeypatch):
    """Three steps: the official Δ, the 10 losses in the official order (w + c_kΔ_j, then
    w - c_kΔ_j), a_k, c_k, ĝ, the Nesterov-style update, BatchNorm's running statistics
    after every perturbed forward, and the momentum after step 3."""
    fx = load("blackvip")
    m = build(fx, monkeypatch)
    close(m.opt.w, fx["w0"], rtol=0, atol=0, what="initial weights (the official init under the seed)")
    w = torch.from_numpy(fx["w0"]).clone()
    for k, (got, off) in enumerate(zip(run_steps(m, fx), fx["trajectory"]), 1):
        close(got["a_k"], off["a_k"], rtol=1e-12, what=f"step {k} a_k")
        close(got["c_k"], off["c_k"], rtol=1e-12, what=f"step {k} c_k")
        close(got["losses"], off["losses"], what=f"step {k} losses")
        close(got["ghat"], off["ghat"], what=f"step {k} ĝ")
        close(got["update"], off["update"], what=f"step {k} update")
        w = w - torch.from_numpy(off["update"])
        close(got["w"], w, what=f"step {k} parameters")
        for name, v in off["bn"].items():
            close(got["bn"][name], v, what=f"step {k} {name}")
    close(got["m"], fx["m1"], what="momentum after step 3")


def test_plain_spsa_leaves_the_official_update():
    """The fixture can fail: without SPSA-GC's momentum (plain SPSA) the first update, from
    the same Δ and losses, is the official one divided by 1 + β."""
    from bbpt.optim import SPSA, SPSASchedule, ZOSGD

    fx = load("blackvip")
    off = fx["trajectory"][0]
    o, c, a, alpha, gamma = fx["inputs"]["cfg"]["spsa_params"]
    deltas = checked_deltas(fx)
    beta = fx["inputs"]["cfg"]["moms"]
    for momentum, ratio in ((beta, 1.0), (0.0, 1 + beta)):  # official update / bbpt's
        opt = ZOSGD(torch.from_numpy(fx["w0"]), SPSA(5, "segmented"), SPSASchedule(a=a, c=c, o=o, alpha=alpha, gamma=gamma),
                    momentum=momentum)
        opt.est.directions = lambda d, gen: deltas[0].clone()
        w = opt.w.clone()
        opt.ask()
        opt.tell(torch.from_numpy(off["losses"]))
        got = np.abs(off["update"]).max() / np.abs((w - opt.w).numpy()).max()
        assert got == pytest.approx(ratio, rel=1e-4), (momentum, got)


def test_batchnorm_in_eval_mode_leaves_the_official_losses(monkeypatch):
    """The fixture can fail: a decoder whose BatchNorm ran in eval mode during SPSA (running
    statistics, not the batch's) gives other losses at the first perturbation pair."""
    fx = load("blackvip")
    for mode, departs in (("train", False), ("eval", True)):
        m = build(fx, monkeypatch)
        m.decoder.train(mode == "train")
        images, y = m.batches.next()
        q = m.candidates(m.opt.ask()[:2], images)  # w + c_1Δ_1, w - c_1Δ_1
        losses = m.loss(m.box.query(q.prompt, q.images, q.visual), y)
        gap = np.abs(losses.numpy() - fx["trajectory"][0]["losses"][:2]).max()
        assert (gap > 1e-3) if departs else (gap < 1e-4), (mode, gap)
