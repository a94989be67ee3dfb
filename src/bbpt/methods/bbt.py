"""BBT (Sun et al., ICML 2022) on CLIP: CMA-ES over z, context = ctx0 + A z.

As CraFT and SharpZO run it for CLIP: context initialised from the task template's words
("a photo of a"), intrinsic dimension 512, A ~ N(0, std²) with BBT's std
α·std_emb/(√d·σ) (std_emb estimated from word embeddings the client received), population
20, σ = 1, fitness = cross-entropy on the whole few-shot training set, budget 8000 prompt
evaluations. The reported prompt is CMA-ES's best-so-far (lowest training loss).
"""
from __future__ import annotations

from ..models.blackbox import SoftPrompt
from ..optim import CMAES
from ..params import RandomProjection
from .base import Method, MethodConfig, register_method
from .common import ce_per_candidate, embedding_std, initial_context


class BBTConfig(MethodConfig):
    budget: int | None = 8000  # prompt_evals
    n_ctx: int | None = None  # None: as many tokens as the template's words
    ctx_init: str = "template"
    intrinsic_dim: int = 512
    popsize: int = 20
    sigma: float = 1.0
    alpha: float = 1.0  # BBT's α in the std of A
    proj_std: float | None = None  # a fixed std for A instead of BBT's formula
    bound: float = 0.0  # box constraint |z_i| <= bound (0: none)


@register_method
class BBT(Method):
    name = "bbt"
    Config = BBTConfig
    budget_unit = "prompt_evals"

    def __init__(self, cfg: BBTConfig, box, data, task_info, seed):
        super().__init__(cfg, box, data, task_info, seed)
        ctx0 = initial_context(box, cfg.ctx_init, cfg.n_ctx, task_info["templates"], seed)
        std = cfg.proj_std
        if std is None:
            words = task_info["classnames"] + [t.replace("{}", "") for t in task_info["templates"]]
            std = RandomProjection.bbt_std(embedding_std(box, words), cfg.intrinsic_dim, cfg.sigma, cfg.alpha)
        self.param = RandomProjection(ctx0, cfg.intrinsic_dim, std, seed)
        self.es = CMAES(self.param.init(), cfg.sigma, cfg.popsize, seed, cfg.bound)
        self.images, self.labels = data.images(), data.labels  # the whole few-shot set, every query

    def fitness(self, logits, z):
        return ce_per_candidate(logits, self.labels)

    def step(self):
        z = self.es.ask()  # (popsize, d)
        logits = self.box.query(SoftPrompt(self.param.decode(z)), self.images)  # (pop, N, C)
        losses = self.fitness(logits, z)
        self.es.tell(losses)
        return {"train_loss": float(losses.min())}

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.param.decode(self.es.best))
