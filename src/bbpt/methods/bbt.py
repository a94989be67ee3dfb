"""BBT (Sun et al., ICML 2022) on CLIP: CMA-ES over z, context = ctx0 + A z.

As CraFT and SharpZO run it for CLIP: context initialised from the task template's words
("a photo of a"), intrinsic dimension 512, A ~ N(0, std²) with BBT's std
α·std_emb/(√d·σ) (std_emb estimated from word embeddings the client received), population
20, σ = 1, fitness = cross-entropy on the whole few-shot training set, budget 8000 prompt
evaluations. The reported prompt is CMA-ES's best-so-far (lowest training loss).
"""
from __future__ import annotations

from typing import Literal


from pydantic import Field

from ..models.blackbox import SoftPrompt
from ..optim import CMAES
from ..params import RandomProjection
from .base import OnePassConfig, WholeSet, ZerothOrderMethod, register_method
from .common import embedding_std, initial_context, step_size_field, STEP_SIZE_SOURCE


class BBTConfig(OnePassConfig):
    budget: int | None = Field(8000, ge=1, description="prompt_evals (whole few-shot set per candidate)")
    n_ctx: int | None = Field(None, ge=1, le=75, description="context tokens; none: as many as ctx_init's words")
    ctx_init: str = Field("a photo of a", min_length=1, description="a phrase, 'template' (the task template's "
                          "words before '{}') or 'random'")
    intrinsic_dim: int = Field(512, ge=1, le=100_000, description="dimension d of the CMA-ES search space z")
    popsize: int = Field(20, ge=2, le=10_000, description="CMA-ES population per generation")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size σ")
    alpha: float = Field(1.0, gt=0, description="BBT's α in the std of the projection A")
    proj_std: float | None = Field(None, gt=0, description="a fixed std for A instead of BBT's formula")
    bound: float = Field(0.0, ge=0, description="box constraint |z_i| <= bound (0: none)")
    step_size: Literal["csa", "pycma"] = step_size_field()


    sources = {
        "augment": "CraFT's BBT baseline (its prompt module without the head): CraFT's cached features of one "
                   "augmented pass; bbpt: off on the 28-32 px offline tasks",

        "budget": "BBT paper: 8000 API calls, one over the whole few-shot set each",
        "n_ctx": "CraFT's and SharpZO's BBT-for-CLIP baseline: the 'a photo of a' words",
        "ctx_init": "CraFT's and SharpZO's BBT-for-CLIP baseline: 'a photo of a' (official CraFT main_craft.py 58, whose prompt module it is)",
        "intrinsic_dim": "CraFT's BBT-for-CLIP baseline: d = 512 (BBT for NLP: 500)",
        "popsize": "BBT: popsize 20",
        "sigma": "BBT: σ = 1",
        "alpha": "BBT: α = 1 in std(A) = α · std_emb / (√d · σ)",
        "proj_std": "BBT: A's std from its formula (no fixed std)",
        "bound": "BBT: bound 0 (none)",
        "step_size": STEP_SIZE_SOURCE,
    }


@register_method
class BBT(ZerothOrderMethod):
    name = "bbt"
    Config = BBTConfig
    budget_unit = "prompt_evals"

    def __init__(self, cfg: BBTConfig, env):
        super().__init__(cfg, env)
        ctx0 = initial_context(self.box, cfg.ctx_init, cfg.n_ctx, self.task_info["templates"], self.seed)
        std = cfg.proj_std
        if std is None:
            words = self.task_info["classnames"] + [t.replace("{}", "") for t in self.task_info["templates"]]
            std = RandomProjection.bbt_std(embedding_std(self.box, words), cfg.intrinsic_dim, cfg.sigma, cfg.alpha)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, std, self.seed)
        self.opt = CMAES(self.param.init(), cfg.sigma, cfg.popsize, self.seed, cfg.bound, cfg.step_size)
        self.batches = WholeSet(self.data)  # the whole few-shot set, every query

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.opt.best))
