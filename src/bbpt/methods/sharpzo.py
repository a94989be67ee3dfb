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

Released-code behaviour as options (``yifanycc/sharpzo`` @13b491f, ``main_sharpzo.py``):
- ``reask=True``: the release keeps z as a 40-row ``input_param`` (the prompt is the mean of its
  rows, 321-323), first ``torch.rand(40, d)`` (296-297), after each generation a fresh, untold
  ``es.ask()`` (update_context_prompt, 371-376). So the CGE gradient is taken at that row mean
  (``zo_step_cge`` shifts column i of every row, 126-138), not at the CMA-ES mean; ε is
  normalised over the 40 identical rows and then averaged, radius ρ/√40 (``utils.py``
  110-111, then 474-475); stage 2 starts from the last re-ask's row mean (485-494); the stage-1
  prompt (what is evaluated) is that row mean. Here the rows are ``popsize`` (the release
  hard-codes 40, its population) and the first are U[0, 1) from the seed.
- ``grad_accumulate_bug=True``: the never-reset gradient accumulator (``grad_tmp``, 48, 142,
  201): every stage-2 update applies the sum of all past estimates, the last CGE gradient
  included. That gradient has the rows' shape (40, d), so the first update broadcasts the
  parameter to 40 rows (238-239) and from the second stage-2 step on each direction is the
  row mean of 40 Gaussian rows (74-75, the forward pass averaging them), N(0, I/40).
- ``sparsity=1.0``: the released script's dense ``zo`` trainer (the argparse default
  ``zo-pruned`` stops at its first stage-2 step: ``pruning_score`` is still empty, 63-65).
``preset=<dataset>`` is the released script (``run_all_final_exps.sh``) on one of the
release's ``dataset_configs``: every field it sets is listed with its source by ``bbpt methods
sharpzo --sources``; an option set explicitly wins. It keeps bbpt's budget and switch: the
script's ``--change_point 100 --total_steps 200000`` is ``change_point=100 budget=506200``
(100 generations of 2·512 + 40 evaluations, then 199900 steps of 2).
``cge_every > 1`` reuses ε for that many generations (saves 2d evaluations each; not in the
paper). ``change_point=0`` with ``rho=0`` is plain ZO-SGD from the initial prompt.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..data.staging import WholeSet
from ..models.blackbox import SoftPrompt
from ..optim import CGE, CMAES, RGE, Constant, ZOSGD
from ..params import RandomProjection
from ..state import get_state
from .base import OnePassConfig, Preset, ZerothOrderMethod, register_method
from .common import ce_per_candidate, initial_context, step_size_field, STEP_SIZE_SOURCE

RELEASE = "yifanycc/sharpzo @13b491f"
SCRIPT = "run_all_final_exps.sh"
REASK = ("main_sharpzo.py 296-297, 321-323, 371-376 (input_param: 40 rows, first torch.rand, then a fresh "
         "es.ask(); the prompt is their mean), 126-138 (the CGE shifts a column of every row: at the row mean), "
         "utils.py 110-111 with main_sharpzo.py 474-475 (the norm over 40 identical rows, then their mean: ρ/√40), "
         "485-494 (stage 2 from input_param.mean(0))")
ACCUMULATOR = ("main_sharpzo.py 48, 142, 201 (grad_tmp never reset: the last CGE gradient and every estimate "
               "stay in it), 238-239 (its (40, d) shape broadcasts the parameter to 40 rows), 74-75 (then z is "
               "40 Gaussian rows, averaged by the forward pass, 323)")


def _preset(name: str, std: float, bound: float) -> Preset:
    """The released script on ``dataset_configs/<name>.yaml``: the keys main_sharpzo.py reads
    from the config (std, bound, intrinsic_dim, popsize), the script's trainer flags and the
    release's behaviours. Not its schedule (``--change_point 100 --total_steps 200000``, about
    506k evaluations): bbpt's budget and switch stay, see the module docstring."""
    f, flags = f"dataset_configs/{name}.yaml", f"{SCRIPT} (main_sharpzo.py argparse)"
    std, bound = float(std), float(bound)
    return Preset(f"{f} and {SCRIPT} ({RELEASE})", {
        "proj_std": (std, f"{f}: std {std:g} (main_sharpzo.py 299-300: normal_(0, cfg['std']))"),
        "bound": (bound, f"{f}: bound {bound:g} (main_sharpzo.py 436-437: CMA-ES bounds ±bound, 0: none)"),
        "intrinsic_dim": (512, f"{f}: intrinsic_dim 512"),
        "popsize": (40, f"{f}: popsize 40 (main_sharpzo.py 297: input_param's 40 rows)"),
        "sigma": (0.4, f"{flags}: --sigma 0.4"),
        "rho": (0.1, f"{flags}: --rho 0.1 (--smoothness_estimator zo: ε from the CGE)"),
        "eps_cge": (1e-3, f"{flags}: --zo_eps_cge 1e-3"),
        "eps_rge": (1e-3, f"{flags}: --zo_eps_rge 1e-3"),
        "lr": (1e-3, f"{flags}: --zo_lr 1e-3"),
        "sparsity": (1.0, f"{flags}: --prompt_trainer zo (dense)"),
        "reask": (True, REASK),
        "grad_accumulate_bug": (True, ACCUMULATOR),
    })


