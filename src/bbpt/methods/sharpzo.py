"""SharpZO (Yang et al., 2025): sharpness-aware CMA-ES warm-up, then sparse ZO-SGD.

Context = p0 + reshape(A z) ("a photo of a" + a 512-d random subspace, A ~ N(0, 0.2²)).
- Stage 1 (until ``switch_fraction`` of the budget, or ``change_point`` generations):
  the sharpness perturbation ε = ρ·g/‖g‖ with g estimated by CGE (coordinate-wise central
  differences at the CMA-ES mean, 2d evaluations), then each candidate z_i is scored at
  z_i + ε (population 40, σ0 = 0.4) and told to CMA-ES.
- Stage 2: from the CMA-ES mean, ZO-SGD with RGE (one Gaussian direction, μ = 1e-3,
  constant lr 1e-3) on a sparse set of coordinates: the ``sparsity`` fraction chosen by
  score = z² · zscore(|g|) (lowest first, as the released code sorts).
Fitness: cross-entropy on the whole few-shot training set. Budget in prompt evaluations.

Released-code behaviour as options: ``grad_accumulate_bug=True`` (the never-reset gradient
accumulator: every stage-2 update applies the sum of all past estimates, the last CGE
gradient included); ``sparsity=1.0`` is the released script's dense ``zo`` trainer.
``cge_every > 1`` reuses ε for that many generations (saves 2d evaluations each; not in the
paper). ``change_point=0`` with ``rho=0`` is plain ZO-SGD from the initial prompt.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..models.blackbox import SoftPrompt
from ..optim import CGE, CMAES, RGE, Constant, ZOSGD
from ..params import RandomProjection
from .base import OnePassConfig, WholeSet, ZerothOrderMethod, register_method
from .common import ce_per_candidate, initial_context, step_size_field, STEP_SIZE_SOURCE


class SharpZOConfig(OnePassConfig):
    budget: int | None = Field(20000, ge=1, description="prompt_evals")
    n_ctx: int | None = Field(None, ge=1, le=75, description="context tokens; none: as many as ctx_init's words")
    ctx_init: str = Field("a photo of a", min_length=1, description="a phrase, 'template' (the task template's "
                          "words before '{}') or 'random'")
    intrinsic_dim: int = Field(512, ge=1, le=100_000, description="dimension d of the search space z")
    proj_std: float = Field(0.2, gt=0, description="std of the projection A")
    popsize: int = Field(40, ge=2, le=10_000, description="stage-1 CMA-ES population")
    sigma: float = Field(0.4, gt=0, description="stage-1 CMA-ES initial step size σ")
    bound: float = Field(0.0, ge=0, description="box constraint |z_i| <= bound (0: none)")
    step_size: Literal["csa", "pycma"] = step_size_field()
    rho: float = Field(0.1, ge=0, description="sharpness radius ρ of ε = ρ g / ‖g‖ (0: plain CMA-ES)")
    eps_cge: float = Field(1e-3, gt=0, description="CGE finite-difference step μ")
    cge_every: int = Field(1, ge=1, le=10_000, description="recompute ε every this many generations (1: paper)")
    switch_fraction: float = Field(0.5, ge=0, le=1, description="fraction of the budget spent in stage 1")
    change_point: int | None = Field(None, ge=0, description="stage-1 generations instead of switch_fraction")
    lr: float = Field(1e-3, gt=0, description="stage-2 constant learning rate")
    eps_rge: float = Field(1e-3, gt=0, description="stage-2 RGE perturbation μ")
    n_perturb: int = Field(1, ge=1, le=1000, description="stage-2 RGE directions per step")
    sparsity: float = Field(0.1, gt=0, le=1, description="fraction of coordinates tuned in stage 2 (1: dense)")
    mask_order: Literal["lowest", "highest"] = Field("lowest", description="which scores the sparse mask keeps")
    grad_accumulate_bug: bool = Field(False, description="the released code's never-reset gradient accumulator")


    sources = {
        "augment": "official SharpZO (CraFT's loaders): cached features of one augmented pass; bbpt: off on the "
                   "28-32 px offline tasks",

        "budget": "bbpt: 20000 prompt_evals, so that both stages run on CPU (departure: the released script runs "
                  "change_point 100 and total_steps 200000, about 500k evaluations; the poster gives no budget)",
        "n_ctx": "official (CraFT's loader): the 'a photo of a' words",
        "ctx_init": "official main_sharpzo.py (CraFT's PromptLearner): ctx_init = 'a photo of a'",
        "intrinsic_dim": "official: 512",
        "proj_std": "official (CraFT's configs): std(A) 0.2",
        "popsize": "official: 40 (hard-coded)",
        "sigma": "official: --sigma 0.4",
        "bound": "bbpt: none (official: from CraFT's configs, ±5 or none)",
        "step_size": STEP_SIZE_SOURCE,
        "rho": "official: rho 0.1",
        "eps_cge": "official released script: zo_eps_cge 1e-3",
        "cge_every": "paper: ε at every generation",
        "switch_fraction": "bbpt: half the budget in stage 1 (official: change_point 100 generations)",
        "change_point": "official released script: 100 (set it to follow the release)",
        "lr": "official released script: zo_lr 1e-3",
        "eps_rge": "official: zo_eps_rge 1e-3",
        "n_perturb": "official: num_pertub 1",
        "sparsity": "paper: sparse stage 2 (official argparse prune_ratio 0.1; the released script's dense "
                    "trainer is sparsity=1.0)",
        "mask_order": "official code: sorts ascending, keeps the lowest scores",
        "grad_accumulate_bug": "bbpt: off (the released code never resets its accumulator; True reproduces it)",
    }


@register_method
class SharpZO(ZerothOrderMethod):
    name = "sharpzo"
    Config = SharpZOConfig
    budget_unit = "prompt_evals"
    state = ("es", "zo", "batches", "stage", "generation", "eps", "grad", "acc")

    def __init__(self, cfg: SharpZOConfig, env):
        super().__init__(cfg, env)
        ctx0 = initial_context(self.box, cfg.ctx_init, cfg.n_ctx, self.task_info["templates"], self.seed)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, cfg.proj_std, self.seed)
        self.es = CMAES(self.param.init(), cfg.sigma, cfg.popsize, self.seed, cfg.bound, cfg.step_size)
        # stage 2's optimiser; its start point and mask are set at the switch
        self.zo = ZOSGD(self.param.init(), RGE(cfg.n_perturb), Constant(a=cfg.lr, c=cfg.eps_rge), seed=self.seed)
        self.batches = WholeSet(self.data)
        self.stage, self.generation = 1, 0
        self.eps = torch.zeros(cfg.intrinsic_dim)
        self.grad: torch.Tensor | None = None  # last CGE gradient
        self.acc = torch.zeros(cfg.intrinsic_dim)  # the released code's never-reset accumulator

    @property
    def opt(self):
        return self.es if self.stage == 1 else self.zo

    def losses(self, z: torch.Tensor) -> torch.Tensor:
        """CE on the whole training set for each row of z: one query, len(z) prompt evaluations."""
        images, y = self.batches.next()
        return ce_per_candidate(self.box.query(SoftPrompt(self.param.decode(z)), images), y)

    def cge(self, w: torch.Tensor) -> torch.Tensor:
        est, mu = CGE(), self.cfg.eps_cge
        dirs = est.directions(w.numel(), None)
        return est.estimate(self.losses(est.points(w, dirs, mu)), dirs, mu)

    def in_stage1(self, budget) -> bool:
        cfg = self.cfg
        if cfg.change_point is not None:
            return self.generation < cfg.change_point
        return budget.spent < cfg.switch_fraction * (budget.total or 0)

    def step(self, budget):
        if self.stage == 1 and not self.in_stage1(budget):
            self.switch()
        if self.stage == 1 and self.cfg.rho > 0 and self.generation % self.cfg.cge_every == 0:
            self.grad = self.cge(self.es.mean)
            n = self.grad.norm()
            self.eps = self.cfg.rho * self.grad / n if n > 0 else torch.zeros_like(self.grad)
        return super().step(budget)

    def candidates(self, points, images):
        if self.stage == 1:  # sharpness-aware: scored at z_i + ε, told as z_i
            points = points + self.eps
        return super().candidates(points, images)

    def switch(self):
        """Stage 1 -> 2: start ZO-SGD at the CMA-ES mean on a sparse coordinate mask."""
        cfg = self.cfg
        w = self.es.mean
        self.zo.w = w.clone()
        if cfg.sparsity < 1.0:
            g = self.grad if self.grad is not None else self.cge(w)
            a = g.abs()
            score = w**2 * (a - a.mean()) / (a.std() + 1e-12)
            k = max(1, int(round(cfg.sparsity * w.numel())))
            idx = score.argsort(descending=cfg.mask_order == "highest")[:k]
            self.zo.mask = torch.zeros(w.numel()).index_fill_(0, idx, 1.0)
        if cfg.grad_accumulate_bug and self.grad is not None:
            self.acc = self.grad.clone()
        self.stage = 2

    def tell(self, losses):
        if self.stage == 2 and self.cfg.grad_accumulate_bug:  # released code: w -= lr * (sum of all estimates)
            w_before = self.zo.w.clone()
            self.acc = self.acc + self.zo.tell(losses)
            self.zo.w = w_before - self.cfg.lr * self.acc
        else:
            self.opt.tell(losses)

    def after_tell(self, losses, budget):
        if self.stage == 1:
            self.generation += 1
        return {"stage": self.stage}

    def current(self) -> torch.Tensor:
        return self.es.mean if self.stage == 1 else self.zo.w

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.current()))
