"""The black-box boundary: soft prompts == text path, fast == slow, caching, meter, errors."""
import threading

import pytest
import torch
import torch.nn.functional as F

from bbpt.errors import BadInput, BudgetExhausted
from bbpt.models import BlackBox, Images, QueryMeter, SoftPrompt, TextPrompt, VisualPrompt, create_backbone

NAMES = ["cat", "sea lion", "ankle boot", "t-shirt", "zero"]


BACKENDS = ["mini", "ViT-B-32", "RN50", "hf-clip", "hf-siglip"]


def plain_logits(bb, texts, pixels):
    """The library's own path (open_clip's encode_text on full ids; transformers'
    get_text_features as the model card pads), the image features, scaled cosine + bias."""
    with torch.no_grad():
        t = F.normalize(bb.library_text_features(texts), dim=-1)
        i = bb.encode_images(pixels)
        return bb.logit_scale * i @ t.T + bb.logit_bias


@pytest.fixture(scope="module")
def openclip_random(backends):
    return backends


def check_soft_equals_text(bb, n_images=3):
    torch.manual_seed(0)
    px = torch.rand(n_images, 3, bb.image_size, bb.image_size)
    box = BlackBox(bb, NAMES)
    imgs = Images(px, keys=[f"i{k}" for k in range(n_images)])
    hard = box.query(TextPrompt("a photo of a {}."), imgs)  # (1, B, C)
    ctx = box.embed_words("a photo of a")  # (m, D): 4 words for CLIP's BPE
    assert ctx.shape == (bb.count_tokens("a photo of a"), box.ctx_dim)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_prompt_equals_text_path(backends, backend):
    check_soft_equals_text(backends[backend], n_images=2)


@pytest.mark.parametrize("backend", ["hf-clip", "hf-siglip"])
def test_hf_soft_prompt_of_the_words_equals_get_text_features(backends, backend):
    """A soft prompt holding the words' own embeddings equals transformers' get_text_features
    (as the model card calls it) within 1e-5: placeholders, EOS pooling (CLIP) or last-position
    pooling at fixed length (SigLIP), causal mask or none, projection."""
    bb = backends[backend]
    box = BlackBox(bb, NAMES)
    ctx = box.embed_words("a photo of a")
    with torch.no_grad():
        soft = box._text_features(SoftPrompt(ctx[None]))[0]  # (C, E)
        ref = F.normalize(bb.library_text_features([f"a photo of a {c}." for c in NAMES]), dim=-1)
    assert soft.shape == ref.shape and torch.allclose(soft, ref, atol=1e-5), (soft - ref).abs().max()
    assert bb.text.prefix == (1 if backend == "hf-clip" else 0) and bb.text.causal == (backend == "hf-clip")