# dataset_configs/<name>.yaml: (std, bound)
PRESETS: dict[str, Preset] = {name: _preset(name, *v) for name, v in {
    "caltech101": (0.2, 5), "dtd": (1, 5), "eurosat": (1, 5), "fgvc": (0.2, 0), "food101": (0.2, 0),
    "imagenet": (1, 0), "oxford_flowers": (0.2, 5), "oxford_pets": (0.2, 5), "stanford_cars": (0.2, 5),
    "sun397": (0.2, 5), "ucf101": (0.2, 5)}.items()}


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
    grad_accumulate_bug: bool = Field(False, description="the released code's never-reset gradient accumulator "
                                      "(with a stage-1 CGE: 40-row stage-2 directions from the second step)")
    reask: bool = Field(False, description="the release's re-asked rows: the CGE at the row mean of an untold "
                        "es.ask() (first: uniform rows), ε radius ρ/√popsize, stage 2 and the prompt from that "
                        "mean")
    preset: str | None = Field(None, description="an official per-dataset config (dataset_configs, with the "
                               "released script's trainer), e.g. 'eurosat'; explicit options win")

    sources = {
        "augment": "official SharpZO (CraFT's loaders): cached features of one augmented pass; bbpt: off on the "
                   "28-32 px offline tasks",

        "budget": "bbpt: 20000 prompt_evals, so that both stages run on CPU (departure: the released script runs "
                  "change_point 100 and total_steps 200000, 506200 evaluations at d = 512: change_point=100 "
                  "budget=506200; the poster gives no budget)",
        "n_ctx": "official (CraFT's loader): the 'a photo of a' words",
        "ctx_init": "official main_sharpzo.py (CraFT's PromptLearner): ctx_init = 'a photo of a'",
        "intrinsic_dim": "official dataset_configs: intrinsic_dim 512",
        "proj_std": "official dataset_configs: std(A) 0.2 (1 for dtd, eurosat, imagenet: preset=)",
        "popsize": "official: 40 (dataset_configs popsize 40; main_sharpzo.py 297 hard-codes input_param's 40 rows)",
        "sigma": "official: --sigma 0.4",
        "bound": "bbpt: none (official dataset_configs: ±5; none for fgvc, food101, imagenet: preset=)",
        "step_size": STEP_SIZE_SOURCE,
        "rho": "official: rho 0.1",
        "eps_cge": "official released script: zo_eps_cge 1e-3",
        "cge_every": "paper: ε at every generation",
        "switch_fraction": "bbpt: half the budget in stage 1 (official: change_point 100 generations)",
        "change_point": "official released script: 100 (set it, with budget=506200, to follow the release; a "
                        "preset keeps bbpt's switch)",
        "lr": "official released script: zo_lr 1e-3",
        "eps_rge": "official: zo_eps_rge 1e-3",
        "n_perturb": "official: num_pertub 1",
        "sparsity": "paper: sparse stage 2 (official argparse prune_ratio 0.1, whose zo-pruned trainer stops at "
                    "its first stage-2 step, main_sharpzo.py 63-65; the released script's dense trainer is "
                    "sparsity=1.0, preset=)",
        "mask_order": "official code: sorts ascending, keeps the lowest scores",
        "grad_accumulate_bug": "bbpt: off (the released code never resets its accumulator; True reproduces it: "
                               + ACCUMULATOR + "; preset=)",
        "reask": "paper: the CMA-ES mean and ε = ρ g / ‖g‖ (True: the release, " + REASK + "; preset=)",
        "preset": f"official dataset_configs/*.yaml and {SCRIPT} ({RELEASE})",
    }


class RowMeanRGE(RGE):
    """RGE whose directions are each the mean of ``rows`` Gaussian rows, N(0, I / rows): the
    release's stage 2 once its parameter has the accumulator's 40 rows (main_sharpzo.py 74-75,
    238-239, 323). ``rows = 1`` is RGE, draw for draw."""

    rows = 1

    def directions(self, d: int, gen: torch.Generator) -> torch.Tensor:
        if self.rows == 1:
            return super().directions(d, gen)
        return torch.randn(self.n, self.rows, d, generator=gen).mean(1)


