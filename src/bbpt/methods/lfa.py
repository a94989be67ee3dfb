"""LFA (Ouali et al., ICCV 2023): black-box few-shot adaptation from returned embeddings.

A linear map W (E x E) takes image embeddings to the class texts' embeddings; class scores
are cos(W-mapped image, class prototype) / 0.07. From the official ``feature_alignment.py``
(main, the supervised path):

1. **β-Procrustes initialisation** (closed form): with X (N, E) the few-shot image
   embeddings and T[y] (N, E) their classes' prototypes, U Σ Vᵀ = SVD(Xᵀ T[y]) and
   W = U Vᵀ - (U Vᵀ - I) β, the orthogonal Procrustes solution pulled towards the
   identity. β is chosen by cross-validation (``cross_validation_beta_procrustes``): for
   each of 25 values linspace(0, 1), 3 random 80 / 20 splits of the few-shot set, the mean
   top-1 accuracy (percent, rounded to 2 decimals) of the map fitted on 80 % and tested on
   20 %; the first best wins, and W is refitted on the whole set.
2. **Refinement** (``mapping_refinement``): n_iters steps of AdamW (lr 5e-4, weight decay
   5e-4, eps 1e-8) with a cosine schedule down to 1e-7, each on a random 75 % of the set;
   with probability 1/2 Gaussian noise (std 0.035) is added to the batch's embeddings, and
   with probability 1/2 dropout (p 0.05); the loss is the adaptive re-ranking loss
   (ARerank, ``alignment_utils.py`` adaptive_reranking_loss): for each image, its k = 3
   nearest prototypes (Euclidean, after L2 normalisation) must lie farther than its own
   class's by the margin (1 - cos(t_k, t_y)) / 4. The last iterate is the map. An EMA of the
   iterates (momentum 0.9 ramped to 1) is kept too: the release's map for new classes
   ("Two mappings", ``feature_alignment.py`` 461-469), which ``apply`` uses on classes
   other than the fitted ones.

Defaults are the release's argparse defaults (``feature_alignment.py`` 517-542) and its
README's 16-shot runs; ``preset=<dataset>`` sets that README's per-dataset n_iters.
Deviations: the release embeds five crops of each training image (``--five-crop``) and
refines on one random crop per image; an API is sent each image once (the test transform,
or a training view with ``augment``). The release's random draws come from the global
RNGs seeded once (``RNG_SEED 1``); bbpt's from generators seeded by the run's seed.
Queries: the few-shot images and the C x T class texts, once each.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .base import Preset, register_method
from .embedding import EmbeddingConfig, EmbeddingMethod

RELEASE = "saic-fi/LFA @2ee3bba"
README_ITERS = {"caltech101": 1000, "dtd": 1000, "eurosat": 100, "food101": 100, "fgvc": 1000, "oxford_flowers": 100,
                "oxford_pets": 30, "stanford_cars": 2000, "sun397": 100, "ucf101": 200, "imagenet": 200}
PRESETS = {name: Preset(f"README.md, Standard Few-shot classification ({RELEASE})",
                        {"n_iters": (n, f"README.md: Niters for this dataset {n} (16 shots, ViT-B/16)")})
           for name, n in README_ITERS.items()}


class LFAConfig(EmbeddingConfig):
    budget: int | None = Field(None, ge=1, description="api_calls; none: no limit (a fixed, small number of "
                               "embedding requests)")
    beta_procrustes: float | None = Field(None, ge=0, le=1, description="β of the initialisation; none: "
                                          "cross-validated over cv_tries values in [0, 1]")
    cv_tries: int = Field(25, ge=1, le=1000, description="β values tried by the cross-validation")
    cv_samples: int = Field(3, ge=1, le=100, description="random 80/20 splits per β value")
    n_iters: int = Field(200, ge=0, le=1_000_000, description="refinement steps")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")
    end_lr: float = Field(1e-7, ge=0, description="the cosine schedule's last learning rate")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay")
    refine_batch: int | None = Field(None, ge=1, le=10_000_000, description="images per refinement step; none: "
                                     "75 % of the few-shot set")
    loss: Literal["arerank", "csls"] = Field("arerank", description="refinement loss: adaptive re-ranking or CSLS")
    knn: int = Field(3, ge=1, le=10_000, description="neighbours in the loss")
    arerank_scale: float = Field(4.0, gt=0, description="ARerank's margin divisor")
    gaussian_noise: float = Field(0.035, ge=0, description="std of the noise added to a batch (with probability 1/2)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on a batch's embeddings (with probability 1/2)")
    temperature: float = Field(0.07, gt=0, description="scores are cosines / temperature")
    preset: str | None = Field(None, description="the README's per-dataset n_iters, e.g. 'imagenet'")

    sources = {
        "budget": "bbpt: none (the fit's cost is fixed by the data: the few-shot images and the C x T class texts "
                  "once each)",
        "beta_procrustes": f"official feature_alignment.py 537 (--beta-procrustes None: cross-validated, 415-421) "
                           f"({RELEASE})",
        "cv_tries": f"official feature_alignment.py 67: num_of_tries=25 ({RELEASE})",
        "cv_samples": f"official feature_alignment.py 68: num_samples=3 ({RELEASE})",
        "n_iters": f"official feature_alignment.py 524 and README (NitersImageNet=200; others via preset=) "
                   f"({RELEASE})",
        "lr": f"official feature_alignment.py 526: --learning-rate 5e-4 ({RELEASE})",
        "end_lr": f"official feature_alignment.py 527: --cosine-end-lr 1e-7 ({RELEASE})",
        "weight_decay": f"official feature_alignment.py 528: --weight-decay 5e-4 ({RELEASE})",
        "refine_batch": f"official feature_alignment.py 252-254: int(0.75 N) without --five-crop ({RELEASE})",
        "loss": f"official feature_alignment.py 517-521: --refinement-loss adaptive ({RELEASE})",
        "knn": f"official feature_alignment.py 531: --knn 3 ({RELEASE})",
        "arerank_scale": f"official feature_alignment.py 532: --arerank-scale 4.0 ({RELEASE})",
        "gaussian_noise": f"official feature_alignment.py 539: --gaussian-noise 0.035 ({RELEASE})",
        "dropout": f"official feature_alignment.py 540: --dropout 0.05 ({RELEASE})",
        "temperature": f"official alignment_utils.py 255: get_acc softmax_temp=0.07 ({RELEASE})",
        "augment": f"official README runs --five-crop ({RELEASE}); bbpt: the task's test transform (off on the "
                   "28-32 px offline tasks)",
        "preset": f"official README.md, Standard Few-shot classification ({RELEASE})",
    }


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, p=2, keepdim=True)


def procrustes(src: torch.Tensor, tgt: torch.Tensor, beta) -> torch.Tensor:
    """β-Procrustes: U Vᵀ of SVD(srcᵀ tgt), pulled towards the identity by β."""
    u, _, v = torch.svd(src.T @ tgt)
    w = u @ v.T
    return w - (w - torch.eye(w.size(0))) * beta


def top1(x: torch.Tensor, protos: torch.Tensor, y: torch.Tensor, temperature: float = 0.07) -> np.float32:
    """Top-1 accuracy in percent, rounded to 2 decimals, as the release scores (float32)."""
    pred = ((x @ protos.T) / temperature).softmax(-1).topk(1, dim=1)[1][:, 0]
    return ((pred == y).float().sum() / y.size(0) * 100.0).numpy().round(2)


def arerank_loss(v: torch.Tensor, protos: torch.Tensor, y: torch.Tensor, scale: float = 4.0, knn: int = 3):
    """Adaptive re-ranking: mean over images and their k nearest prototypes of
    max(0, d(v, t_y) + (1 - cos(t_k, t_y)) / scale - d(v, t_k)), all L2-normalised."""
    knn = min(knn, protos.shape[0])
    v, protos = l2_norm(v), l2_norm(protos)
    dist, order = torch.sort(torch.cdist(v, protos, p=2), dim=1)  # (B, C) ascending
    anchor = ((v - protos[y]) ** 2).sum(-1).sqrt().unsqueeze(1)  # (B, 1)
    pos = protos[y].unsqueeze(1)  # (B, 1, E)
    margins = (1.0 - (protos[order[:, :knn]] * pos).sum(-1)) / scale  # (B, k)
    return torch.max(anchor + margins - dist[:, :knn], torch.zeros(len(v), knn)).mean()


def csls_loss(v: torch.Tensor, t: torch.Tensor, knn: int = 3):
    """-mean CSLS(v_i, t_i): 2 cos - mean top-1 cos of v to t - mean top-k cos of t to v."""
    v, t = l2_norm(v), l2_norm(t)
    r_v = (v @ t.T).topk(1, dim=1)[0].mean(1)
    r_t = (t @ v.T).topk(min(knn, len(v)), dim=1)[0].mean(1)
    return -(2 * (v * t).sum(-1) - r_v - r_t).mean()


def log_rampup(current: float, length: int) -> float:
    if length == 0:
        return 1.0
    return float(1 - np.exp(-5.0 * np.clip(current, 0.0, length) / length))


class Draws:
    """The refinement's random draws, from generators seeded by the run's seed (the parity
    test replays the release's instead): permutations, coin flips, noise, dropout masks."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.g)

    def uniform(self) -> float:
        return float(self.rng.uniform())

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.g)

    def dropout_noise(self, shape, p: float) -> torch.Tensor:
        """Bernoulli(1 - p) / (1 - p), as ATen's dropout scales its mask."""
        return torch.empty(shape).bernoulli_(1 - p, generator=self.g).div_(1 - p)