def test_any_context_length(mini):
    box = BlackBox(mini, NAMES)
    imgs = Images(torch.rand(2, 3, 32, 32))
    for m in (1, 3, 16):
        out = box.query(SoftPrompt(torch.randn(2, m, box.ctx_dim) * 0.02), imgs)
        assert out.shape == (2, 2, len(NAMES))
    with pytest.raises(BadInput, match="has 82 tokens, more than the model's 75"):
        box.query(SoftPrompt(torch.randn(1, 80, box.ctx_dim)), imgs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_is_exact(backends, backend):
    bb = backends[backend]
    ids = bb.tokenize([f"a photo of a {c}." for c in NAMES])
    emb = bb.text.embed(ids)
    with torch.no_grad():
        full = bb.text.encode(emb, ids, cut=False)
        cut = bb.text.encode(emb, ids, cut=True)
    if bb.text.causal:
        assert bb.text.real_length(ids) < 15
    else:  # bidirectional (SigLIP): padding is part of the input, nothing is cut
        assert bb.text.real_length(ids) == ids.shape[1]
    assert torch.allclose(full, cut, atol=1e-5), (full - cut).abs().max()


@pytest.mark.parametrize("arch", ["mini", "ViT-B-32", "hf-clip", "hf-siglip"])
def test_fast_equals_slow(backends, arch):
    bb = backends[arch]
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


def test_gradients_only_through_the_white_box(mini):
    from bbpt.models.meter import QueryMeter
    from bbpt.models.whitebox import WhiteBox

    box = BlackBox(mini, NAMES)
    assert not hasattr(box, "differentiable_text_features")
    c = box.embed_words("a photo of a")[None].clone().requires_grad_(True)
    out = box.query(SoftPrompt(c), Images(torch.rand(2, 3, 32, 32)))
    assert not out.requires_grad  # the black box answers numbers, never a graph
    white = WhiteBox(mini, NAMES, QueryMeter())
    feats = white.text_features(SoftPrompt(c))  # (1, C, E)
    feats.sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(feats, box._text_features(SoftPrompt(c.detach())), atol=1e-6)


def test_query_many_equals_queries_one_at_a_time(mini):
    from bbpt.models.blackbox import query_many

    a, b = BlackBox(mini, NAMES), BlackBox(mini, ["cat", "dog", "truck"])
    g = torch.Generator().manual_seed(0)
    ctx = a.embed_words("a photo of a")[None] + 0.01 * torch.randn(3, 4, a.ctx_dim, generator=g)
    x1, x2 = torch.rand(5, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    items = [(a, SoftPrompt(ctx), Images(x1), None), (b, TextPrompt(("a photo of a {}.", "a {}.")), Images(x2), None),
             (a, SoftPrompt(ctx[:1], suffix=" here."), Images(x2), None)]
    together = query_many(items)
    alone = [box.query(p, i, v) for box, p, i, v in items]
    for t, s in zip(together, alone):
        assert t.shape == s.shape and torch.allclose(t, s, atol=1e-5)
    assert a.meter.counts["prompt_evals"] == 2 * (3 + 1) and b.meter.counts["prompt_evals"] == 2 * 2


# ---- refuse before charging -------------------------------------------------------------
ZERO = {"api_calls": 0, "prompt_evals": 0, "images_forwarded": 0}
LONG_CLASS = "very " * 80 + "long cat"


def one_call_box(mini):
    meter = QueryMeter({"api_calls": 1})
    return BlackBox(mini, NAMES, meter), meter


def px(n=2, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, 3, 32, 32)


@pytest.mark.parametrize("case", ["template", "soft", "classname"])
def test_overlong_text_is_refused_before_charging(mini, case):
    box, meter = one_call_box(mini)
    imgs = Images(px(3), keys=["a", "b", "c"])
    if case == "template":
        query, n = lambda: box.query(TextPrompt("a " * 80 + "{}."), imgs), 82  # 80 x 'a', 'cat', '.'
    elif case == "soft":
        query, n = lambda: box.query(SoftPrompt(torch.zeros(1, 90, box.ctx_dim)), imgs), 92  # 90 x 'X', 'cat', '.'
    else:
        long_box = box.for_classes(["cat", LONG_CLASS])
        n = len(mini.tokenizer.encode("a photo of a " + LONG_CLASS + "."))
        query = lambda: long_box.query(TextPrompt("a photo of a {}."), imgs)  # noqa: E731
    for _ in range(2):  # and the refusal is not cached away
        with pytest.raises(BadInput, match=rf"^prompt '.*' .*has {n} tokens, more than the model's 75; ") as e:
            query()
        assert "\n" not in str(e.value)
        assert meter.counts == ZERO and meter.images_encoded == 0 and box.cached_images == 0
    out = box.query(TextPrompt("a photo of a {}."), imgs)  # the one call is still there
    assert out.shape == (1, 3, len(NAMES))
    assert meter.counts == {"api_calls": 1, "prompt_evals": 1, "images_forwarded": 3}
    with pytest.raises(BudgetExhausted):
        box.query(TextPrompt("a photo of a {}."), imgs)


def test_length_limit_is_exact(mini):
    """75 tokens (SOS + 75 + EOT = 77) fit; 76 do not, for templates and for soft prompts."""
    box = BlackBox(mini, ["cat"])
    imgs = Images(px(1))
    assert len(mini.tokenizer.encode("a " * 73 + "cat.")) == 75
    assert box.query(TextPrompt("a " * 73 + "{}."), imgs).shape == (1, 1, 1)
    with pytest.raises(BadInput, match="has 76 tokens"):
        box.query(TextPrompt("a " * 74 + "{}."), imgs)
    assert box.query(SoftPrompt(torch.zeros(1, 73, box.ctx_dim)), imgs).shape == (1, 1, 1)
    with pytest.raises(BadInput, match=r"^prompt 'X X \.\. X cat\.' \(74 context tokens\) has 76 tokens"):
        box.query(SoftPrompt(torch.zeros(1, 74, box.ctx_dim)), imgs)


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls, self.encodes = tok, 0, 0

    def __call__(self, texts):
        self.calls += 1
        return self.tok(texts)

    def encode(self, text):
        self.encodes += 1
        return self.tok.encode(text)


def test_texts_are_tokenised_once(mini, monkeypatch):
    tok = CountingTokenizer(mini.tokenizer)
    monkeypatch.setattr(mini, "tokenizer", tok)
    box = BlackBox(mini, NAMES)
    imgs = Images(px(2))
    for _ in range(3):
        box.query(TextPrompt(("a photo of a {}.", "a {}.")), imgs)
        box.query(SoftPrompt(torch.zeros(2, 4, box.ctx_dim)), imgs)
    assert tok.calls == 2 and tok.encodes == 0  # one fill per cache entry; short texts need no recount
    with pytest.raises(BadInput, match="tokens"):
        box.query(TextPrompt("a " * 80 + "{}."), imgs)
    assert tok.calls == 3 and tok.encodes == 1  # only the window-filling text is counted exactly


BAD_QUERIES = {
    "uint8 pixels": (lambda box: (None, Images((px() * 255).to(torch.uint8)), None), r"torch\.uint8.*\.float\(\) / 255"),
    "bool pixels": (lambda box: (None, Images(px() > 0.5), None), r"torch\.bool.*use pixels\.float\(\)$"),
    "int64 pixels": (lambda box: (None, Images((px() * 255).long()), None), r"torch\.int64.*\.float\(\) / 255"),
    "numpy pixels": (lambda box: (None, Images(px().numpy()), None), "torch.from_numpy"),
    "pixels > 1": (lambda box: (None, Images(px(hi=255.0)), None), r"outside \[0, 1\]"),
    "normalised pixels": (lambda box: (None, Images(px(lo=-2.0, hi=2.0)), None), r"outside \[0, 1\]"),
    "NaN pixels": (lambda box: (None, Images(px().index_fill_(0, torch.tensor([1]), float("nan"))), None), "NaN"),
    "inf pixels": (lambda box: (None, Images(px().index_fill_(0, torch.tensor([0]), float("inf"))), None), "inf"),
    "wrong shape": (lambda box: (None, Images(torch.rand(2, 3, 64, 64)), None), r"got \(2, 3, 64, 64\)"),
    "no images": (lambda box: (None, Images(torch.rand(0, 3, 32, 32)), None), "at least one image"),
    "not Images": (lambda box: (None, px(), None), "bbpt.models.Images"),
    "integer ctx": (lambda box: (SoftPrompt(torch.zeros(1, 4, box.ctx_dim, dtype=torch.long)), None, None), "floating point"),
    "wrong ctx width": (lambda box: (SoftPrompt(torch.zeros(1, 4, 100)), None, None), r"got \(1, 4, 100\)"),
    "NaN ctx": (lambda box: (SoftPrompt(torch.full((1, 4, box.ctx_dim), float("nan"))), None, None), "NaN"),
    "bad visual width": (lambda box: (None, None, VisualPrompt(torch.zeros(1, 5, 64))), r"\(P, n, 128\)"),
    "integer visual": (lambda box: (None, None, VisualPrompt(torch.zeros(1, 5, 128, dtype=torch.int32))), "floating point"),
    "NaN visual": (lambda box: (None, None, VisualPrompt(torch.full((1, 5, 128), float("nan")))), "NaN"),
    "P mismatch": (lambda box: (TextPrompt(("a {}.", "the {}.")), None, VisualPrompt(torch.zeros(3, 2, 128))), "P or 1"),
    "not a prompt": (lambda box: ("a photo of a {}.", None, None), "TextPrompt or SoftPrompt"),
}


@pytest.mark.parametrize("name", list(BAD_QUERIES))
def test_every_refusal_is_free(mini, name):
    make, match = BAD_QUERIES[name]
    box, meter = one_call_box(mini)
    prompt, images, visual = make(box)
    prompt = TextPrompt("a photo of a {}.") if prompt is None else prompt
    images = Images(px(), keys=["a", "b"]) if images is None else images
    with pytest.raises(BadInput, match=match) as e:
        box.query(prompt, images, visual)
    assert "\n" not in str(e.value)
    assert meter.counts == ZERO and meter.images_encoded == 0 and box.cached_images == 0
    box.query(TextPrompt("a photo of a {}."), Images(px()))  # the budget is intact: exactly one call left
    assert meter.counts["api_calls"] == 1


def test_pixel_messages(mini):
    box = BlackBox(mini, NAMES)
    p = TextPrompt("a photo of a {}.")
    with pytest.raises(BadInput) as e:
        box.query(p, Images((px() * 255).to(torch.uint8)))
    assert str(e.value) == "images are torch.uint8; bbpt expects float RGB in [0, 1]: use pixels.float() / 255"
    with pytest.raises(BadInput) as e:
        box.query(p, Images(px().numpy()))
    assert str(e.value) == (
        "images are a numpy array; pass a torch tensor: torch.from_numpy(x).float() / 255 for uint8, "
        "torch.from_numpy(x) for floats in [0, 1]"
    )
    x = px(lo=0.25, hi=0.75)
    x[0, 0, 0, 0], x[1, 2, 3, 4] = -0.2, 1.3
    with pytest.raises(BadInput) as e:
        box.query(p, Images(x))
    assert str(e.value) == (
        "images have values in [-0.20, 1.30], outside [0, 1]; pass unnormalised RGB in [0, 1] "
        "(bbpt applies the model's mean/std itself)"
    )
    x = px(lo=0.25, hi=0.75)
    x[0, 0, 0, 0] = 1.0000001  # rounds to 1.00: the message must still show it is out of range
    with pytest.raises(BadInput, match=r"1\.0000001"):
        box.query(p, Images(x))
    x = px()
    x[0], x[1] = 0.0, 1.0  # the bounds themselves are fine, and so are half-precision pixels
    assert box.query(p, Images(x)).shape == box.query(p, Images(x.half())).shape == (1, 2, len(NAMES))
    with pytest.raises(BadInput, match="torch.uint8"):  # the same checks guard embed_patches
        box.embed_patches(Images((px() * 255).to(torch.uint8)))
    with pytest.raises(BadInput, match="outside"):
        box.embed_patches(Images(px(hi=2.0)))


def test_keys_must_be_strings(mini):
    with pytest.raises(BadInput, match="keys must be strings, got int at position 0"):
        Images(px(), keys=[0, 1])
    with pytest.raises(BadInput, match="list of strings"):
        Images(px(), keys="ab")
    imgs = Images(px(), keys=["a", "b"])
    imgs.keys = [torch.tensor(0), torch.tensor(1)]  # replaced after construction: the query still checks
    box, meter = one_call_box(mini)
    with pytest.raises(BadInput, match="keys must be strings, got Tensor"):
        box.query(TextPrompt("a {}."), imgs)
    assert meter.counts == ZERO


def test_text_prompt_templates_checked(mini):
    with pytest.raises(BadInput, match="exactly one"):
        TextPrompt("a {} of a {}.")
    with pytest.raises(BadInput, match="at least one"):
        TextPrompt(())
    assert TextPrompt(["a {}.", "the {}."]).templates == ("a {}.", "the {}.")  # hashable for the cache


# ---- upload ---------------------------------------------------------------------------
def test_upload_fills_the_cache_for_free(mini):
    torch.manual_seed(3)
    x, keys = px(7), [f"k{i}" for i in range(7)]
    p = TextPrompt("a photo of a {}.")
    meter = QueryMeter()
    box = BlackBox(mini, NAMES, meter)
    assert box.upload(Images(x, keys)) == 7
    assert meter.counts == ZERO and meter.images_encoded == 0 and box.cached_images == 7
    assert box.upload(Images(x[2:5], keys[2:5])) == 0  # already there
    sub = [4, 0, 6]
    out = box.query(p, Images(x[sub], [keys[i] for i in sub]))
    assert meter.images_encoded == 0  # every key was uploaded: nothing encoded by the query
    assert meter.counts == {"api_calls": 1, "prompt_evals": 1, "images_forwarded": 3}
    twin = BlackBox(mini, NAMES)  # its own cache, the same uploads in the same order
    twin.upload(Images(x, keys))
    assert torch.equal(out, twin.query(p, Images(x[sub], [keys[i] for i in sub])))
    whole = BlackBox(mini, NAMES)  # encodes the same whole batch in one query
    ref = whole.query(p, Images(x, keys))
    assert all(torch.equal(box._cache._rows[k], whole._cache._rows[k]) for k in keys)
    assert torch.equal(box.query(p, Images(x, keys)), ref)


def test_upload_chunks_in_order(mini, monkeypatch):
    x, keys = px(10), [f"u{i}" for i in range(10)]
    box = BlackBox(mini, NAMES, image_chunk=4)
    box.upload(Images(x[3:4], keys[3:4]))  # one already cached
    seen = []
    encode = mini.encode_images
    monkeypatch.setattr(mini, "encode_images", lambda pixels: seen.append(pixels.clone()) or encode(pixels))
    assert box.upload(Images(x, keys)) == 9
    assert [len(s) for s in seen] == [4, 4, 1]
    assert torch.equal(torch.cat(seen), x[[0, 1, 2, 4, 5, 6, 7, 8, 9]])
    one = BlackBox(mini, NAMES)
    one.upload(Images(x, keys))
    for k in keys:  # chunks change only the last bits, if anything
        assert torch.allclose(box._cache._rows[k], one._cache._rows[k], atol=1e-5)


def test_upload_refusals_and_slow_path(mini):
    box = BlackBox(mini, NAMES)
    with pytest.raises(BadInput, match="needs Images with keys"):
        box.upload(Images(px()))
    with pytest.raises(BadInput, match="per-candidate"):
        box.upload(Images(torch.rand(2, 2, 3, 32, 32)))
    with pytest.raises(BadInput, match="torch.uint8"):
        box.upload(Images((px() * 255).to(torch.uint8), keys=["a", "b"]))
    slow = BlackBox(mini, NAMES, fast=False)
    assert slow.upload(Images(px(), keys=["a", "b"])) == 0 and slow.cached_images == 0
    with pytest.raises(BadInput, match="needs Images with keys"):
        slow.upload(Images(px()))
    assert box.cached_images == 0


def test_max_images_per_call_is_public(mini):
    box = BlackBox(mini, NAMES, QueryMeter(max_images_per_call=16))
    assert box.max_images_per_call == 16
    assert box.for_classes(["a", "b"], QueryMeter(max_images_per_call=3)).max_images_per_call == 3
    with pytest.raises(AttributeError):
        box.max_images_per_call = 5
    with pytest.raises(BadInput, match="integer >= 1"):
        QueryMeter(max_images_per_call=0)


def test_methods_use_only_the_black_box_protocol():
    """Every attribute a method reads from a box (its own, its side box, an evaluation box) is
    a member of BlackBoxAPI, which both the in-process and the HTTP black box implement."""
    import ast
    import inspect

    import bbpt.engine
    import bbpt.methods.common
    from bbpt.methods import METHODS
    from bbpt.models import BlackBoxAPI

    allowed = {n for n in dir(BlackBoxAPI) if not n.startswith("_")} | set(BlackBoxAPI.__annotations__)
    modules = {inspect.getmodule(METHODS.get(n)) for n in METHODS.names()} | {bbpt.methods.common}
    used = {}
    for mod in modules:
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if not isinstance(node, ast.Attribute):
                continue
            v = node.value  # box.X, side.X, self.box.X
            boxes = ("box", "side", "aux_box", "eval_box", "side_box")
            if (isinstance(v, ast.Name) and v.id in boxes) or (isinstance(v, ast.Attribute) and v.attr in boxes):
                used.setdefault(node.attr, mod.__name__)
    assert used and {a: m for a, m in used.items() if a not in allowed} == {}
    assert {"query", "embed_words", "image_size"} <= set(used)


# ---- limits: a refused batch, too many visual tokens, budget before tokenising --------------------
def test_query_many_over_the_budget_charges_nothing(mini):
    from bbpt.models.blackbox import query_many

    meter = QueryMeter({"api_calls": 5})
    box = BlackBox(mini, NAMES, meter)
    three = (box, TextPrompt(("a {}.", "the {}.", "one {}.")), Images(px(2)), None)  # 3 api_calls each
    with pytest.raises(BudgetExhausted, match=r"needs api_calls=6 but the budget is api_calls=5") as e:
        query_many([three, three])
    assert e.value.counts["api_calls"] == 0 and e.value.requested["api_calls"] == 6
    assert meter.counts == ZERO and meter.images_encoded == 0
    assert query_many([three])[0].shape == (3, 2, len(NAMES))  # one of them fits: charged exactly 3
    assert meter.counts["api_calls"] == 3


def test_visual_tokens_over_the_limit_are_refused_before_charging(mini):
    box, meter = one_call_box(mini)
    p, imgs = TextPrompt("a photo of a {}."), Images(px(1))
    assert box.image_tokens == 17 and box.max_visual_tokens == 1024  # mini: CLS + 4 x 4 patches; in process: 1024
    with pytest.raises(BadInput, match=r"^60000 visual prompt tokens per candidate, over the limit of 1024 "
                                       r"\(max_visual_tokens; mini's own image sequence has 17\); send at most 1024$"):
        box.query(p, imgs, VisualPrompt(torch.zeros(1, 60000, 128)))
    assert meter.counts == ZERO and meter.images_encoded == 0
    assert box.query(p, imgs, VisualPrompt(torch.zeros(1, 64, 128))).shape == (1, 1, len(NAMES))  # more than 1 + G
    meter.load_state_dict({"counts": ZERO})
    box = BlackBox(mini, NAMES, meter, max_visual_tokens=17)  # what `bbpt serve` sets by default
    wide = BlackBox(mini, NAMES, QueryMeter(), max_visual_tokens=40)
    assert wide.query(p, imgs, VisualPrompt(torch.zeros(1, 40, 128))).shape == (1, 1, len(NAMES))
    with pytest.raises(BadInput, match="41 visual prompt tokens per candidate, over the limit of 40"):
        wide.for_classes(["cat"]).query(p, imgs, VisualPrompt(torch.zeros(1, 41, 128)))
    assert box.query(p, imgs, VisualPrompt(torch.zeros(1, 17, 128))).shape == (1, 1, len(NAMES))
    assert meter.counts["api_calls"] == 1
    with pytest.raises(BadInput, match="max_visual_tokens must be an integer >= 1"):
        BlackBox(mini, NAMES, max_visual_tokens=0)


def test_a_query_the_budget_refuses_is_never_tokenised_nor_encoded(mini, monkeypatch):
    from bbpt.models.blackbox import query_many

    tok, calls = CountingTokenizer(mini.tokenizer), []
    monkeypatch.setattr(mini, "tokenizer", tok)
    for name in ("encode_images", "patch_tokens", "encode_tokens"):
        f = getattr(mini, name)
        monkeypatch.setattr(mini, name, lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
    embed = mini.text.embed
    monkeypatch.setattr(mini.text, "embed", lambda ids: calls.append("embed") or embed(ids))
    box, meter = one_call_box(mini)
    many = TextPrompt(tuple(f"a {i} photo of a {{}}." for i in range(300)))  # 300 api_calls
    imgs = Images(px(2), keys=["a", "b"])
    for query in (lambda: box.query(many, imgs), lambda: query_many([(box, many, imgs, None)]),
                  lambda: box.query(SoftPrompt(torch.zeros(2, 4, box.ctx_dim)), imgs, VisualPrompt(torch.zeros(2, 3, 128))),
                  lambda: query_many([(box, TextPrompt("a {}."), imgs, None)] * 2)):  # 1 + 1 > 1
        with pytest.raises(BudgetExhausted):
            query()
    assert tok.calls == 0 and calls == [] and meter.counts == ZERO and box.cached_images == 0
    assert box.query(TextPrompt("a {}."), imgs).shape == (1, 2, len(NAMES))  # the call is still there
    assert tok.calls == 1 and "encode_images" in calls


def test_text_and_feature_caches_are_bounded_by_bytes(mini):
    from bbpt.models.blackbox import TEXT_CACHE_BYTES, FeatureCache

    assert BlackBox(mini, NAMES)._texts.max_bytes == TEXT_CACHE_BYTES
    box = BlackBox(mini, NAMES, text_cache_bytes=20_000)  # 5 classes x 77 ids x 8 bytes = 3080 a template set
    imgs = Images(px(2))
    first = box.query(TextPrompt("a {} photo."), imgs)
    for i in range(40):
        box.query(TextPrompt((f"a {i} {{}}.", f"the {i} {{}}.")), imgs)
        assert box._texts.nbytes <= 20_000
    names = sum(map(len, NAMES))  # an entry counts its ids and its key's strings (class names, templates)
    keys = sum(4 + len(str((f"a {i} {{}}.", f"the {i} {{}}."))) for i in (37, 38, 39))
    assert len(box._texts) == 3 and box._texts.nbytes == 3 * (2 * 3080 + names) + keys  # the last three
    assert torch.equal(box.query(TextPrompt("a {} photo."), imgs), first)  # evicted, tokenised again: the same
    soft = SoftPrompt(torch.zeros(1, 4, box.ctx_dim))
    assert torch.equal(box.for_classes(["cat"]).query(soft, imgs), BlackBox(mini, ["cat"]).query(soft, imgs))
    row = 128 * 4  # one image's features, bytes
    stored = {}
    cache = FeatureCache(max_bytes=3 * row, load=lambda keys: {k: stored[k] for k in keys if k in stored},
                         save=stored.update)
    fbox = BlackBox(mini, NAMES, _cache=cache)
    x, keys = px(6), [f"k{i}" for i in range(6)]
    assert fbox.upload(Images(x, keys)) == 6 and len(cache) == 3 and set(stored) == set(keys)
    out = fbox.query(TextPrompt("a {}."), Images(None, keys))  # evicted ones come back from load
    assert torch.allclose(out, BlackBox(mini, NAMES).query(TextPrompt("a {}."), Images(x)), atol=1e-5)
    assert fbox.upload(Images(x, keys)) == 0 and fbox.meter.images_encoded == 0
    alone = BlackBox(mini, NAMES, _cache=FeatureCache(max_bytes=2 * row))  # no store: evicted ones re-encoded
    assert torch.allclose(alone.query(TextPrompt("a {}."), Images(x, keys)), out, atol=1e-5)
    with pytest.raises(BadInput, match="never uploaded"):
        alone.query(TextPrompt("a {}."), Images(None, keys))