@register_method
class SharpZO(ZerothOrderMethod):
    name = "sharpzo"
    Config = SharpZOConfig
    budget_unit = "prompt_evals"
    presets = PRESETS
    state = ("es", "zo", "batches", "stage", "generation", "eps", "grad", "acc", "z_rows")

    def __init__(self, cfg: SharpZOConfig, env):
        super().__init__(cfg, env)
        ctx0 = initial_context(self.box, cfg.ctx_init, cfg.n_ctx, self.task_info["templates"], self.seed)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, cfg.proj_std, self.seed)
        self.es = CMAES(self.param.init(), cfg.sigma, cfg.popsize, self.seed, cfg.bound, cfg.step_size)
        # stage 2's optimiser; its start point and mask are set at the switch
        self.zo = ZOSGD(self.param.init(), RowMeanRGE(cfg.n_perturb), Constant(a=cfg.lr, c=cfg.eps_rge), seed=self.seed)
        self.batches = WholeSet(self.data)
        self.stage, self.generation = 1, 0
        self.eps = torch.zeros(cfg.intrinsic_dim)
        self.grad: torch.Tensor | None = None  # last CGE gradient
        self.acc = torch.zeros(cfg.intrinsic_dim)  # the released code's never-reset accumulator
        # reask: the mean of the release's input_param rows, first U[0, 1) (main_sharpzo.py 296-297)
        g = torch.Generator().manual_seed(self.seed + 6151)  # a stream apart from A's (same seed)
        self.z_rows = (torch.rand(cfg.popsize, cfg.intrinsic_dim, generator=g).mean(0)  # (popsize, d) -> (d,)
                       if cfg.reask else self.param.init())

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
        cfg = self.cfg
        if self.stage == 1 and cfg.rho > 0 and self.generation % cfg.cge_every == 0:
            self.grad = self.cge(self.current())  # the CMA-ES mean, or (reask) the rows' mean
            # reask: ‖g‖ over popsize identical rows, then their mean (utils.py 110-111, main_sharpzo.py 475)
            n = self.grad.norm() * (cfg.popsize**0.5 if cfg.reask else 1.0)
            self.eps = cfg.rho * self.grad / n if n > 0 else torch.zeros_like(self.grad)
        if self.stage == 2:  # the release's 40-row z from its second step (see RowMeanRGE)
            self.zo.est.rows = cfg.popsize if cfg.grad_accumulate_bug and self.grad is not None and self.zo.k > 1 else 1
        return super().step(budget)

    def candidates(self, points, images):
        if self.stage == 1:  # sharpness-aware: scored at z_i + ε, told as z_i
            points = points + self.eps
        return super().candidates(points, images)

    def switch(self):
        """Stage 1 -> 2: start ZO-SGD at the CMA-ES mean (reask: the last re-ask's row mean) on a
        sparse coordinate mask."""
        cfg = self.cfg
        w = self.current()
        self.zo.move_to(w)
        if cfg.sparsity < 1.0:
            g = self.grad if self.grad is not None else self.cge(w)
            a = g.abs()
            score = w**2 * (a - a.mean()) / (a.std(unbiased=False) + 1e-8)  # main_sharpzo.py 204-219
            k = max(1, int(cfg.sparsity * w.numel()))  # 64-68: int(), a stable sort
            idx = score.argsort(descending=cfg.mask_order == "highest", stable=True)[:k]
            self.zo.set_mask(torch.zeros(w.numel()).index_fill_(0, idx, 1.0))
        if cfg.grad_accumulate_bug and self.grad is not None:
            self.acc = self.grad.clone()
        self.stage = 2

    def tell(self, losses):
        if self.stage == 2 and self.cfg.grad_accumulate_bug:  # released code: w -= lr * (sum of all estimates)
            w_before = self.zo.w.clone()
            stats = self.zo.tell(losses)
            self.acc = self.acc + self.zo.last_grad
            self.zo.move_to(w_before - self.cfg.lr * self.acc)
            return stats
        return self.opt.tell(losses)

    def after_tell(self, losses, budget):
        if self.stage == 1:
            self.generation += 1
            if self.cfg.reask:  # update_context_prompt: a fresh, untold es.ask() (main_sharpzo.py 371-376, 480)
                self.z_rows = self.es.reask().mean(0)
        return {"stage": self.stage}

    def current(self) -> torch.Tensor:
        """Stage 1: the CMA-ES mean (reask: the re-asked rows' mean, the release's prompt); stage 2: w."""
        if self.stage == 2:
            return self.zo.w
        return self.z_rows if self.cfg.reask else self.es.mean

    def load_state_dict(self, state: dict) -> None:
        if "z_rows" not in state and not self.cfg.reask:  # a checkpoint from before the option (unused)
            state = {**state, "z_rows": get_state(self.z_rows)}
        super().load_state_dict(state)

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.current()))
