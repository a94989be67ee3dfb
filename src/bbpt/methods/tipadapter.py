"""Tip-Adapter (Zhang et al., ECCV 2022), training-free, on returned embeddings.

A cache model over the few-shot set beside CLIP's zero-shot classifier:

    keys K (N, E): the few-shot image embeddings (mean over ``augment_epoch`` augmented
                   passes, re-normalised); values V (N, C): their one-hot labels;
    logits(f) = 100 f Wᵀ + α · exp(−β (1 − f Kᵀ)) V

W (C, E) the class prototypes of the task's templates (each class's template embeddings
averaged and re-normalised). α (residual ratio) and β (sharpness) start at the official
``init_alpha`` / ``init_beta`` and are then searched on the few-shot validation split over
the official grid: β_i = i (scale_β − 0.1) / steps_β + 0.1, α_j likewise, i < steps, keeping
the first best validation accuracy (``utils.py`` search_hp; ``main.py`` run_tip_adapter).
``preset=<dataset>`` is one file of the release's ``configs/`` (every value listed by
``bbpt methods tipadapter --sources``); explicit options win.

Deviations: the release averages raw CLIP features over its 10 augmented passes before
normalising; an API returns unit vectors, so those are averaged. Without training views
(the offline tasks' default) the passes are identical and one is embedded. The release
computes in float16 on a GPU (CLIP's dtype); bbpt in float32. Tip-Adapter-F (fine-tuned
keys) is not implemented. On other classes than the fitted ones the cache cannot apply
and ``apply`` gives the zero-shot term alone.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Preset, register_method
from .embedding import EmbeddingConfig, EmbeddingMethod

RELEASE = "gaopengcuhk/Tip-Adapter @d0e2d6f"
CONFIGS = {  # configs/<name>.yaml: search_scale [β, α], init_alpha (search_step [200, 20], init_beta 1 in all)
    "caltech101": ((12, 5), 3.0), "dtd": ((13, 13), 2.0), "eurosat": ((12, 10), 2.0), "fgvc": ((30, 30), 5.0),
    "food101": ((10, 10), 1.17), "imagenet": ((7, 3), 1.17), "oxford_flowers": ((50, 50), 10.0),
    "oxford_pets": ((7, 3), 1.17), "stanford_cars": ((20, 10), 3.0), "sun397": ((12, 10), 1.17),
    "ucf101": ((7, 3), 3.0),
}
PRESETS = {name: Preset(f"configs/{name}.yaml ({RELEASE})", {
    "scale_beta": (float(sb), f"configs/{name}.yaml: search_scale[0] {sb}"),
    "scale_alpha": (float(sa), f"configs/{name}.yaml: search_scale[1] {sa}"),
    "init_alpha": (a, f"configs/{name}.yaml: init_alpha {a}"),
}) for name, ((sb, sa), a) in CONFIGS.items()}


class TipAdapterConfig(EmbeddingConfig):
    budget: int | None = Field(None, ge=1, description="api_calls; none: no limit (a fixed, small number of "
                               "embedding requests)")
    init_alpha: float = Field(1.17, ge=0, description="α, the cache's weight, before (or without) the search")
    init_beta: float = Field(1.0, ge=0, description="β, the cache's sharpness, before (or without) the search")
    search: bool = Field(True, description="search α and β on the val split (the release's search_hp)")
    scale_beta: float = Field(7.0, gt=0, description="β grid: i (scale_beta − 0.1) / steps_beta + 0.1")
    scale_alpha: float = Field(3.0, gt=0, description="α grid: j (scale_alpha − 0.1) / steps_alpha + 0.1")
    steps_beta: int = Field(200, ge=1, le=100_000, description="β grid points")
    steps_alpha: int = Field(20, ge=1, le=100_000, description="α grid points")
    augment_epoch: int = Field(10, ge=1, le=1000, description="augmented passes averaged into the keys (one "
                               "without training views)")
    crop_min: float | None = Field(None, gt=0, le=1, description="smallest crop of a training view; none: 0.5 "
                                   "(the release's RandomResizedCrop(scale=(0.5, 1)))")
    preset: str | None = Field(None, description="an official per-dataset config (configs/<name>.yaml), e.g. "
                               "'caltech101'; explicit options win")

    sources = {
        "budget": "bbpt: none (the fit's cost is fixed by the data: the few-shot and val images once each, the "
                  "C x T class texts once)",
        "init_alpha": f"official configs/imagenet.yaml: init_alpha 1.17 ({RELEASE}; other datasets via preset=)",
        "init_beta": f"official configs/*.yaml: init_beta 1 ({RELEASE})",
        "search": f"official configs/*.yaml: search_hp True; utils.py search_hp on the val features ({RELEASE})",
        "scale_beta": f"official configs/imagenet.yaml: search_scale[0] 7 ({RELEASE}; others via preset=)",
        "scale_alpha": f"official configs/imagenet.yaml: search_scale[1] 3 ({RELEASE}; others via preset=)",
        "steps_beta": f"official configs/*.yaml: search_step[0] 200 ({RELEASE})",
        "steps_alpha": f"official configs/*.yaml: search_step[1] 20 ({RELEASE})",
        "augment_epoch": f"official configs/*.yaml: augment_epoch 10 (utils.py build_cache_model) ({RELEASE})",
        "augment": f"official main.py: the cache's passes use RandomResizedCrop(scale=(0.5, 1)) + flip ({RELEASE}); "
                   "bbpt: off on the 28-32 px offline tasks",
        "crop_min": f"official main.py train_tranform: RandomResizedCrop(scale=(0.5, 1)) ({RELEASE})",
        "preset": f"official configs/*.yaml ({RELEASE})",
    }
    official_crop_min: ClassVar[float] = 0.5


def grid(scale: float, steps: int) -> list[float]:
    """The release's search list: [i (scale − 0.1) / steps + 0.1 for i < steps] (utils.py search_hp)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def tip_logits(f: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor, alpha: float,
               beta: float) -> torch.Tensor:
    """(B, E) embeddings -> (B, C): 100 f Wᵀ + α exp(−β (1 − f Kᵀ)) V."""
    affinity = f @ keys.T  # (B, N)
    cache = ((-1) * (beta - beta * affinity)).exp() @ values  # (B, C)
    return 100.0 * f @ text.T + cache * alpha


