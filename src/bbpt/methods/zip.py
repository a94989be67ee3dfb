"""ZIP (Park et al., ICLR 2025): zeroth-order intrinsic-dimensional prompt tuning.

Soft context θ (m × D) reparameterised as θ_i = θ_0,i + M_i w_i with
W = U diag(s) Vᵀ + u ⊗ 1 (low rank + feature sharing), δ = r(q + m + 1) + q parameters
(417 at m = 8, intrinsic dimension 500, rank 5); optimised by SPSA with N = 5 perturbation
pairs per step (10 api_calls on one 128-image batch) and intrinsic-dimensional clipping
α_t = min(√δ / ‖ĝ‖, 1); step sizes a_k = a/(k+o)^α, c_k = c/k^γ.

Defaults and their sources: the paper (poster) gives the parameterisation, N, the clipping
and the budget; where it is silent or could not be checked the official release decides:
8 random N(0, 0.02²) context tokens (``CTX_INIT`` unset in every script) and segmented
perturbations (|Δ| ~ U[0.5, 1], random sign; ``trainers/zip.py``). The earlier bbpt
behaviour stays available: ``ctx_init="template"`` (the task template's words, left-padded)
and ``perturbation="rademacher"`` (Spall's ±1). Ablations: ``low_rank=False``,
``feature_sharing=False``, ``clip="none"`` or a fixed threshold.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..data.staging import BatchStream
from ..models.blackbox import SoftPrompt
from ..optim import SPSA, SPSASchedule, ZOSGD
from ..params import ZIPProjection
from .base import MethodConfig, ZerothOrderMethod, register_method
from .common import initial_context

Clip = Annotated[float, Field(gt=0)] | Literal["intrinsic", "none"]


class SPSAConfig(MethodConfig):
    """SPSA on 128-image batches (ZIP / BlackVIP): N pairs per step, a_k and c_k schedules."""

    budget: int | None = Field(5000, ge=1, description="api_calls (ZIP's cap)")
    n_perturb: int = Field(5, ge=1, le=1000, description="perturbation pairs per step (2N candidates, one query)")
    perturbation: Literal["rademacher", "segmented"] = Field(
        "segmented", description="Δ: |Δ| ~ U[0.5, 1] with a random sign (official code), or ±1 (Spall)")
    a: float = Field(0.01, gt=0, description="step size a_k = a / (k + o)^alpha")
    c: float = Field(0.01, gt=0, description="perturbation size c_k = c / k^gamma")
    o: float = Field(1.0, ge=0, description="stability offset o in a_k")
    alpha: float = Field(0.4, ge=0, le=2, description="decay exponent of a_k")
    gamma: float = Field(0.1, ge=0, le=2, description="decay exponent of c_k")

    def schedule(self) -> SPSASchedule:
        return SPSASchedule(a=self.a, c=self.c, o=self.o, alpha=self.alpha, gamma=self.gamma)

    sources = {

        "budget": "ZIP's re-implementation (scripts): MAX_API_CALLS=5000 for every method it runs",
        "n_perturb": "official ZIP / BlackVIP: SP_AVG=5",
        "perturbation": "official ZIP / BlackVIP code: segmented uniform |Δ| ~ U[0.5, 1], random sign",
        "a": "official ZIP / BlackVIP: SPSA_PARAMS [o, c, a, alpha, gamma] = [1.0, 0.01, 0.01, 0.4, 0.1]",
        "c": "official ZIP / BlackVIP: SPSA_PARAMS",
        "o": "official ZIP / BlackVIP: SPSA_PARAMS",
        "alpha": "official ZIP / BlackVIP: SPSA_PARAMS",
        "gamma": "official ZIP / BlackVIP: SPSA_PARAMS",
    }


class SPSAPromptConfig(SPSAConfig):
    """ZIP's loop: SPSA on a soft context, one 128-image batch per step."""

    n_ctx: int = Field(8, ge=1, le=75, description="context tokens m")
    ctx_init: str = Field("random", min_length=1,
                          description="'random' (N(0, 0.02²)), 'template' (the task template's words) or a phrase")
    clip: Clip = Field("none", description="gradient clipping: 'intrinsic' (√δ), 'none', or a positive threshold")

    sources = {

        "n_ctx": "official ZIP: N_CTX=8",
        "ctx_init": "official ZIP code: CTX_INIT unset -> nn.init.normal_(std=0.02)",
        "clip": "official ZIP: OPT_TYPE='spsa' (no clipping) for plain SPSA",
    }


class ZIPConfig(SPSAPromptConfig):
    intrinsic_dim: int = Field(500, ge=1, le=1_000_000, description="intrinsic dimension, q = intrinsic_dim // n_ctx "
                               "per token")
    rank: int = Field(5, ge=1, le=1000, description="rank r of the low-rank W = U diag(s) Vᵀ")
    projection: Literal["fastfood", "gaussian"] = Field("fastfood", description="per-token map R^q -> R^D")
    low_rank: bool = Field(True, description="low-rank W (False: a free m × q matrix; ablation)")
    feature_sharing: bool = Field(True, description="shared vector u added to every token's w_i (ablation)")
    clip: Clip = Field("intrinsic", description="gradient clipping: 'intrinsic' (√δ), 'none', or a positive threshold")

    sources = {

        "budget": "official scripts: MAX_API_CALLS=5000 (the poster gives no number)",
        "perturbation": "official: trainers/zip.py, segmented uniform |Δ| ~ U[0.5, 1] (the paper could not be checked)",
        "ctx_init": "official: CTX_INIT unset in every script -> nn.init.normal_(std=0.02) (the paper could not be checked)",
        "intrinsic_dim": "official scripts: INTRINSIC_DIM=500 (train.py's 1000 is overridden)",
        "rank": "official scripts: RANK=5",
        "projection": "official: projections/intrinsic.py, Fastfood per token",
        "low_rank": "paper: low-rank approximation",
        "feature_sharing": "paper: feature sharing",
        "clip": "paper: intrinsic-dimensional clipping (official OPT_TYPE='spsa-clip')",
    }


@register_method
class ZIP(ZerothOrderMethod):
    name = "zip"
    Config = ZIPConfig

    def __init__(self, cfg: ZIPConfig, env):
        super().__init__(cfg, env)
        ctx0 = initial_context(self.box, cfg.ctx_init, cfg.n_ctx, self.task_info["templates"], self.seed)
        self.param = self.build_param(cfg, ctx0, self.seed)
        clip = None if cfg.clip == "none" else cfg.clip
        self.opt = ZOSGD(self.param.init(), SPSA(cfg.n_perturb, cfg.perturbation), cfg.schedule(), clip=clip, seed=self.seed)
        self.batches = BatchStream(self.data, cfg.batch_size, self.seed)

    def build_param(self, cfg, ctx0, seed):
        return ZIPProjection(ctx0, cfg.intrinsic_dim, cfg.rank, cfg.projection, cfg.low_rank, cfg.feature_sharing, seed)

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.opt.w))
