"""Tip-Adapter against its official code (tests/parity/tipadapter.json, written by
tools/parity/tipadapter.py from ``utils.py`` and ``main.py`` of gaopengcuhk/Tip-Adapter):
for three cases, the prompt-ensemble classifier, the cache keys (augmented passes averaged)
and values, the α / β search on the val split, and the zero-shot, initial and searched
logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load

from bbpt.methods import make_config
from bbpt.methods.embedding import class_embeddings
from bbpt.methods.tipadapter import TipAdapter


class EmbeddingsOnly:
    """The texts' embeddings the official clip stub returned, as an embedding API returns them."""

    def __init__(self, text, num_classes):
        self.text, self.num_classes = torch.from_numpy(text), num_classes

    def embed_texts(self, texts):
        assert len(texts) == len(self.text)
        return self.text.clone()


def fitted(case):
    c, inp = case["case"], case["inputs"]
    box = EmbeddingsOnly(inp["text"], c["C"])
    m = TipAdapter.__new__(TipAdapter)  # fit() reads only cfg and the box
    m.cfg = make_config(TipAdapter, {"init_alpha": float(c["alpha"]), "scale_beta": float(c["scale"][0]),
                                     "scale_alpha": float(c["scale"][1]), "augment_epoch": c["A"]})
    m.box = box
    names = [f"class{i}" for i in range(c["C"])]
    text = class_embeddings(box, names, ["{}"] * c["T"])
    val = (torch.from_numpy(inp["val"]), torch.from_numpy(inp["y_val"]))
    fit, stats = m.fit(torch.from_numpy(inp["passes"]), torch.from_numpy(inp["y"]), text, val)
    return fit, stats, text


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tipadapter_follows_the_release(n):
    case = load("tipadapter")["trajectory"][n]
    inp = case["inputs"]
    fit, stats, text = fitted(case)
    close(text.T, case["clip_weights"], what="the CLIP classifier (templates averaged, normalised)")
    close(fit["keys"].T, case["cache_keys"], what="cache keys")
    close(fit["values"], case["cache_values"], what="cache values (one-hot)")
    assert (stats["beta"], stats["alpha"]) == pytest.approx((case["best_beta"], case["best_alpha"]), rel=1e-12)
    f_val, f_test = torch.from_numpy(inp["val"]), torch.from_numpy(inp["test"])
    close(100.0 * f_val @ text.T, case["val_clip_logits"], rtol=1e-5, atol=1e-4, what="zero-shot val logits")
    init = {**fit, "alpha": torch.tensor(float(case["case"]["alpha"])), "beta": torch.tensor(1.0)}
    close(TipAdapter.logits(init, f_val, text, True), case["val_tip_logits_init"], rtol=1e-5, atol=1e-4,
          what="val logits at init_alpha / init_beta")
    close(TipAdapter.logits(fit, f_test, text, True), case["test_tip_logits"], rtol=1e-5, atol=1e-4,
          what="test logits at the searched α, β")


def test_the_departures_it_guards_would_fail_it():
    """Searching α and β in the other order, or keeping the last best instead of the first,
    picks another pair on the fixture's second case."""
    from bbpt.methods import tipadapter as tip

    case = load("tipadapter")["trajectory"][1]
    inp = case["inputs"]
    _, _, text = fitted(case)
    keys = torch.from_numpy(inp["passes"]).mean(0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    values = torch.nn.functional.one_hot(torch.from_numpy(inp["y"])).float()
    f, y = torch.from_numpy(inp["val"]), torch.from_numpy(inp["y_val"])
    betas, alphas = tip.grid(12, 200), tip.grid(5, 20)
    ok = tip.search_hp(keys, values, text, f, y, betas, alphas)[:2]
    assert ok == pytest.approx((case["best_beta"], case["best_alpha"]))
    last = tip.search_hp(keys, values, text, f, y, betas[::-1], alphas[::-1])[:2]
    assert last != pytest.approx(ok)
    assert np.isclose(case["best_alpha"], alphas).any()
