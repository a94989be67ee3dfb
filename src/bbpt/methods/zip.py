"""ZIP (Park et al., ICLR 2025): zeroth-order intrinsic-dimensional prompt tuning.

Soft context θ (m × D) reparameterised as θ_i = θ_0,i + M_i w_i with
W = U diag(s) Vᵀ + u ⊗ 1 (low rank + feature sharing), δ = r(q + m + 1) + q parameters
(417 at m = 8, intrinsic dimension 500, rank 5); optimised by SPSA with N = 5 perturbation
pairs per step (10 api_calls on one 128-image batch) and intrinsic-dimensional clipping
α_t = min(√δ / ‖ĝ‖, 1); step sizes a_k = a/(k+o)^α, c_k = c/k^γ.

Official-code behaviour as options: ``ctx_init="random"`` (the code's N(0, 0.02) context;
the default starts from the task template's words) and ``perturbation="segmented"`` (|Δ| ~
U[0.5, 1]; the default is Spall's Rademacher). Ablations: ``low_rank=False``,
``feature_sharing=False``, ``clip="none"`` or a fixed threshold.
"""
from __future__ import annotations

from typing import Literal

from ..models.blackbox import SoftPrompt
from ..optim import SPSA, SPSASchedule, ZOSGD
from ..params import ZIPProjection
from .base import Method, MethodConfig, register_method
from .common import BatchStream, ce_per_candidate, initial_context


class SPSAConfig(MethodConfig):
    """SPSA on 128-image batches (ZIP / BlackVIP): N pairs per step, a_k and c_k schedules."""

    budget: int | None = 5000  # api_calls
    n_perturb: int = 5
    perturbation: Literal["rademacher", "segmented"] = "rademacher"
    a: float = 0.01
    c: float = 0.01
    o: float = 1.0
    alpha: float = 0.4
    gamma: float = 0.1

    def schedule(self) -> SPSASchedule:
        return SPSASchedule(a=self.a, c=self.c, o=self.o, alpha=self.alpha, gamma=self.gamma)


class SPSAPromptConfig(SPSAConfig):
    """ZIP's loop: SPSA on a soft context, one 128-image batch per step."""

    n_ctx: int = 8
    ctx_init: str = "template"  # "template" | "random" (official code) | a phrase
    clip: float | Literal["intrinsic", "none"] = "none"  # √δ, no clipping, or a fixed threshold


class ZIPConfig(SPSAPromptConfig):
    intrinsic_dim: int = 500
    rank: int = 5
    projection: Literal["fastfood", "gaussian"] = "fastfood"
    low_rank: bool = True
    feature_sharing: bool = True
    clip: float | Literal["intrinsic", "none"] = "intrinsic"


@register_method
class ZIP(Method):
    name = "zip"
    Config = ZIPConfig

    def __init__(self, cfg: ZIPConfig, box, data, task_info, seed):
        super().__init__(cfg, box, data, task_info, seed)
        ctx0 = initial_context(box, cfg.ctx_init, cfg.n_ctx, task_info["templates"], seed)
        self.param = self.build_param(cfg, ctx0, seed)
        clip = None if cfg.clip == "none" else cfg.clip
        self.opt = ZOSGD(self.param.init(), SPSA(cfg.n_perturb, cfg.perturbation), cfg.schedule(), clip=clip, seed=seed)
        self.batches = BatchStream(data, cfg.batch_size, seed)

    def build_param(self, cfg, ctx0, seed):
        return ZIPProjection(ctx0, cfg.intrinsic_dim, cfg.rank, cfg.projection, cfg.low_rank, cfg.feature_sharing, seed)

    def step(self):
        images, y = self.batches.next()
        points = self.opt.ask()  # (2N, δ)
        logits = self.box.query(SoftPrompt(self.param.decode(points)), images)  # (2N, B, C)
        losses = ce_per_candidate(logits, y)  # (2N,)
        self.opt.tell(losses)
        return {"train_loss": float(losses.mean()), **self.opt.last}

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.opt.w))
