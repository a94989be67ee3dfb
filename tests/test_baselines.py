"""The remaining baselines: BAR, BlackVIP, BPT-VLM and the white-box CoOp reference."""
import pytest
import torch
import torch.nn.functional as F

from bbpt.engine import make_run_config, run
from bbpt.errors import BadInput
from bbpt.methods.bar import frame_mask, inner_size, reprogram
from bbpt.methods.common import ce_per_candidate, focal_per_candidate
from test_methods import build


# ---- BAR --------------------------------------------------------------------------------
def test_bar_frame_size_and_mask():
    assert inner_size(224, 194 / 224) == 194 and inner_size(32, 194 / 224) == 28
    m = frame_mask(224, 194)
    assert m.sum() == 224**2 - 194**2 and m[15:209, 15:209].sum() == 0 and m[14, 100] == 1 and m[209, 100] == 1
    px = torch.rand(2, 3, 32, 32)
    W = torch.randn(3, 3, 32, 32)
    out = reprogram(px, W, 28)  # (P, B, 3, S, S)
    assert out.shape == (3, 2, 3, 32, 32)
    small = F.interpolate(px, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(out[1, :, :, 2:30, 2:30], small.clamp(0, 1))  # the image, shrunk into the centre
    frame = frame_mask(32, 28).bool()
    assert torch.allclose(out[1][:, :, frame], torch.sigmoid(W[1])[:, frame].expand(2, -1, -1))  # sigmoid(W) · M


def test_focal_loss_formula():
    logits, y = torch.randn(3, 7, 5), torch.randint(0, 5, (7,))
    p = logits.softmax(-1)[:, torch.arange(7), y]  # (P, B) probability of the true class
    assert torch.allclose(focal_per_candidate(logits, y, 2.0), ((1 - p) ** 2 * -p.log()).mean(1), atol=1e-6)
    assert torch.allclose(focal_per_candidate(logits, y, 0.0), ce_per_candidate(logits, y), atol=1e-6)


def test_bar_step_is_one_sided_rgf_with_6_calls(mini):
    m, box, _ = build("bar", mini, dataset="fashion-mnist", shots=16)
    assert m.opt.d == 3 * 32 * 32 and m.inner == 28
    assert m.opt.sched.total == 5000 // 6  # decay horizon: the steps the budget allows
    w0 = m.opt.w.clone()
    m.step()
    assert box.meter.counts == {"api_calls": 6, "prompt_evals": 6, "images_forwarded": 6 * 128}
    assert box.meter.images_encoded == 6 * 128 and box.cached_images == 0  # prompted pixels: no cache
    T = 0.9 * (5000 // 6)  # the official trainers count the decay step first: t = 1 at the first step
    assert m.opt.last["lr"] == pytest.approx(9.9 * (1 - 1 / T) ** 0.9 + 0.1) and not torch.equal(m.opt.w, w0)


# ---- BlackVIP ------------------------------------------------------------------------------
def test_blackvip_coordinator_and_spsa_gc_step(mini):
    m, box, _ = build("blackvip", mini, dataset="fashion-mnist", shots=16, encoder="conv")
    dec = m.decoder
    assert dec(torch.randn(4, 64)).shape == (4, 3, 32, 32)
    assert dec.p_trigger.shape == (1, 32 * 4 * 4 - 64) and dec.p_trigger.min() >= 0 and dec.p_trigger.max() <= 0.1
    assert all(p.requires_grad is False for p in m.encoder.parameters())  # the encoder is frozen
    # one SPSA-GC step: w1 = w0 - a_1 (g + β m), m = g at step 1 -> w0 - a_1 (1 + β) g
    w0 = m.opt.w.clone()
    out = m.step()
    g = m.opt.m  # the first momentum equals the first (unclipped) estimate
    a1 = 0.01 / (1 + 1.0) ** 0.4
    assert torch.allclose(m.opt.w, w0 - a1 * (1 + 0.9) * g, atol=1e-6)
    assert box.meter.counts["api_calls"] == 10 and box.meter.images_encoded == 10 * 128
    assert out["train_loss"] > 0
    # second step: m2 = β g1 + g2, update g2 + β m2
    w1, m1 = m.opt.w.clone(), m.opt.m.clone()
    m.step()
    g2 = m.opt.m - 0.9 * m1
    a2 = 0.01 / (2 + 1.0) ** 0.4
    assert torch.allclose(m.opt.w, w1 - a2 * (g2 + 0.9 * m.opt.m), atol=1e-6)


def test_blackvip_decoder_official_at_224_reduced_below():
    """224 px, 768-d z: the official DecoderManual (5 stages from 7×7, 9,920 parameters; the
    layer-by-layer parity is tests/test_parity_blackvip.py). 32 px: its last two blocks and the
    RGB conv from a 4×4 source grid; 28 px: its last block from 7×7."""
    from bbpt.methods.blackvip import Decoder

    def layout(dec):
        return [(type(l).__name__, getattr(l, "in_channels", None), getattr(l, "out_channels", None),
                 getattr(l, "groups", None), getattr(l, "bias", None) is not None) for l in dec.body
                if isinstance(l, torch.nn.ConvTranspose2d)]

    d224 = Decoder(768, 224)
    assert d224.s0 == 7 and d224.p_trigger.shape == (1, 800) and sum(p.numel() for p in d224.parameters()) == 9920
    ct = "ConvTranspose2d"
    assert layout(d224) == [(ct, 32, 64, 32, True), (ct, 64, 64, 1, False), (ct, 64, 64, 64, True), (ct, 64, 32, 1, False),
                            (ct, 32, 32, 32, True), (ct, 32, 32, 1, False), (ct, 32, 32, 32, True), (ct, 32, 16, 1, False),
                            (ct, 16, 3, 1, False)]
    d32 = Decoder(128, 32)  # the embedded mini's encoder
    assert d32.s0 == 4 and layout(d32) == layout(d224)[4:] and sum(p.numel() for p in d32.parameters()) == 2528
    assert d32(torch.randn(2, 128)).shape == (2, 3, 32, 32)
    d28 = Decoder(128, 28)
    assert d28.s0 == 7 and layout(d28) == layout(d224)[6:] and d28(torch.randn(2, 128)).shape == (2, 3, 28, 28)
    assert Decoder(768, 32).s0 == 8  # a 4×4 grid cannot hold 768 features: one stage fewer
    with pytest.raises(BadInput, match="cannot write a 33 px prompt"):
        Decoder(64, 33)


def test_blackvip_old_saved_prompt_is_refused_clearly(mini):
    from bbpt.errors import CorruptCheckpoint
    from bbpt.methods.blackvip import BlackVIP

    m, box, _ = build("blackvip", mini, dataset="fashion-mnist", shots=1, encoder="conv")
    extra = m.extra_state()
    assert "decoder.p_trigger" in extra and "decoder.body.0.weight" in extra
    images = m.data.images([0, 1])
    assert BlackVIP.apply(m.prompt(), extra, box, images).shape == (2, 10)
    old = {k: v for k, v in extra.items() if not k.startswith("decoder.")}
    old.update({"decoder.trigger": torch.zeros(448), "decoder.net.0.weight": torch.zeros(32, 1, 2, 2)})
    with pytest.raises(CorruptCheckpoint, match="prompt was saved by an older bbpt"):
        BlackVIP.apply(m.prompt(), old, box, images)
    state = m.state_dict()
    state["decoder"] = {"__state_dict__": {"trigger": torch.zeros(448), "net.0.weight": torch.zeros(32, 1, 2, 2)}}
    with pytest.raises(CorruptCheckpoint, match="checkpoint was saved by an older bbpt"):
        m.load_state_dict(state)
    m.load_state_dict(m.state_dict())  # a current one loads


def test_blackvip_prompted_image_is_clamped_and_scaled(mini):
    from bbpt.methods.blackvip import prompted

    x, p = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    std = (0.25, 0.5, 1.0)
    out = prompted(x, p, 0.3, std)
    ref = (x + 0.3 * p * torch.tensor(std).view(1, 3, 1, 1)).clamp(0, 1)
    assert torch.equal(out, ref) and out.min() >= 0 and out.max() <= 1


# ---- BPT-VLM -------------------------------------------------------------------------------
def test_bptvlm_tokens_and_query_cost(mini):
    m, box, _ = build("bptvlm", mini, dataset="fashion-mnist", shots=16, popsize=6)
    assert m.opt.d == 1000 and m.text.ctx0.shape == (8, box.ctx_dim) and m.visual.ctx0.shape == (5, 128)
    text, vis = m.decode(torch.zeros(2, 1000))
    assert torch.equal(text.ctx, torch.zeros(2, 8, box.ctx_dim)) and vis.tokens.shape == (2, 5, 128)
    m.step()  # one generation: 6 candidates on the whole 160-image set, re-encoded
    assert box.meter.counts == {"api_calls": 6 * 2, "prompt_evals": 6, "images_forwarded": 6 * 160}
    assert box.meter.images_encoded == 6 * 160 and box.cached_images == 0
    z = build("bptvlm", mini, dataset="fashion-mnist", shots=16, preset="zip")[0]
    assert z.opt.d == 4000 and z.cfg.popsize == 15 and z.cfg.budget_unit == "api_calls" and z.cfg.budget == 5000


# ---- CoOp (white box) ----------------------------------------------------------------------
def test_coop_is_white_box_and_learns(mini):
    m, box, _ = build("coop", mini, dataset="fashion-mnist", shots=4, epochs=20)
    assert type(m).black_box is False and m.ctx.shape == (16, box.ctx_dim)
    assert m.lr_at(0) == 1e-5 and m.lr_at(10) == pytest.approx(0.5 * 0.002 * (1 + torch.cos(torch.tensor(torch.pi / 2))))
    first = m.step()["train_loss"]
    losses = [m.step()["train_loss"] for _ in range(19)]
    assert m.step() is None  # 20 epochs, then done
    assert losses[-1] < first - 0.1
    assert box.meter.counts["api_calls"] == 20 * 1  # 40 images / batch 32: one batch per epoch (drop_last)
    r = run(make_run_config(method="coop", dataset="shapes", shots=1, seed=1, options={"epochs": 3}), progress=False)
    assert r.black_box is False and len(r.curve) >= 2


@pytest.mark.slow
def test_bar_beats_zero_shot_with_more_queries():
    """BAR's frame does learn what zero-shot lacks, given queries: at 12000 api_calls (2000 RGF
    steps, paper settings otherwise) it is above zero-shot on mnist and fashion-mnist (measured
    on mini v1: 73.8 vs 72.6 and 59.4 vs 57.4, seed 1), where its default 5000 calls are not
    enough. Not yet rerun on the shipped (retrained) mini, where BAR at 5000 calls is 11 and 6
    points below zero-shot on these tasks."""
    for task in ("mnist", "fashion-mnist"):
        zs = run(make_run_config(method="zeroshot", dataset=task, shots=16, seed=1), progress=False)
        r = run(make_run_config(method="bar", dataset=task, shots=16, seed=1, options={"budget": 12000}), progress=False)
        assert r.queries["api_calls"] == 12000
        assert r.accuracy.test > zs.accuracy.test, (task, r.accuracy.test, zs.accuracy.test)


def test_budget_unit_override_compares_at_equal_api_calls():
    """bbt counts prompt_evals by default; budget_unit=api_calls puts it on ZIP's unit."""
    r = run(make_run_config(method="bbt", dataset="shapes", shots=16, seed=1,
                            options={"budget": 90, "budget_unit": "api_calls", "popsize": 20}), progress=False)
    # 160 images = 2 api_calls per candidate: 2 generations of 20 fit in 90 calls, a third would not
    assert r.queries["api_calls"] == 80 and r.queries["prompt_evals"] == 40
    assert r.budget["api_calls"] == 90 and r.config["options"]["budget_unit"] == "api_calls"
