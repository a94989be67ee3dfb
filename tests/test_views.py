"""Training views (bbpt.data.views): the papers' random resized crop + flip from a seeded pool."""
import numpy as np
import pytest
import torch
from PIL import Image

from bbpt.data.core import ImageSet
from bbpt.data.templates import flip_keeps_label
from bbpt.data.views import VIEW_BLOCK, TrainViews, ViewSpec
from bbpt.engine import make_run_config, run
from bbpt.methods.base import BatchStream, FewShotData, WholeSet
from bbpt.models import BlackBox, QueryMeter, SoftPrompt, TextPrompt


def torchvision_view(pil_or_tensor, seed: int, size: int, scale, flip: bool):
    """The official loaders' transform (Dassl: RandomResizedCrop, bicubic, + RandomHorizontalFlip) under ``seed``."""
    import torchvision.transforms as T

    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    torch.manual_seed(seed)
    out = T.Compose(steps)(pil_or_tensor)
    return T.functional.to_tensor(out) if isinstance(out, Image.Image) else out.clamp(0, 1)


def test_a_file_view_equals_torchvisions_transform_on_the_full_image(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(60, 90), (120, 70)]):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    images = ImageSet(labels=[0, 1], ids=["a", "b"], paths=paths)
    views = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, 8), seed=3)
    flips = set()
    for i in range(2):
        for v in range(8):
            ref = torchvision_view(Image.open(paths[i]).convert("RGB"), views.view_seed(i, v), 32, (0.08, 1.0), True)
            got = views.pixels([i], [v])[0]
            assert torch.equal(got, ref), (i, v, float((got - ref).abs().max()))
            flips.add(views.params(i, v)[4])
    assert flips == {True, False}


def test_an_array_view_equals_torchvisions_transform():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    images = ImageSet(labels=[0, 1, 2], ids=["x", "y", "z"], array=arr)
    views = TrainViews(images, 32, ViewSpec((0.5, 1.0), True, 4), seed=9)
    for i in range(3):
        for v in range(4):
            src = torch.from_numpy(arr[i]).permute(2, 0, 1).float() / 255
            ref = torchvision_view(src, views.view_seed(i, v), 32, (0.5, 1.0), True)
            assert torch.allclose(views.pixels([i], [v])[0], ref, atol=1e-6)


def test_views_are_a_function_of_seed_id_view_and_spec():
    arr = np.random.default_rng(2).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    images = ImageSet(labels=np.arange(20) % 2, ids=[f"i{k}" for k in range(20)], array=arr)
    a = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, 16), seed=1)
    b = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, 16), seed=1)
    c = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, 16), seed=2)
    idx, v = np.arange(20), np.arange(20) % 16
    assert torch.equal(a.pixels(idx, v), b.pixels(idx, v)) and a.keys(idx, v) == b.keys(idx, v)
    assert not torch.equal(a.pixels(idx, v), c.pixels(idx, v))
    assert set(a.keys(idx, v)).isdisjoint(c.keys(idx, v))  # equal keys promise equal pixels
    assert a.keys([0], [5]) == [f"i0~{a.tag}.5"]
    no_flip = TrainViews(images, 32, ViewSpec((0.08, 1.0), False, 16), seed=1)
    assert not any(no_flip.params(i, k)[4] for i in range(20) for k in range(16))
    for i in range(20):
        for k in range(16):
            t, left, h, w, _ = a.params(i, k)
            assert 0 <= t and t + h <= 28 and 0 <= left and left + w <= 28
            assert 0.08 * 784 * 0.9 <= h * w <= 784  # the scale range (rounding aside)
    unbounded = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, 0), seed=1)
    assert unbounded.keys(idx, v) is None  # fresh views are never cached
    drawn = unbounded.draw(np.random.default_rng(0), 1000)
    assert len(set(drawn.tolist())) == 1000


def test_flip_defaults_per_task(tmp_path):
    assert not flip_keeps_label("mnist") and not flip_keeps_label("split_mlai_SVHN") and not flip_keeps_label("SVHN")
    assert flip_keeps_label("fashion-mnist") and flip_keeps_label("oxford_pets") and flip_keeps_label("shapes")
    from bbpt.data import load_task

    assert load_task("mnist").flip is False and load_task("fashion-mnist").flip is True
    root = tmp_path / "svhn"
    for split in ("train", "test"):
        for c in ("one", "two"):
            (root / split / c).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (8, 8)).save(root / split / c / f"{k}.png")
    assert load_task(str(root)).flip is False


