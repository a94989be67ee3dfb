"""The embedded model: shipped weights, zero-shot room for tuning, reproducible pretraining."""
import argparse
import json

import pytest
import torch

from bbpt.errors import CorruptCheckpoint
from bbpt.models import create_backbone
from bbpt.models.backbone import WEIGHTS_DIR
from bbpt.models.pretrain import train, zero_shot
from bbpt.data.offline import TASKS


def test_weights_shipped_small_safetensors():
    f = WEIGHTS_DIR / "mini.safetensors"
    assert f.exists() and f.stat().st_size <= 20 * 2**20
    card = json.loads(f.with_suffix(".card.json").read_text())
    assert card["config"]["steps"] > 0 and set(card["zero_shot_test_accuracy"]) == set(TASKS.names())


@pytest.mark.parametrize("name", TASKS.names())
def test_zero_shot_leaves_room_for_tuning(mini, name):
    """At least 10 points above chance, at most 85 %, on the full test split."""
    acc = zero_shot(mini, name)
    chance = 1 / len(TASKS.get(name).classnames)
    assert chance + 0.10 <= acc <= 0.85, acc
    card = json.loads((WEIGHTS_DIR / "mini.card.json").read_text())
    assert abs(card["zero_shot_test_accuracy"][name] - acc) < 1e-3  # the README table is what the weights give


def test_pretraining_is_reproducible():
    args = argparse.Namespace(steps=2, batch=16, lr=1e-3, wd=0.1, warmup=1, images_per_class=2, scenes=40,
                              ssl_per_class=2, ssl_batch=8, ssl_weight=1.0, caption_invert=0.5,
                              seed=5, threads=2, init_logit_scale=100.0, max_logit_scale=100.0)
    a = train(args)["model"].state_dict()
    assert a["logit_scale"].exp().item() <= 100.0 + 1e-3  # clamped at CLIP's cap after every step
    b = train(args)["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    args.seed = 6
    c = train(args)["model"].state_dict()
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_corrupt_and_mismatched_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpoint, match="corrupt"):
        create_backbone("mini", str(bad))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CorruptCheckpoint, match="does not match"):
        create_backbone("mini", str(other))
    with pytest.raises(CorruptCheckpoint, match="missing"):
        create_backbone("mini", str(tmp_path / "absent.safetensors"))