def cv_beta(x, protos, y, draws, tries: int = 25, samples: int = 3, temperature: float = 0.07):
    """The release's β cross-validation; returns (W on all of x, β, per-β mean scores)."""
    best_beta, max_score, scores = 0.0, float("-inf"), []
    n_tr = int(len(x) * 0.8)
    for beta in torch.linspace(0.0, 1.0, tries):
        score = 0.0
        for _ in range(samples):
            perm = draws.perm(len(x))
            xp, yp = x[perm], y[perm]
            w = procrustes(xp[:n_tr], protos[yp[:n_tr]], beta.item())
            score += top1(l2_norm(xp[n_tr:] @ w), protos, yp[n_tr:], temperature)
        score = score / samples
        scores.append(score)
        if score > max_score:
            max_score, best_beta = score, beta
    return procrustes(x, protos[y], best_beta), float(best_beta), scores


def refine(x, protos, y, w0, cfg: LFAConfig, draws, trace: list | None = None):
    """The release's mapping refinement; returns (last map, EMA map, losses)."""
    n = len(x)
    bs = cfg.refine_batch or int(n * 0.75)
    w = torch.nn.Parameter(w0.clone())
    ema = torch.eye(w0.size(1))
    opt = torch.optim.AdamW([w], lr=cfg.lr, eps=1e-08, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.n_iters, eta_min=cfg.end_lr)
    text = protos[y]
    losses = []
    for it in range(cfg.n_iters):
        opt.zero_grad()
        idx = draws.perm(n)[:bs]
        xb, tb, yb = x[idx], text[idx], y[idx]
        if cfg.gaussian_noise > 0.0 and draws.uniform() > 0.5:
            xb = xb + draws.randn(xb.shape) * cfg.gaussian_noise
        if cfg.dropout > 0.0 and draws.uniform() > 0.5:
            xb = xb * draws.dropout_noise(xb.shape, cfg.dropout)
        if cfg.loss == "arerank":
            loss = arerank_loss(xb @ w, protos, yb, cfg.arerank_scale, cfg.knn)
        else:
            loss = csls_loss(xb @ w, tb, cfg.knn)
        loss.backward()
        opt.step()
        sched.step()
        m = 0.1 * log_rampup(it, cfg.n_iters // 2) + 0.9
        ema = m * ema + (1.0 - m) * w.data
        losses.append(float(loss.detach()))
        if trace is not None:
            trace.append({"loss": loss.detach().clone(), "w": w.detach().clone(), "ema": ema.clone()})
    return w.detach().clone(), ema, losses


@register_method
class LFA(EmbeddingMethod):
    name = "lfa"
    Config = LFAConfig
    presets = PRESETS

    def fit(self, x, y, text, val):
        x = x.reshape(-1, x.shape[-1])
        y = y.repeat(len(x) // len(y))
        cfg, draws = self.cfg, Draws(self.seed)
        if cfg.beta_procrustes is None:
            w0, beta, _ = cv_beta(x, text, y, draws, cfg.cv_tries, cfg.cv_samples, cfg.temperature)
        else:
            w0, beta = procrustes(x, text[y], cfg.beta_procrustes), cfg.beta_procrustes
        w, ema, losses = refine(x, text, y, w0, cfg, draws)
        last = arerank_loss(x @ w, text, y, cfg.arerank_scale, cfg.knn) if cfg.loss == "arerank" else csls_loss(
            x @ w, text[y], cfg.knn)
        stats = {"train_loss": float(last), "beta_procrustes": beta,
                 "train_accuracy_init": float(top1(l2_norm(x @ w0), text, y)) / 100,
                 "train_accuracy": float(top1(l2_norm(x @ w), text, y)) / 100}
        return {"w": w, "ema": ema, "text": text, "beta_procrustes": torch.tensor(beta, dtype=torch.float64),
                "temperature": torch.tensor(cfg.temperature, dtype=torch.float64)}, stats

    @classmethod
    def logits(cls, fit, f, text, same):
        """cos(f W, t_c) / temperature; on other classes the EMA map (the release's map for new classes)."""
        w = fit["w"] if same else fit["ema"]
        return l2_norm(f @ w) @ text.T / float(fit["temperature"])
