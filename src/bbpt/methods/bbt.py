"""BBT (Sun et al., ICML 2022) on CLIP: CMA-ES over z, context = p0 + reshape(A z).

BBT was released for NLP; bbpt runs it on CLIP as CraFT and SharpZO run their BBT baseline.
Which official statements that is (tests/parity/bbt.json, written by tools/parity/bbt.py,
runs them on a toy CLIP and checks bbpt against them generation for generation):

- the search, BBT's own ``bbt.py`` (txsun1997/Black-Box-Tuning @e4013f7): its option defaults
  (47-63: population 20, σ 1, α 1, bound 0, a normal projection, 'add', serial evaluation);
  A = ``nn.Linear(d, m·D)`` ~ N(0, std²), std = α · std_emb / (√d · σ) (266-291); the CMA-ES
  built with ``maxiter = budget // popsize`` (710-718) and the loop ask → fitness of each
  candidate → tell (730-736), under pycma's CSA step-size rule as every release ran it;
- the prompt on CLIP, CraFT's CMA-ES prompt module without its head (``main_craft.py`` 58-71,
  131-153; CraFT's exp.log reports its BBT row): context = p0 + reshape(A z), p0 the
  embeddings of "a photo of a" (BBT's 'add' mode adds A z to its prompt tokens' embeddings),
  d = 512, fitness = cross-entropy on the whole few-shot set (one evaluation = all images).

Two departures, both because bbpt's method is a black-box client:

- std_emb: ``bbt.py`` takes ``np.std`` of the model's whole input-embedding table; a black box
  has no table, so bbpt estimates it from the word embeddings the client receives (class names
  and template words; ``embedding_std=`` takes the table's value instead);
- the reported prompt: ``bbt.py`` keeps the candidate with the best accuracy on a second k-shot
  dev set (501-532); no dev set reaches a bbpt method, so bbpt reports CMA-ES's best so far
  (``es.result.xbest``, the lowest training loss), as BBTv2 does (``deepbbt.py`` 719-721).

Budget: 8000 prompt evaluations (the paper's 8000 API calls, one over the whole set each).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..data.staging import WholeSet
from ..models.blackbox import SoftPrompt
from ..optim import CMAES
from ..params import RandomProjection
from .base import OnePassConfig, ZerothOrderMethod, register_method
from .common import embedding_std, initial_context, step_size_field, STEP_SIZE_SOURCE

RELEASE = "txsun1997/Black-Box-Tuning @e4013f7"


class BBTConfig(OnePassConfig):
    budget: int | None = Field(8000, ge=1, description="prompt_evals (whole few-shot set per candidate)")
    n_ctx: int | None = Field(None, ge=1, le=75, description="context tokens; none: as many as ctx_init's words")
    ctx_init: str = Field("a photo of a", min_length=1, description="a phrase, 'template' (the task template's "
                          "words before '{}') or 'random'")
    intrinsic_dim: int = Field(512, ge=1, le=100_000, description="dimension d of the CMA-ES search space z")
    popsize: int = Field(20, ge=2, le=10_000, description="CMA-ES population per generation")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size σ")
    alpha: float = Field(1.0, gt=0, description="BBT's α in the std of the projection A")
    embedding_std: float | None = Field(None, gt=0, description="std_emb in A's std α·std_emb/(√d·σ), e.g. the "
                                        "std of the model's whole token-embedding table (the official statistic); "
                                        "none: estimated from the word embeddings the client received")
    proj_std: float | None = Field(None, gt=0, description="a fixed std for A instead of BBT's formula")
    bound: float = Field(0.0, ge=0, description="box constraint |z_i| <= bound (0: none)")
    step_size: Literal["csa", "pycma"] = step_size_field()

    sources = {
        "augment": "CraFT's BBT baseline (its prompt module without the head): CraFT's cached features of one "
                   "augmented pass; bbpt: off on the 28-32 px offline tasks",
        "budget": "BBT paper: 8000 API calls, one over the whole few-shot set each (official bbt.py 51: --budget "
                  "8000, serial: maxiter = budget // popsize, 713)",
        "n_ctx": "CraFT's and SharpZO's BBT-for-CLIP baseline: the 'a photo of a' words (official main_craft.py "
                 "57-67)",
        "ctx_init": "CraFT's and SharpZO's BBT-for-CLIP baseline: 'a photo of a' (official CraFT main_craft.py 58, "
                    "whose prompt module it is; BBT's 'add' mode, bbt.py 63, adds A z to its prompt tokens)",
        "intrinsic_dim": "CraFT's BBT-for-CLIP baseline: d = 512 (BBT for NLP: 500, official bbt.py 48)",
        "popsize": "BBT: popsize 20 (official bbt.py 52)",
        "sigma": "BBT: σ = 1 (official bbt.py 54)",
        "alpha": "BBT: α = 1 in std(A) = α · std_emb / (√d · σ) (official bbt.py 55, 285)",
        "embedding_std": "bbpt: estimated client-side from embed_words (a black box has no embedding table); "
                         f"official bbt.py 269-285 ({RELEASE}): np.std of the model's whole input-embedding table, "
                         "which this option takes; tests/parity/bbt.json",
        "proj_std": "BBT: A's std from its formula (no fixed std; official bbt.py 267-291, random_proj 'normal')",
        "bound": "BBT: bound 0, none (official bbt.py 53, 716-717)",
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
            std_emb = cfg.embedding_std
            if std_emb is None:
                words = self.task_info["classnames"] + [t.replace("{}", "") for t in self.task_info["templates"]]
                std_emb = embedding_std(self.box, words)
            std = RandomProjection.bbt_std(std_emb, cfg.intrinsic_dim, cfg.sigma, cfg.alpha)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, std, self.seed)
        self.opt = CMAES(self.param.init(), cfg.sigma, cfg.popsize, self.seed, cfg.bound, cfg.step_size)
        self.batches = WholeSet(self.data)  # the whole few-shot set, every query

    def prompt(self) -> SoftPrompt:
        """p0 + reshape(A · xbest): CMA-ES's best so far (deepbbt.py 719-721)."""
        return SoftPrompt(self.param.decode(self.opt.best))
