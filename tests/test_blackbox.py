"""The black-box boundary: soft prompts == text path, fast == slow, caching, meter, errors."""
import threading

import pytest
import torch
import torch.nn.functional as F

from bbpt.errors import BadInput, BudgetExhausted
from bbpt.models import BlackBox, Images, QueryMeter, SoftPrompt, TextPrompt, VisualPrompt, create_backbone

NAMES = ["cat", "sea lion", "ankle boot", "t-shirt", "zero"]


def plain_logits(bb, texts, pixels):
    """open_clip's own path: encode_text on full 77-token ids, encode_image, scaled cosine."""
    with torch.no_grad():
        t = F.normalize(bb.model.encode_text(bb.tokenize(texts)).float(), dim=-1)
        i = F.normalize(bb.model.encode_image(bb.normalize(pixels)).float(), dim=-1)
        return bb.model.logit_scale.exp() * i @ t.T


@pytest.fixture(scope="module")
def openclip_random():
    return {name: create_backbone(name, "random") for name in ("ViT-B-32", "RN50")}


def check_soft_equals_text(bb, n_images=3):
    torch.manual_seed(0)
    px = torch.rand(n_images, 3, bb.image_size, bb.image_size)
    box = BlackBox(bb, NAMES)
    imgs = Images(px, keys=[f"i{k}" for k in range(n_images)])
    hard = box.query(TextPrompt("a photo of a {}."), imgs)  # (1, B, C)
    ctx = box.embed_words("a photo of a")  # (4, D)
    assert ctx.shape == (4, box.ctx_dim)
    soft = box.query(SoftPrompt(ctx[None]), imgs)
    assert hard.shape == soft.shape == (1, n_images, len(NAMES))
    assert torch.equal(hard, soft), (hard - soft).abs().max()
    # class-specific context equal across classes is the same prompt
    soft_cs = box.query(SoftPrompt(ctx[None, None].expand(1, len(NAMES), -1, -1).clone()), imgs)
    assert torch.equal(soft, soft_cs)
    ref = plain_logits(bb, [f"a photo of a {c}." for c in NAMES], px)
    assert torch.allclose(hard[0], ref, atol=1e-4, rtol=1e-5), (hard[0] - ref).abs().max()
    # and a different context really changes the scores
    other = box.query(SoftPrompt(ctx[None] + torch.randn_like(ctx)), imgs)
    assert (other - soft).abs().max() > 1e-3


def test_soft_prompt_equals_text_path_mini(mini):
    check_soft_equals_text(mini)


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_soft_prompt_equals_text_path_openclip(openclip_random, arch):
    check_soft_equals_text(openclip_random[arch], n_images=2)


def test_any_context_length(mini):
    box = BlackBox(mini, NAMES)
    imgs = Images(torch.rand(2, 3, 32, 32))
    for m in (1, 3, 16):
        out = box.query(SoftPrompt(torch.randn(2, m, box.ctx_dim) * 0.02), imgs)
        assert out.shape == (2, 2, len(NAMES))
    with pytest.raises(BadInput, match="longer than"):
        box.query(SoftPrompt(torch.randn(1, 80, box.ctx_dim)), imgs)


def test_cut_is_exact(mini):
    ids = mini.tokenize([f"a photo of a {c}." for c in NAMES])
    emb = mini.text.embed(ids)
    with torch.no_grad():
        full = mini.text.encode(emb, ids, cut=False)
        cut = mini.text.encode(emb, ids, cut=True)
    assert mini.text.real_length(ids) < 15
    assert torch.allclose(full, cut, atol=1e-5), (full - cut).abs().max()


@pytest.mark.parametrize("arch", ["mini", "ViT-B-32"])
def test_fast_equals_slow(mini, openclip_random, arch):
    bb = mini if arch == "mini" else openclip_random[arch]
    torch.manual_seed(1)
    px = torch.rand(3, 3, bb.image_size, bb.image_size)
    imgs = Images(px, keys=["a", "b", "c"])
    base = BlackBox(bb, NAMES).embed_words("a photo of a")
    ctx = base[None] + 0.05 * torch.randn(4, *base.shape)  # 4 candidates
    fast = BlackBox(bb, NAMES, fast=True).query(SoftPrompt(ctx), imgs)
    slow_box = BlackBox(bb, NAMES, fast=False)
    slow = slow_box.query(SoftPrompt(ctx), imgs)
    assert fast.shape == slow.shape == (4, 3, len(NAMES))
    assert torch.allclose(fast, slow, atol=1e-3, rtol=1e-4), (fast - slow).abs().max()
    assert slow_box.cached_images == 0  # the reference path never caches


