"""BPT-VLM (Yu et al., IJCAI 2023): CMA-ES over text and visual prompt tokens.

Text context = A_L z_L (n_text tokens, no initial prompt: "X .. X <class>."), visual prompt
= A_V z_V (n_visual tokens of the ViT's width, appended after the patch tokens, no
positional embedding, before ln_pre); z = [z_L, z_V] searched by one CMA-ES (d_L = d_V =
500, population 30, σ = 1, no bound). A_L ~ N(0, std_L²) with BBT's std_L = std_emb/(√d_L·σ),
std_emb the std of word embeddings received from the API (the official code reads it from
the embedding table). Fitness: cross-entropy on the whole few-shot training set, images
re-encoded through the prompted ViT every query. The reported prompt is CMA-ES's best
(lowest training loss). Budget: 3600 prompt evaluations (the official budget for Pets,
Food101 and Caltech101; 14400-36000 for the others: set ``budget``).

Deviation (by default): the official A_L and A_V read the model's weights, which a black-box
client cannot: A_L's std_emb is the std of the whole token-embedding table, and
A_V ~ N(mean_conv·3072/d_V, (std_conv·√(3072/d_V)·σ)²) uses the statistics of the ViT's
patch-embedding (conv1) weights (``model/Shallow_Prompt_CLIP.py`` 55-76). Here std_emb is
estimated from the task's word embeddings the API returns, and A_V ~ N(0, std_V²) with
std_V = std_patch/(√d_V·σ), BBT's formula on the patch tokens the API's ``embed_patches``
returns: the same intent (candidates on the scale of the tokens they sit beside) from what the
client receives. A user who knows the model's statistics gets the official init exactly:
``embedding_std`` (A_L), ``conv_mean`` + ``conv_std`` (A_V, the official formula, 3072 and all).

``preset="zip"``: ZIP's re-implementation (5 + 5 tokens, d_L = d_V = 2000, population 15,
budget 5000 api_calls).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..boxes.capabilities import Needs
from ..data.staging import WholeSet
from ..errors import BadInput
from ..models.blackbox import SoftPrompt, VisualPrompt
from ..optim import CMAES
from ..params import RandomProjection
from .base import MethodConfig, Preset, Query, ZerothOrderMethod, register_method
from .common import ce_per_candidate, embedding_std, focal_per_candidate, step_size_field, STEP_SIZE_SOURCE

_OFFICIAL = "ECNU-ICALK/BPT-VLM @15f2e25"
_ZIP = "ZIP's re-implementation (LOG-postech/ZIP @2ba908b)"
PRESETS = {"zip": Preset(f"{_ZIP}: scripts/few_shot/BPTVLM.sh and train.py extend_cfg", {
    "n_text": (5, "TOKENS_L 5"), "n_visual": (5, "TOKENS_V 5"), "dim_text": (2000, "INTRINSIC_DIM_L 2000"),
    "dim_visual": (2000, "INTRINSIC_DIM_V 2000"), "popsize": (15, "POP_SIZE 15"),
    "budget": (5000, "MAX_API_CALLS 5000"), "budget_unit": ("api_calls", "ZIP counts one minibatch forward as a call")})}


class BPTVLMConfig(MethodConfig):
    budget: int | None = Field(3600, ge=1, description="prompt_evals")
    n_text: int = Field(8, ge=1, le=75, description="text prompt tokens")
    n_visual: int = Field(5, ge=0, le=1024, description="visual prompt tokens after the ViT's patches (0: text only)")
    dim_text: int = Field(500, ge=1, le=100_000, description="intrinsic dimension d_L of the text part")
    dim_visual: int = Field(500, ge=1, le=100_000, description="intrinsic dimension d_V of the visual part")
    popsize: int = Field(30, ge=2, le=10_000, description="CMA-ES population per generation")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size σ")
    bound: float = Field(0.0, ge=0, description="box constraint |z_i| <= bound (0: none)")
    step_size: Literal["csa", "pycma"] = step_size_field()
    preset: Literal["zip"] | None = Field(None, description="'zip': ZIP's re-implementation settings")
    loss: Literal["ce", "focal"] | None = Field(None, description="fitness: 'ce' (none: the default) mean "
                                                "cross-entropy, or 'focal' focal loss (γ = 2)")
    embedding_std: float | None = Field(None, gt=0, le=100, description="std of the model's whole token-embedding "
                                        "table, for A_L's init (the official statistic); none: estimated from the API")
    conv_mean: float | None = Field(None, ge=-100, le=100, description="mean of the ViT's patch-embedding (conv1) "
                                    "weights, for the official A_V init (with conv_std); none: estimated from the API")
    conv_std: float | None = Field(None, gt=0, le=100, description="std of the ViT's patch-embedding (conv1) weights, "
                                   "for the official A_V init (with conv_mean)")

    augment: bool = Field(False, description="train on random resized crops + flips; false: CLIP's test transform")

    sources = {
        "augment": "official BPT-VLM: CLIP's test preprocess for the training images, no augmentation",

        "budget": "official: 3600 fitness evaluations (OxfordPets, Food101, Caltech101; 14400-36000 elsewhere)",
        "n_text": "official: n_prompt_tokens_L 8",
        "n_visual": "official: 5 visual tokens",
        "dim_text": "official: d_L 500",
        "dim_visual": "official: d_V 500",
        "popsize": "official: popsize 30",
        "sigma": "official: sigma 1",
        "bound": "official: bound 0",
        "step_size": STEP_SIZE_SOURCE,
        "preset": "ZIP's re-implementation: TOKENS 5 + 5, INTRINSIC_DIM 2000 + 2000, POP_SIZE 15, 5000 api_calls",
        "loss": f"official: loss_type 'ce' (configs/shallow_prompt.yaml); 'focal' γ = 2 is the code's other choice "
                f"(model/Shallow_Prompt_CLIP.py 133-143 @{_OFFICIAL[-7:]}); either summed over the set / N",
        "embedding_std": f"official: A_L ~ N(0, (std_emb / (√d_L·σ))²), std_emb = np.std of the whole "
                         f"token_embedding.weight (model/Shallow_Prompt_CLIP.py 55-64 @{_OFFICIAL[-7:]}); bbpt "
                         "(none): std of the task's word embeddings from embed_words, as a black-box client can",
        "conv_mean": f"official: A_V ~ N(mean_conv·3072/d_V, (std_conv·√(3072/d_V)·σ)²), mean and np.std of "
                     f"visual.conv1.weight, 3072 literal (model/Shallow_Prompt_CLIP.py 66-76 @{_OFFICIAL[-7:]}); bbpt "
                     "(none): A_V ~ N(0, (std_patch/(√d_V·σ))²) from embed_patches, as a black-box client can",
        "conv_std": "official: see conv_mean (model/Shallow_Prompt_CLIP.py 68-73)",
    }


@register_method
class BPTVLM(ZerothOrderMethod):
    name = "bptvlm"
    needs = Needs(frozenset({"soft_context", "visual_tokens"}))
    cached_images = False  # prompted pixels / visual tokens: every query re-encodes its images
    Config = BPTVLMConfig
    budget_unit = "prompt_evals"
    presets = PRESETS

    def __init__(self, cfg: BPTVLMConfig, env):
        super().__init__(cfg, env)
        box, data, seed = self.box, self.data, self.seed
        W = box.visual_width
        if W is None and cfg.n_visual:
            raise BadInput(f"bptvlm needs a ViT image tower for visual tokens; {box.model_name} has none (set n_visual=0)")
        if (cfg.conv_mean is None) != (cfg.conv_std is None):
            raise BadInput("bptvlm: the official A_V init needs both conv_mean and conv_std (or neither)")
        std_emb = cfg.embedding_std
        if std_emb is None:
            words = self.task_info["classnames"] + [t.replace("{}", "") for t in self.task_info["templates"]]
            std_emb = embedding_std(box, words)
        std_l = RandomProjection.bbt_std(std_emb, cfg.dim_text, cfg.sigma)
        self.text = RandomProjection(torch.zeros(cfg.n_text, box.ctx_dim), cfg.dim_text, std_l, seed)
        self.proj_init = {"text": (0.0, std_l)}  # (mean, std) of A_L's and A_V's entries
        self.visual = None
        if cfg.n_visual:
            mu_v, std_v = self.visual_init(cfg, lambda: box.embed_patches(data.images(range(min(len(data), 64)))))
            self.visual = RandomProjection(torch.zeros(cfg.n_visual, W), cfg.dim_visual, std_v, seed + 1)
            if mu_v:
                self.visual.A += mu_v
            self.proj_init["visual"] = (mu_v, std_v)
        dim = cfg.dim_text + (cfg.dim_visual if self.visual else 0)
        self.opt = CMAES(torch.zeros(dim), cfg.sigma, cfg.popsize, seed, cfg.bound, cfg.step_size)
        self.batches = WholeSet(data)  # images re-encoded through the prompted ViT every query

    @staticmethod
    def visual_init(cfg: BPTVLMConfig, patches) -> tuple[float, float]:
        """(mean, std) of A_V's entries: the official formula from the conv1 statistics when
        given, else BBT's from the std of the patch tokens ``patches()`` (B, 1 + G, W) returns."""
        if cfg.conv_std is not None:
            ratio = 3072 / cfg.dim_visual  # 3 · 32 · 32, ViT-B/32's patch fan-in, literal in the official code
            return cfg.conv_mean * ratio, cfg.conv_std * ratio**0.5 * cfg.sigma
        return 0.0, RandomProjection.bbt_std(float(patches()[:, 1:].std()), cfg.dim_visual, cfg.sigma)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, B, C), (B,) -> (n,): the official sum over the set / N, i.e. the mean."""
        return focal_per_candidate(logits, y, 2.0) if self.cfg.loss == "focal" else ce_per_candidate(logits, y)

    def decode(self, z: torch.Tensor) -> tuple[SoftPrompt, VisualPrompt | None]:
        """(n, d_L + d_V) -> text contexts (n, n_text, D), visual tokens (n, n_visual, W)."""
        d = self.cfg.dim_text
        ctx = self.text.decode(z[:, :d])
        vis = VisualPrompt(self.visual.decode(z[:, d:])) if self.visual else None
        return SoftPrompt(ctx), vis

    def candidates(self, points, images):
        text, vis = self.decode(points)
        return Query(text, images, vis)

    def prompt(self) -> SoftPrompt:
        return self.decode(self.opt.best[None])[0]

    def extra_state(self) -> dict[str, torch.Tensor]:
        _, vis = self.decode(self.opt.best[None])
        return {} if vis is None else {"visual": vis.tokens[0].clone()}

    @classmethod
    def apply(cls, prompt, extra, box, images) -> torch.Tensor:
        vis = VisualPrompt(extra["visual"][None]) if "visual" in extra else None
        return box.query(prompt, images, vis)[0]