def _data(views: bool, pool: int = 4, n: int = 40, seed: int = 1):
    arr = np.random.default_rng(3).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images = ImageSet(labels=np.arange(n) % 4, ids=[f"im{k}" for k in range(n)], array=arr)
    tv = TrainViews(images, 32, ViewSpec((0.08, 1.0), True, pool), seed) if views else None
    return FewShotData(images, 32, views=tv)


def test_a_batch_stream_draws_a_fresh_view_per_batch_and_resumes_exactly():
    data = _data(True)
    s = BatchStream(data, 16, seed=5)
    first = [s.next()[0].keys for _ in range(3)]
    views = {k.rsplit(".", 1)[1] for ks in first for k in ks}
    assert views <= {"0", "1", "2", "3"} and len(views) > 1
    state = s.state_dict()
    want = [s.next()[0] for _ in range(4)]
    s2 = BatchStream(_data(True), 16, seed=99)
    s2.load_state_dict(state)
    for w in want:
        got = s2.next()[0]
        assert got.keys == w.keys and torch.equal(got.pixels, w.pixels)


def test_without_views_the_stream_draws_what_it_drew_before_views_existed():
    s = BatchStream(_data(False), 16, seed=5)
    rng = np.random.default_rng(5)
    order = rng.permutation(40)
    keys = [s.next()[0].keys for _ in range(2)]
    assert keys == [[f"im{k}" for k in order[:16]], [f"im{k}" for k in order[16:32]]]
    assert s.rng.bit_generator.state == rng.bit_generator.state


def test_a_whole_set_method_sends_one_augmented_pass(mini):
    data = _data(True)
    ws = WholeSet(data)
    a, b = ws.next()[0], ws.next()[0]
    assert a.keys == b.keys and all(k.endswith(".0") for k in a.keys)
    assert torch.equal(a.pixels, data.images(np.arange(40), np.zeros(40, dtype=np.int64)).pixels)


def test_view_features_do_not_depend_on_the_order_views_are_drawn_in(mini):
    """Views are uploaded in fixed blocks: a resumed run (empty cache, another history) gets
    bit-identical features."""
    n = 2 * VIEW_BLOCK + 5
    feats = []
    for order_seed in (0, 1):
        data = _data(True, pool=3, n=n)
        box = BlackBox(mini, ["a", "b", "c", "d"], QueryMeter())
        data.attach(box)
        rng = np.random.default_rng(order_seed)
        for _ in range(6):
            idx = rng.choice(n, 7, replace=False)
            data.images(idx, rng.integers(0, 3, 7))
        idx = np.arange(n).repeat(3)
        keys = data.views.keys(idx, np.tile(np.arange(3), n))
        data.images(idx, np.tile(np.arange(3), n))
        feats.append(torch.stack([box._cache.get(k) for k in keys]))
    assert torch.equal(feats[0], feats[1])


def test_unbounded_views_are_re_encoded_every_query(mini):
    data = _data(True, pool=0)
    box = BlackBox(mini, ["a", "b", "c", "d"], QueryMeter())
    data.attach(box)
    s = BatchStream(data, 16, seed=1)
    ctx = torch.zeros(1, 4, box.ctx_dim)
    for _ in range(3):
        images, _ = s.next()
        assert images.keys is None
        box.query(SoftPrompt(ctx), images)
    assert box.meter.images_encoded == 48 and len(box._cache) == 0


@pytest.mark.parametrize("pool", [1, 3])
def test_each_view_is_encoded_once_before_any_query_needs_it(mini, pool):
    data = _data(True, pool=pool)
    box = BlackBox(mini, ["a", "b", "c", "d"], QueryMeter())
    for chunk in data.chunks(64):  # as the engine: the plain images, then views block by block
        box.upload(chunk)
    data.attach(box)
    s, ctx = BatchStream(data, 16, seed=1), torch.zeros(1, 4, box.ctx_dim)
    for _ in range(30):
        box.query(SoftPrompt(ctx), s.next()[0])
    assert box.meter.images_encoded == 0  # every view reached the query already uploaded
    assert box.cached_images == 40 * (1 + pool)


