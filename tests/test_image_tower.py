"""The fast image-tower forward (bbpt.models.fastvit) equals the library's: logits within 1e-5."""
import open_clip
import pytest
import torch

from bbpt.errors import BadInput
from bbpt.models import BlackBox, Images, TextPrompt, VisualPrompt, create_backbone
from bbpt.models.backbone import CLIP_MEAN, CLIP_STD
from bbpt.models.fastvit import BLOCK
from bbpt.models.openclip import OpenClipBackbone

NAMES = ["cat", "dog", "car", "tree", "shirt"]


def both(bb, fn):
    """fn() under the reference forward, then under the fast one (which must be in use: the
    library's tower forward is made to fail)."""
    bb.image_tower = "reference"
    ref = fn()
    bb.image_tower = "fast"
    assert bb.fast_vit() is not None
    forward = bb.model.visual.forward
    bb.model.visual.forward = lambda *a, **k: pytest.fail("the fast tower called the library's forward")
    try:
        return ref, fn()
    finally:
        bb.model.visual.forward = forward


def check_box(bb, n=BLOCK + 13):
    """Every query shape the methods send: plain, prompted per candidate, visual tokens."""
    g = torch.Generator().manual_seed(0)
    S = bb.image_size
    box = BlackBox(bb, NAMES, fast=False)
    text = TextPrompt("a photo of a {}.")
    px = torch.rand(n, 3, S, S, generator=g)
    per = torch.rand(3, 5, 3, S, S, generator=g)
    tok = torch.randn(2, 4, bb.visual_width, generator=g) * 0.5
    for images, visual in ((Images(px), None), (Images(per), None), (Images(px), VisualPrompt(tok))):
        ref, fast = both(bb, lambda: box.query(text, images, visual))
        assert (fast - ref).abs().max() <= 1e-5
        assert ref.std() > 1e-3  # scores that say something, not a constant
    ref, fast = both(bb, lambda: bb.patch_tokens(px))
    assert (fast - ref).abs().max() <= 1e-6


def test_fast_tower_equals_reference_on_mini():
    bb = create_backbone("mini")
    assert bb.image_tower == "fast"
    check_box(bb, n=2 * BLOCK + 7)  # more than one block, and a partial one


@pytest.mark.parametrize("vision", [
    {"ls_init_value": 0.5, "pool_type": "avg", "no_ln_pre": True},  # LayerScale, mean pooling, no ln_pre
    {"final_ln_after_pool": True},
])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_fast_tower_equals_reference_on_open_clip_vits(vision, quick_gelu):
    torch.manual_seed(0)
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    model = open_clip.model.CLIP(64, {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8,
                                      **vision}, text, quick_gelu=quick_gelu)
    for p in model.parameters():  # random, not init values (LayerScale's gamma, zero biases)
        p.data.normal_(0, 0.2 if p.ndim > 1 else 0.5)
    bb = OpenClipBackbone("test-vit", "random", model, open_clip.get_tokenizer("ViT-B-32"), 32, CLIP_MEAN, CLIP_STD,
                          torch.device("cpu"))
    check_box(bb, n=BLOCK + 3)


def test_fast_tower_follows_new_weights():
    """The fast forward reads the tower's weights as they are now (loaded, trained, moved)."""
    bb, other = create_backbone("mini"), create_backbone("mini", "random")
    px = torch.rand(4, 3, 32, 32)
    before = bb.encode_images(px)
    bb.model.load_state_dict(other.model.state_dict())
    after = bb.encode_images(px)
    assert (after - before).abs().max() > 1e-2
    ref, fast = both(bb, lambda: bb.encode_images(px))
    assert (fast - ref).abs().max() <= 1e-6


def test_towers_it_does_not_cover_keep_the_library_forward(monkeypatch):
    assert create_backbone("RN50", "random").fast_vit() is None  # no ViT
    monkeypatch.setenv("BBPT_IMAGE_TOWER", "reference")
    assert create_backbone("mini").fast_vit() is None
    monkeypatch.setenv("BBPT_IMAGE_TOWER", "fastest")
    with pytest.raises(BadInput, match="image tower 'fastest' is not one of fast, reference"):
        create_backbone("mini")


def test_text_side_in_cpu_blocks_equals_one_forward(monkeypatch):
    """Whole-set candidates (P·C sequences) go through the text tower in cache-sized blocks on
    the CPU: the logits equal one forward over every sequence, and embed_texts' likewise."""
    import bbpt.models.backbone as backbone

    bb = create_backbone("mini")
    names = [f"class number {i}" for i in range(40)]
    box = BlackBox(bb, names)
    g = torch.Generator().manual_seed(0)
    px = torch.rand(16, 3, bb.image_size, bb.image_size, generator=g)
    ctx = box.embed_words("a photo of a")  # (4, D)
    from bbpt.models import SoftPrompt
    prompt = SoftPrompt(ctx[None] + 0.02 * torch.randn(30, *ctx.shape, generator=g))  # 1200 sequences
    L = bb.text.real_length(bb.tokenize([f"X X X X {n}." for n in names]))
    n = bb.text.per_forward(1200, L, 4096, bb.device)
    most = backbone.TEXT_BLOCK // (L * bb.text.width)
    blocks = -(-1200 // most)
    assert 1 < blocks and n == -(-1200 // blocks) <= most  # equal blocks of at most TEXT_BLOCK values
    assert bb.text.per_forward(most + 1, L, 4096, bb.device) == (most + 2) // 2  # two halves, not a block and a crumb
    assert bb.text.per_forward(10, L, 4096, bb.device) == 10  # a small forward stays whole
    assert bb.text.per_forward(1200, L, 7, bb.device) == 7  # never above the chunk
    assert bb.text.per_forward(1200, L, 4096, torch.device("cuda")) == 1200  # a GPU takes the whole chunk
    calls = []
    encode = type(bb.text).encode
    monkeypatch.setattr(type(bb.text), "encode", lambda self, x, *a, **k: calls.append(len(x)) or encode(self, x, *a, **k))
    blocked = box.query(prompt, Images(px))
    assert max(calls) <= n and sum(calls) == 1200 and len(calls) > 1
    calls.clear()
    texts = box.embed_texts(names * 30)
    assert sum(calls) == 1200 and len(calls) > 1
    monkeypatch.setattr(backbone, "TEXT_BLOCK", 1 << 62)
    calls.clear()
    one = box.query(prompt, Images(px))
    assert calls == [1200]
    assert (blocked - one).abs().max() <= 1e-5 and one.std() > 1e-3
    assert (box.embed_texts(names * 30) - texts).abs().max() <= 1e-6


def test_fast_tower_blocks_are_equal_and_at_most_block():
    """Forwards larger than BLOCK go through in equal blocks, never a crumb (129 = 65 + 64, not
    128 + 1), and each pass holds at most BLOCK images."""
    fast = create_backbone("mini").fast_vit()
    assert [fast.per_block(n) for n in (1, 7, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 1, 300)] == \
        [1, 7, BLOCK, (BLOCK + 2) // 2, BLOCK, -(-(2 * BLOCK + 1) // 3), 100]
    sizes = []
    tower = fast._tower
    fast._tower = lambda x: sizes.append(len(x)) or tower(x)
    try:
        fast.encode_images(torch.rand(BLOCK + 1, 3, 32, 32))
    finally:
        fast._tower = tower
    assert sizes == [(BLOCK + 2) // 2, BLOCK // 2]
