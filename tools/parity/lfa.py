"""Parity fixture for LFA: the official β-Procrustes cross-validation and mapping refinement
of ``feature_alignment.py`` run on fixed embeddings.

    python tools/parity/lfa.py /path/to/LFA      # a checkout of saic-fi/LFA at 2ee3bba

writes tests/parity/lfa.json.

What runs is the official code, compiled from its files by syntax tree (the files import
sklearn, geomloss, loguru and the dataset code at the top, none of which these statements
use): ``feature_alignment.py`` procrustes_align, log_rampup,
cross_validation_beta_procrustes, mapping_refinement; ``alignment_utils.py`` l2_norm,
tensors_to_device, get_loss_func, adaptive_reranking_loss, get_acc, get_accuracies;
``utils.py`` topk_accuracies. ``main()``'s supervised path is followed (feature_alignment.py
390-451): β cross-validated, then ``mapping_refinement`` with ``batch_size=None`` and the
argparse defaults, for 6 iterations. The embeddings stand in for ``load_features`` (unit
vectors, as CLIP's normalised features and an API's are). Every random draw the official
code makes (torch.randperm, np.random.uniform, torch.randn_like, F.dropout's mask) is
recorded, so bbpt's test replays them.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from fixture import write
from official import Checkout, command, environment, function, official_section, stub

N_PER_CLASS, C, E, N_TEST, N_ITERS, SEED = 4, 5, 16, 10, 6, 6  # seed 6: noise and dropout both fire
ARGS = dict(n_iters=N_ITERS, five_crop=False, learning_rate=5e-4, weight_decay=5e-4, cosine_end_lr=1e-7,
            interpolate_features=False, gaussian_noise=0.035, dropout=0.05, knn=3, spectral_proj=False,
            orthogonalize=False, orth_beta=0.01, arerank_scale=4.0, refinement_loss="adaptive")  # 517-542


def inputs() -> dict:
    g = torch.Generator().manual_seed(1234)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    protos = unit(C, E)
    y = torch.arange(C).repeat(N_PER_CLASS)
    x = torch.nn.functional.normalize(protos[y] * 0.6 + unit(len(y), E), dim=-1)  # near their class, not on it
    yt = torch.arange(C).repeat(N_TEST // C)
    xt = torch.nn.functional.normalize(protos[yt] * 0.6 + unit(len(yt), E), dim=-1)
    return {"x": x, "y": y, "protos": protos, "x_test": xt, "y_test": yt}


class Recorder:
    """Wraps the global RNG consumers the official code calls and records what they drew."""

    def __init__(self):
        self.perm, self.uniform, self.randn, self.dropout = [], [], [], []
        self.saved = (torch.randperm, np.random.uniform, torch.randn_like, torch.nn.functional.dropout)

    def __enter__(self):
        randperm, uniform, randn_like, dropout = self.saved

        def rec_perm(*a, **k):
            out = randperm(*a, **k)
            self.perm.append(out.clone())
            return out

        def rec_uniform(*a, **k):
            out = uniform(*a, **k)
            self.uniform.append(float(out))
            return out

        def rec_randn(x, *a, **k):
            out = randn_like(x, *a, **k)
            self.randn.append(out.clone())
            return out

        def rec_dropout(x, p=0.5, training=True, inplace=False):
            out = dropout(x, p=p, training=training, inplace=inplace)
            noise = (out != 0).float()
            noise.div_(1 - p)  # ATen's dropout: input * bernoulli(1 - p).div_(1 - p)
            self.dropout.append(noise)
            return out

        torch.randperm, np.random.uniform, torch.randn_like, torch.nn.functional.dropout = (
            rec_perm, rec_uniform, rec_randn, rec_dropout)
        return self

    def __exit__(self, *exc):
        torch.randperm, np.random.uniform, torch.randn_like, torch.nn.functional.dropout = self.saved


def main(path: str) -> None:
    import tqdm

    co = Checkout(path, "saic-fi/LFA")
    ns = {"torch": torch, "np": np, "argparse": argparse, "partial": partial, "tqdm": tqdm.tqdm,
          "logger": stub("logger", info=lambda *a, **k: None), "N_AUGMENTATIONS": 5}
    exec("from typing import Any, Callable, Dict, List, Optional, Tuple, Union", ns)
    statements = []
    for rel, names in (("utils.py", ["topk_accuracies"]),
                       ("alignment_utils.py", ["l2_norm", "tensors_to_device", "get_loss_func",
                                               "adaptive_reranking_loss", "get_acc", "get_accuracies"]),
                       ("feature_alignment.py", ["procrustes_align", "log_rampup", "cross_validation_beta_procrustes",
                                                 "mapping_refinement"])):
        for name in names:
            code, lines = co.block(rel, lambda tree, n=name: [function(tree, n)])
            exec(code, ns)
            statements.append({"file": rel, "lines": lines, "what": name})
    statements.append({"file": "feature_alignment.py", "lines": [390, 451],
                       "what": "main(): the supervised path (β cross-validated, then refinement with batch_size None)"})

    inp = inputs()
    train = {"visual_features": inp["x"], "labels": inp["y"], "text_features": inp["protos"]}
    test = [{"visual_features": inp["x_test"], "labels": inp["y_test"], "text_features": inp["protos"]}]
    scores, transforms = [], []
    get_accuracies = ns["get_accuracies"]

    def recording_accuracies(train_arrays, test_arrays, transform=None, **kw):
        acc = get_accuracies(train_arrays, test_arrays, transform=transform, **kw)
        (scores if len(test_arrays[0]["labels"]) < N_TEST else transforms).append(
            (acc["test"]["top_1"], None if transform is None else transform.detach().clone()))
        return acc

    ns["get_accuracies"] = recording_accuracies
    losses = []
    args = argparse.Namespace(**ARGS)
    loss_func = ns["get_loss_func"](args)

    def recording_loss(**kw):
        loss = loss_func(**kw)
        losses.append(loss.detach().clone())
        return loss

    torch.manual_seed(SEED)  # seed_everything(cfg.RNG_SEED) (utils.py 14-21), with RNG_SEED 6
    np.random.seed(SEED)
    with Recorder() as rec:
        w_cv = ns["cross_validation_beta_procrustes"](inp["x"], inp["protos"], inp["y"], five_crop=False)
        n_cv_perms = len(rec.perm)
        w, ema = ns["mapping_refinement"](args, loss_func=recording_loss, init_transfm=w_cv, train_arrays=train,
                                          test_arrays=test, train_visual_feats=inp["x"],
                                          train_text_feats=inp["protos"][inp["y"]], class_prototypes=inp["protos"],
                                          labels=inp["y"], batch_size=None, return_ema_transform=True)
    cv_top1 = np.array([s for s, _ in scores], dtype=np.float32).reshape(25, 3)
    traj = [{"loss": loss, "w": t} for loss, (_, t) in zip(losses, transforms)]
    fixture = {
        "method": "lfa",
        "official": official_section(co, statements),
        "regenerate": command("lfa.py", co),
        "environment": environment(),
        "notes": [
            "The release refines on five crops per image (--five-crop) with one random crop per step; an API embeds "
            "each image once, so the path without --five-crop is compared (batch_size = int(0.75 N)).",
            "The release draws from the global RNGs (RNG_SEED 1); the draws are recorded here and replayed into "
            "bbpt's Draws, which otherwise draws from generators seeded by the run's seed.",
            "Inputs are unit vectors, as load_features normalises CLIP's features (alignment_utils.py 352-354).",
        ],
        "inputs": {**inp, "args": ARGS, "n_cv_perms": n_cv_perms,
                   "draws": {"perm": rec.perm, "uniform": rec.uniform, "randn": rec.randn, "dropout": rec.dropout}},
        "cv": {"top1": cv_top1, "w": w_cv},
        "trajectory": traj,
        "final": {"w": w, "ema": ema},
    }
    print(write("lfa", fixture))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