def test_views_are_on_where_the_task_allows_and_on_request(tmp_path):
    from bbpt.data import load_task
    from bbpt.engine import train_views
    from bbpt.methods import METHODS, make_config

    root = tmp_path / "pets"
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for k in range(5):
                Image.new("RGB", (40, 30), (k * 40, 0, 0)).save(root / split / c / f"{k}.png")
    folder, offline = load_task(str(root)), load_task("fashion-mnist")
    assert folder.views is True and offline.views is False  # 28-32 px offline images: off by default

    def views(method, task, **opts):
        cfg = make_config(METHODS.get(method), opts)
        return train_views(cfg, task, task.train, 32, seed=1)

    zip_v, craft_v = views("zip", folder), views("craft", folder)
    assert zip_v.spec == ViewSpec((0.08, 1.0), True, 16) and craft_v.spec == ViewSpec((0.5, 1.0), True, 16)
    assert views("zip", offline) is None and views("zip", folder, augment=False) is None
    assert views("zip", offline, augment=True).spec == ViewSpec((0.08, 1.0), True, 16)
    assert views("bptvlm", folder) is None and views("zeroshot", folder) is None  # official: no augmentation
    assert views("zip", folder, flip=False, view_pool=0, crop_min=0.3).spec == ViewSpec((0.3, 1.0), False, 0)
    assert views("zip", load_task("mnist"), augment=True).spec.flip is False  # digits: no flips by default


def test_a_run_with_views_trains_on_other_images_at_the_same_cost():
    base = dict(method="zip", dataset="fashion-mnist", test_subset=50)
    on = run(make_run_config(**base, options={"budget": 100, "augment": True}), progress=False)
    off = run(make_run_config(**base, options={"budget": 100}), progress=False)
    assert on.config["options"]["augment"] is True and off.config["options"]["augment"] is None
    assert on.curve[-1].train_loss != off.curve[-1].train_loss  # other training images
    assert on.queries == off.queries == {"api_calls": 100, "prompt_evals": 100, "images_forwarded": 12800}


def test_evaluation_at_224_px_streams_through_the_fast_path(backends, tmp_path):
    """Test images (files, CLIP's test transform at 224 px) are scored eval_batch at a time,
    never cached (memory flat in the split's size), and equal the reference loop's logits."""
    from bbpt.engine import evaluate

    bb = backends["ViT-B-32"]
    rng = np.random.default_rng(4)
    paths = []
    for k in range(7):
        p = tmp_path / f"t{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (250, 300, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    test = ImageSet(labels=np.arange(7) % 3, ids=[f"t{k}" for k in range(7)], paths=paths)
    names = ["cat", "dog", "bird"]

    class Method:  # the zero-shot template's logits, kept for comparison
        def __init__(self):
            self.out = []

        def predict(self, box, images):
            self.out.append(box.query(TextPrompt("a photo of a {}."), images)[0])
            return self.out[-1]

    fast = BlackBox(bb, names, QueryMeter(), fast=True)
    slow = BlackBox(bb, names, QueryMeter(), fast=False)
    assert fast.image_size == 224
    m_fast, m_slow = Method(), Method()
    r_fast = evaluate(m_fast, fast, test, batch=3, progress=False)
    r_slow = evaluate(m_slow, slow, test, batch=7, progress=False)
    assert [len(x) for x in m_fast.out] == [3, 3, 1] and fast.cached_images == 0  # streamed, nothing kept
    assert fast.meter.counts["api_calls"] == 3 and fast.meter.images_encoded == 7
    assert torch.allclose(torch.cat(m_fast.out), m_slow.out[0], atol=1e-4)
    assert r_fast["accuracy"] == r_slow["accuracy"]


def test_run_folders_from_before_the_view_options_still_resume_and_are_kept(tmp_path):
    """The new options default to None, which is what a stored config lacking them reads as."""
    import json

    from bbpt.runfolder import RunFolder

    cfg = make_run_config(method="zip", dataset="fashion-mnist", options={"budget": 20}, test_subset=20)
    first = run(cfg, out=tmp_path / "r", progress=False)
    run_json = tmp_path / "r" / "run.json"
    stored = json.loads(run_json.read_text())
    for k in ("augment", "crop_min", "flip", "view_pool"):
        del stored["config"]["options"][k]  # as written before these options existed
    run_json.write_text(json.dumps(stored))
    config = {**cfg.model_dump(), "options": first.config["options"]}
    assert RunFolder(tmp_path / "r").check(config, keep_finished=True) == "finished"


def test_none_typed_in_set_means_none_where_the_option_takes_it():
    from bbpt.methods import METHODS, make_config

    zip_cls = METHODS.get("zip")
    assert make_config(zip_cls, {"flip": "none", "view_pool": "none"}).flip is None
    assert make_config(zip_cls, {"clip": "none"}).clip == "none"  # a literal of its own