def search_hp(keys, values, text, f, y, betas: list[float], alphas: list[float]) -> tuple[float, float, int]:
    """The first (β, α) of the grid with the most correct val predictions, β outer, α inner;
    (0, 0) when none is right (the release's start). Returns (β, α, correct)."""
    affinity, clip = f @ keys.T, 100.0 * f @ text.T
    best, best_beta, best_alpha = 0, 0.0, 0.0
    for beta in betas:
        cache = ((-1) * (beta - beta * affinity)).exp() @ values
        for alpha in alphas:
            n = int(((clip + cache * alpha).argmax(-1) == y).sum())
            if n > best:
                best, best_beta, best_alpha = n, beta, alpha
    return best_beta, best_alpha, best


@register_method
class TipAdapter(EmbeddingMethod):
    name = "tipadapter"
    Config = TipAdapterConfig
    presets = PRESETS
    uses_val = True

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.uses_val = cfg.search
        self.val = env.val if cfg.search else None

    def train_passes(self):
        if self.data.views is None:
            return [self.data.images()]
        n = len(self.data)
        return [self.data.images(None, np.full(n, v)) for v in range(self.cfg.augment_epoch)]

    def fit(self, x, y, text, val):
        keys = F.normalize(x.mean(0), dim=-1)  # (N, E)
        values = F.one_hot(y, self.box.num_classes).float()  # (N, C)
        alpha, beta = float(self.cfg.init_alpha), float(self.cfg.init_beta)
        stats = {}
        if val is not None and len(val[1]):
            xv, yv = val
            stats["val_accuracy_init"] = float((tip_logits(xv, keys, values, text, alpha, beta).argmax(-1) == yv)
                                               .float().mean())
            beta, alpha, n = search_hp(keys, values, text, xv, yv, grid(self.cfg.scale_beta, self.cfg.steps_beta),
                                       grid(self.cfg.scale_alpha, self.cfg.steps_alpha))
            stats["val_accuracy"] = n / len(yv)
        loss = float(F.cross_entropy(tip_logits(keys, keys, values, text, alpha, beta), y))
        fit = {"keys": keys, "values": values, "text": text, "alpha": torch.tensor(alpha, dtype=torch.float64),
               "beta": torch.tensor(beta, dtype=torch.float64)}
        return fit, {"train_loss": loss, "alpha": alpha, "beta": beta, **stats}

    @classmethod
    def logits(cls, fit, f, text, same):
        if not same:  # the cache's labels are the fitted classes: zero-shot alone
            return 100.0 * f @ text.T
        return tip_logits(f, fit["keys"], fit["values"], text, float(fit["alpha"]), float(fit["beta"]))
