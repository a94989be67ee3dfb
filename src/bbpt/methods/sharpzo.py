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

from ..models.blackbox import SoftPrompt
from ..optim import CGE, CMAES, RGE, Constant, ZOSGD
from ..params import RandomProjection
from .base import Method, MethodConfig, register_method
from .common import ce_per_candidate, initial_context


class SharpZOConfig(MethodConfig):
    budget: int | None = 20000  # prompt_evals
    n_ctx: int | None = None
    ctx_init: str = "template"
    intrinsic_dim: int = 512
    proj_std: float = 0.2
    popsize: int = 40
    sigma: float = 0.4
    bound: float = 0.0
    rho: float = 0.1
    eps_cge: float = 1e-3
    cge_every: int = 1
    switch_fraction: float = 0.5  # of the budget spent in stage 1
    change_point: int | None = None  # stage-1 generations instead (the code's change_point)
    lr: float = 1e-3
    eps_rge: float = 1e-3
    n_perturb: int = 1
    sparsity: float = 0.1  # fraction of coordinates tuned in stage 2 (1.0: dense)
    mask_order: Literal["lowest", "highest"] = "lowest"
    grad_accumulate_bug: bool = False


@register_method
class SharpZO(Method):
    name = "sharpzo"
    Config = SharpZOConfig
    budget_unit = "prompt_evals"

    def __init__(self, cfg: SharpZOConfig, box, data, task_info, seed):
        super().__init__(cfg, box, data, task_info, seed)
        ctx0 = initial_context(box, cfg.ctx_init, cfg.n_ctx, task_info["templates"], seed)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, cfg.proj_std, seed)
        self.es = CMAES(self.param.init(), cfg.sigma, cfg.popsize, seed, cfg.bound)
        self.images, self.labels = data.images(), data.labels
        self.stage, self.generation = 1, 0
        self.eps = torch.zeros(cfg.intrinsic_dim)
        self.grad: torch.Tensor | None = None  # last CGE gradient
        self.zo: ZOSGD | None = None
        self.acc = torch.zeros(cfg.intrinsic_dim)  # the released code's never-reset accumulator

    def losses(self, z: torch.Tensor) -> torch.Tensor:
        """CE on the whole training set for each row of z: one query, len(z) prompt evaluations."""
        return ce_per_candidate(self.box.query(SoftPrompt(self.param.decode(z)), self.images), self.labels)

    def cge(self, w: torch.Tensor) -> torch.Tensor:
        est, mu = CGE(), self.cfg.eps_cge
        dirs = est.directions(w.numel(), None)
        return est.estimate(self.losses(est.points(w, dirs, mu)), dirs, mu)

    def in_stage1(self) -> bool:
        cfg = self.cfg
        if cfg.change_point is not None:
            return self.generation < cfg.change_point
        return self.box.meter.counts[self.unit(cfg)] < cfg.switch_fraction * (cfg.budget or 0)

    def step(self):
        if self.stage == 1 and self.in_stage1():
            return self.stage1_step()
        if self.stage == 1:
            self.switch()
        return self.stage2_step()

    def stage1_step(self):
        cfg = self.cfg
        if cfg.rho > 0 and self.generation % cfg.cge_every == 0:
            self.grad = self.cge(self.es.mean)
            n = self.grad.norm()
            self.eps = cfg.rho * self.grad / n if n > 0 else torch.zeros_like(self.grad)
        z = self.es.ask()
        loss = self.losses(z + self.eps)  # sharpness-aware: scored at the perturbed points
        self.es.tell(loss)
        self.generation += 1
        return {"train_loss": float(loss.min()), "stage": 1}

    def switch(self):
        """Stage 1 -> 2: start ZO-SGD at the CMA-ES mean on a sparse coordinate mask."""
        cfg = self.cfg
        w = self.es.mean
        self.zo = ZOSGD(w, RGE(cfg.n_perturb), Constant(a=cfg.lr, c=cfg.eps_rge), seed=self.seed)
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

    def stage2_step(self):
        points = self.zo.ask()  # (2q, d)
        loss = self.losses(points)
        if self.cfg.grad_accumulate_bug:  # released code: w -= lr * (sum of all estimates so far)
            w_before = self.zo.w.clone()
            g = self.zo.tell(loss)
            self.acc = self.acc + g
            self.zo.w = w_before - self.cfg.lr * self.acc
        else:
            self.zo.tell(loss)
        return {"train_loss": float(loss.mean()), "stage": 2}

    def current(self) -> torch.Tensor:
        return self.es.mean if self.zo is None else self.zo.w

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.current()))
