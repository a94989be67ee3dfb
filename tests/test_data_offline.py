"""Offline tasks: sizes, disjoint splits, seeded animal split, procedural shapes held out."""
import numpy as np
import pytest

from bbpt.data import load_task
from bbpt.data import shapes
from bbpt.data.offline import TASKS
from bbpt.errors import DataNotPrepared, UnknownName


@pytest.mark.parametrize("name,n_train_val,n_test", [
    ("mnist", 60000, 10000), ("fashion-mnist", 60000, 10000), ("animal-mnist", 8000, 2000), ("shapes", 5000, 2000),
])
def test_offline_task_sizes_and_disjoint_splits(name, n_train_val, n_test):
    t = load_task(name)
    assert t.num_classes == 10 and len(t.templates[0]) and "{}" in t.templates[0]
    assert len(t.train) + len(t.val) == n_train_val and len(t.test) == n_test
    assert not set(t.train.ids) & set(t.val.ids)
    assert not set(t.train.ids) & set(t.test.ids)
    # val is a stratified 10 % of train
    counts = np.bincount(t.val.labels, minlength=10)
    assert counts.min() > 0 and abs(len(t.val) - 0.1 * n_train_val) <= 10
    px = t.test.pixels([0, 1], size=32)
    assert px.shape == (2, 3, 32, 32) and 0 <= px.min() and px.max() <= 1


def test_animal_split_is_seeded_and_stratified():
    a = TASKS.get("animal-mnist").fetch()
    b = TASKS.get("animal-mnist").fetch()
    assert np.array_equal(a["test"][0], b["test"][0])
    assert np.bincount(a["test"][1]).tolist() == [200] * 10
    assert np.bincount(a["train"][1]).tolist() == [800] * 10


def test_shapes_deterministic_by_seed():
    x1, y1 = shapes.task_split(3, seed=7)
    x2, y2 = shapes.task_split(3, seed=7)
    x3, _ = shapes.task_split(3, seed=8)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    s1, c1 = shapes.scene_batch(20, seed=3)
    s2, c2 = shapes.scene_batch(20, seed=3)
    assert np.array_equal(s1, s2) and c1 == c2


def test_shapes_class_names_never_captioned_in_pretraining():
    assert len(shapes.HELD_OUT) == 10 and not set(shapes.HELD_OUT) & set(shapes.SEEN)
    words = {w for pair in shapes.HELD_OUT for w in pair}
    seen_words = {w for pair in shapes.SEEN for w in pair}
    assert words <= seen_words  # every word is known, only the pairs are new
    _, caps = shapes.scene_batch(3000, seed=0)
    text = "\n".join(caps)
    for c, s in shapes.HELD_OUT:
        assert f"{c} {s}" not in text and f"{s} that is {c}" not in text
    assert TASKS.get("shapes").classnames == [f"{c} {s}" for c, s in shapes.HELD_OUT]


def test_unprepared_task_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("BBPT_DATA", str(tmp_path))
    with pytest.raises(DataNotPrepared, match="bbpt data prepare mnist"):
        load_task("mnist")
    TASKS.get("shapes").prepare()  # procedural: prepares anywhere
    assert len(load_task("shapes").test) == 2000
    TASKS.get("shapes").files()[1].write_bytes(b"garbage")
    with pytest.raises(DataNotPrepared, match="--force"):
        load_task("shapes")


def test_unknown_dataset_suggests():
    with pytest.raises(UnknownName, match="did you mean 'mnist'"):
        load_task("mnsit")


def test_union_is_the_four_tasks_as_forty_classes():
    """The papers' class-count regime: 40 classes, each part's images under its own labels + 10 k."""
    from bbpt.data.core import _array_to_pixels
    from bbpt.data.offline import UNION_PARTS

    u = load_task("union")
    assert u.num_classes == 40 and u.templates == ["a photo of a {}."] and u.flip is False
    assert u.classnames == [n for p in UNION_PARTS for n in TASKS.get(p).classnames]
    assert np.bincount(u.test.labels).tolist() == [200] * 40
    assert np.bincount(np.concatenate([u.train.labels, u.val.labels])).tolist() == [500] * 40
    assert u.test.array.shape[1:] == (32, 32, 3) and u.test.array.dtype == np.uint8
    # each union image is an image of its part, resized as a model input is
    for k, name in enumerate(UNION_PARTS):
        part = load_task(name)
        first = np.flatnonzero(u.test.labels == 10 * k)[0]
        want = u.test.pixels([first], size=32)
        dist = [(part.test.pixels(list(range(i, i + 500)), size=32) - want).abs().amax((1, 2, 3)).min().item()
                for i in range(0, len(part.test), 500)]
        assert min(dist) <= 0.5 / 255 + 1e-6, name
    # prepared once, the same arrays again
    a, b = TASKS.get("union").fetch(), TASKS.get("union").fetch()
    assert np.array_equal(a["train"][0], b["train"][0]) and np.array_equal(a["test"][1], b["test"][1])
    assert _array_to_pixels(a["test"][0][:1], 32).shape == (1, 3, 32, 32)


def test_union_whole_set_candidate_costs_five_api_calls(tmp_path):
    """16 shots x 40 classes = 640 images: ceil(640 / 128) = 5 api_calls per whole-set candidate."""
    from bbpt.engine import make_run_config, run

    cfg = make_run_config(method="bbt", dataset="union", shots=16, seed=1,
                          options={"budget": 100, "budget_unit": "api_calls"})
    r = run(cfg, out=tmp_path / "u", progress=False)
    spent = r.queries
    assert spent["api_calls"] == 5 * spent["prompt_evals"] == 100