def test_image_cache_by_key(mini):
    meter = QueryMeter()
    box = BlackBox(mini, NAMES, meter)
    px = torch.rand(4, 3, 32, 32)
    p = TextPrompt("a photo of a {}.")
    a = box.query(p, Images(px, keys=list("abcd")))
    assert meter.images_encoded == 4 and box.cached_images == 4
    b = box.query(p, Images(px[[2, 0]], keys=["c", "a"]))  # all hits
    assert meter.images_encoded == 4
    assert torch.equal(b[0], a[0, [2, 0]])
    box.query(p, Images(px[:2], keys=["a", "e"]))  # one miss
    assert meter.images_encoded == 5
    box.query(p, Images(px[:2]))  # no keys: never cached
    assert meter.images_encoded == 7
    # another class set on the same backbone shares the cache (features don't depend on classes)
    other = box.for_classes(["dog", "cat"])
    other.query(p, Images(px[:1], keys=["a"]))
    assert meter.images_encoded == 7


def test_meter_units_and_hard_budget(mini):
    meter = QueryMeter({"api_calls": 25})
    box = BlackBox(mini, NAMES, meter)
    ctx = torch.zeros(5, 2, box.ctx_dim)
    box.query(SoftPrompt(ctx), Images(torch.rand(200, 3, 32, 32)))  # 5 prompts x ceil(200/128)=2 batches
    assert meter.counts == {"api_calls": 10, "prompt_evals": 5, "images_forwarded": 1000}
    box.query(SoftPrompt(ctx), Images(torch.rand(128, 3, 32, 32)))
    assert meter.counts["api_calls"] == 15
    box.query(SoftPrompt(ctx[:3]), Images(torch.rand(129, 3, 32, 32)))  # 3 x 2 = 6
    assert meter.counts["api_calls"] == 21
    with pytest.raises(BudgetExhausted) as e:
        box.query(SoftPrompt(ctx), Images(torch.rand(128, 3, 32, 32)))  # needs 5 > 4 left
    assert meter.counts["api_calls"] == 21  # refused whole, nothing counted
    assert e.value.counts["api_calls"] == 21 and e.value.budget["api_calls"] == 25
    assert e.value.requested["api_calls"] == 5
    assert "api_calls=21" in str(e.value) and "api_calls=25" in str(e.value)
    box.query(SoftPrompt(ctx[:4]), Images(torch.rand(64, 3, 32, 32)))  # exactly reaches the budget
    assert meter.counts["api_calls"] == 25
    assert meter.remaining() == 0


def test_meter_prompt_eval_budget():
    m = QueryMeter({"prompt_evals": 40})
    m.charge(40, 160)
    with pytest.raises(BudgetExhausted, match="prompt_evals"):
        m.charge(1, 1)


