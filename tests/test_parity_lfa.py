"""LFA against its official code (tests/parity/lfa.json, written by tools/parity/lfa.py from
``feature_alignment.py`` and ``alignment_utils.py`` of saic-fi/LFA): the β-Procrustes
cross-validation (25 β values x 3 splits: every split's top-1, the chosen map), then six
steps of the mapping refinement (ARerank loss, AdamW, cosine schedule, noise and dropout
on the batch, the EMA map), the release's random draws replayed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_model import close, load

from bbpt.methods import make_config
from bbpt.methods.lfa import LFA, cv_beta, procrustes, refine


class Replay:
    """bbpt's Draws, answering with the release's recorded draws in order."""

    def __init__(self, draws: dict):
        self.d = {k: list(v) for k, v in draws.items()}

    def perm(self, n):
        p = torch.from_numpy(self.d["perm"].pop(0))
        assert len(p) == n
        return p

    def uniform(self):
        return self.d["uniform"].pop(0)

    def randn(self, shape):
        r = torch.from_numpy(self.d["randn"].pop(0))
        assert tuple(r.shape) == tuple(shape)
        return r

    def dropout_noise(self, shape, p):
        r = torch.from_numpy(self.d["dropout"].pop(0))
        assert tuple(r.shape) == tuple(shape)
        return r

    def left(self) -> dict:
        return {k: len(v) for k, v in self.d.items() if v}


def tensors(fx):
    inp = fx["inputs"]
    return (torch.from_numpy(inp["x"]), torch.from_numpy(inp["protos"]), torch.from_numpy(inp["y"]))


def config(fx, **kw):
    a = fx["inputs"]["args"]
    return make_config(LFA, {"n_iters": a["n_iters"], "lr": a["learning_rate"], "weight_decay": a["weight_decay"],
                             "end_lr": a["cosine_end_lr"], "gaussian_noise": a["gaussian_noise"],
                             "dropout": a["dropout"], "knn": a["knn"], "arerank_scale": a["arerank_scale"], **kw})


def test_lfa_follows_the_official_cross_validation_and_refinement():
    fx = load("lfa")
    x, protos, y = tensors(fx)
    draws = Replay(fx["inputs"]["draws"])
    w0, beta, scores = cv_beta(x, protos, y, draws)
    close(np.array(scores), fx["cv"]["top1"].astype(np.float64).mean(1), rtol=1e-6,
          what="mean top-1 of the 3 splits, per β")
    # The map is U Vᵀ of SVD(xᵀ protos[y]), of rank C = 5 in 16 dimensions: its part between the
    # two null spaces is any orthogonal map, which LAPACK picks by CPU (Intel and AMD differ by
    # 0.57). The part on the column space is unique: compared there, the rest replayed.
    u, sv, _ = torch.linalg.svd(x.T @ protos[y])
    on = u[:, : int((sv > 1e-4 * sv[0]).sum())]  # (E, r)
    assert on.shape[1] == len(protos)
    official = torch.from_numpy(fx["cv"]["w"])
    close(on.T @ w0, on.T @ official, what="the β-Procrustes map refitted on the whole set, on its column space")
    assert len(draws.d["perm"]) == len(fx["inputs"]["draws"]["perm"]) - fx["inputs"]["n_cv_perms"]
    trace = []
    w, ema, losses = refine(x, protos, y, official.clone(), config(fx), draws, trace)  # from the official map
    assert len(trace) == len(fx["trajectory"]) == 6
    for i, (mine, off) in enumerate(zip(trace, fx["trajectory"])):
        close(mine["loss"], np.asarray(off["loss"]).reshape(()), what=f"step {i}: ARerank loss")
        close(mine["w"], off["w"], what=f"step {i}: the map after AdamW and the schedule")
    close(w, fx["final"]["w"], what="the refined map")
    close(ema, fx["final"]["ema"], what="the EMA map")
    assert draws.left() == {}, f"official draws left unused: {draws.left()}"


def test_the_departures_it_guards_would_fail_it():
    """Plain Procrustes (β = 0), or no noise / dropout in the refinement, gives another map."""
    fx = load("lfa")
    x, protos, y = tensors(fx)
    u, sv, _ = torch.linalg.svd(x.T @ protos[y])
    on = u[:, : len(protos)]  # the column space, where the map is unique (see above)
    with pytest.raises(AssertionError):
        close(on.T @ procrustes(x, protos[y], 0.0), on.T @ torch.from_numpy(fx["cv"]["w"]), what="β = 0")
    draws = Replay(fx["inputs"]["draws"])
    cv_beta(x, protos, y, draws)
    w, _, _ = refine(x, protos, y, torch.from_numpy(fx["cv"]["w"]).clone(), config(fx, gaussian_noise=0.0, dropout=0.0),
                     draws)
    with pytest.raises(AssertionError):
        close(w, fx["final"]["w"], what="no noise, no dropout")