def test_meter_thread_safe():
    m = QueryMeter({"api_calls": 5000})
    errors = []

    def worker():
        for _ in range(1000):
            try:
                m.charge(1, 64)
            except BudgetExhausted:
                errors.append(1)

    ts = [threading.Thread(target=worker) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert m.counts["api_calls"] == 5000 and len(errors) == 3000
    assert m.counts["images_forwarded"] == 5000 * 64


def test_meter_rejects_bad_budget():
    with pytest.raises(BadInput, match="budget unit"):
        QueryMeter({"queries": 10})
    with pytest.raises(BadInput, match="non-negative"):
        QueryMeter({"api_calls": -1})


def test_bad_shapes_are_named(mini):
    box = BlackBox(mini, NAMES)
    p = TextPrompt("a photo of a {}.")
    with pytest.raises(BadInput, match=r"\(B, 3, 32, 32\).*got \(2, 3, 64, 64\)"):
        box.query(p, Images(torch.rand(2, 3, 64, 64)))
    with pytest.raises(BadInput, match=r"got \(2, 4, 100\)"):
        box.query(SoftPrompt(torch.zeros(2, 4, 100)), Images(torch.rand(1, 3, 32, 32)))
    with pytest.raises(BadInput, match="NaN"):
        box.query(SoftPrompt(torch.full((1, 4, box.ctx_dim), float("nan"))), Images(torch.rand(1, 3, 32, 32)))
    with pytest.raises(BadInput, match="no '\\{\\}'"):
        TextPrompt("a photo")
    with pytest.raises(BadInput, match="keys"):
        Images(torch.rand(2, 3, 32, 32), keys=["a"])
    with pytest.raises(BadInput, match="CUDA"):
        BlackBox(mini, NAMES, precision="bf16")


def test_outputs_carry_no_gradient(mini):
    box = BlackBox(mini, NAMES)
    ctx = torch.zeros(1, 2, box.ctx_dim, requires_grad=True)
    out = box.query(SoftPrompt(ctx), Images(torch.rand(1, 3, 32, 32)))
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.gpu
def test_bf16_close_to_fp32_on_cuda():
    bb = create_backbone("mini", device="cuda")
    px = torch.rand(8, 3, 32, 32)
    a = BlackBox(bb, NAMES).query(TextPrompt("a photo of a {}."), Images(px))
    b = BlackBox(bb, NAMES, precision="bf16").query(TextPrompt("a photo of a {}."), Images(px))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


# ---- visual prompts -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mini", "ViT-B-32"])
def test_token_path_without_prompt_equals_encode_image(mini, openclip_random, arch):
    bb = mini if arch == "mini" else openclip_random[arch]
    px = torch.rand(3, 3, bb.image_size, bb.image_size)
    ref = F.normalize(bb.model.encode_image(bb.normalize(px)).float(), dim=-1)
    assert torch.allclose(bb.encode_tokens(bb.patch_tokens(px)), ref, atol=1e-5)


def test_visual_tokens_change_features_and_disable_cache(mini):
    meter = QueryMeter()
    box = BlackBox(mini, NAMES, meter)
    px = torch.rand(6, 3, 32, 32)
    imgs, p = Images(px, keys=[f"k{i}" for i in range(6)]), TextPrompt("a photo of a {}.")
    plain = box.query(p, imgs)
    assert meter.images_encoded == 6 and box.cached_images == 6
    tok = torch.randn(4, 5, box.visual_width) * 0.5  # P = 4 candidates, 5 tokens each
    out = box.query(p, imgs, VisualPrompt(tok))
    assert out.shape == (4, 6, len(NAMES))
    assert meter.images_encoded == 6 + 4 * 6 and box.cached_images == 6  # re-encoded, not cached
    assert (out - plain).abs().amax(dim=(1, 2)).min() > 1e-3  # every candidate's tokens change the scores
    assert meter.counts == {"api_calls": 1 + 4, "prompt_evals": 1 + 4, "images_forwarded": 6 + 24}
    # batched candidates == one at a time; a text prompt per candidate pairs with its tokens
    one = torch.cat([box.query(p, imgs, VisualPrompt(tok[i : i + 1])) for i in range(4)])
    assert torch.allclose(out, one, atol=1e-5)
    ctx = box.embed_words("a photo of a")
    soft = SoftPrompt(torch.stack([ctx, ctx + 0.1 * torch.randn_like(ctx)] * 2))
    both = box.query(soft, imgs, VisualPrompt(tok))
    assert torch.allclose(both[0], out[0], atol=1e-4) and (both[1] - out[1]).abs().max() > 1e-3
    # the same features by hand: tokens appended after the patches, before ln_pre
    x = mini.patch_tokens(px)
    v = mini.model.visual
    h = v.transformer(v.ln_pre(torch.cat([x, tok[0].expand(6, -1, -1)], dim=1)))
    f = F.normalize(v.ln_post(h[:, 0]) @ v.proj, dim=-1)
    t = F.normalize(mini.model.encode_text(mini.tokenize([f"a photo of a {c}." for c in NAMES])), dim=-1)
    assert torch.allclose(out[0], mini.logit_scale * f @ t.T, atol=1e-3)


def test_prompted_pixels_per_candidate(mini):
    meter = QueryMeter()
    box = BlackBox(mini, NAMES, meter)
    px = torch.rand(3, 4, 3, 32, 32)  # P = 3 prompted versions of 4 images
    p = TextPrompt("a photo of a {}.")
    out = box.query(p, Images(px))
    assert out.shape == (3, 4, len(NAMES)) and meter.images_encoded == 12 and box.cached_images == 0
    assert meter.counts["api_calls"] == 3 and meter.counts["images_forwarded"] == 12
    for i in range(3):
        assert torch.allclose(out[i], box.query(p, Images(px[i]))[0], atol=1e-5)
    with pytest.raises(BadInput, match="cannot carry cache keys"):
        Images(px, keys=list("abcd"))
    with pytest.raises(BadInput, match="P or 1"):
        box.query(TextPrompt(("a {}.", "the {}.")), Images(px))  # 2 text prompts for 3 candidates


def test_visual_prompt_errors(mini, openclip_random):
    box = BlackBox(mini, NAMES)
    imgs = Images(torch.rand(2, 3, 32, 32))
    p = TextPrompt("a photo of a {}.")
    with pytest.raises(BadInput, match=r"\(P, n, 128\)"):
        box.query(p, imgs, VisualPrompt(torch.randn(2, 5, 64)))
    with pytest.raises(BadInput, match="NaN"):
        box.query(p, imgs, VisualPrompt(torch.full((1, 2, 128), float("nan"))))
    rn = openclip_random["RN50"]
    rbox = BlackBox(rn, NAMES)
    assert rbox.visual_width is None
    with pytest.raises(BadInput, match="no ViT"):
        rbox.query(p, Images(torch.rand(1, 3, rn.image_size, rn.image_size)), VisualPrompt(torch.randn(1, 2, 64)))


def test_white_box_features_refused_by_black_box(mini):
    box = BlackBox(mini, NAMES)
    ctx = box.embed_words("a photo of a")[None]
    with pytest.raises(BadInput, match="white-box only"):
        box.differentiable_text_features(SoftPrompt(ctx))
    white = BlackBox(mini, NAMES, white_box=True)
    c = ctx.clone().requires_grad_(True)
    white.differentiable_text_features(SoftPrompt(c)).sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
