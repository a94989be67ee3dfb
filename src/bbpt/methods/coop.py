"""CoOp (Zhou et al., IJCV 2022): WHITE-BOX prompt learning, the upper reference.

NOT a black-box method: it back-propagates through the text tower, so the engine hands it
the model itself (``backbone``), which no black-box method receives. Its numbers are the
white-box row of every table, never ranked with the black-box methods.

16 context vectors N(0, 0.02²) shared by all classes ("X .. X <class>."), class-specific
with ``class_specific=True``; loss cross-entropy of logit_scale · cos(image, text); SGD
(lr 0.002, momentum 0.9, weight decay 5e-4), batch 32, one warm-up epoch at constant lr
1e-5, then cosine decay; 200 epochs at 8/16 shots, 100 at 2/4, 50 at 1. The last epoch's
prompt is reported (CoOp's practice since 2021-10). Training views as the official code:
a fresh random crop + flip of each image per batch, drawn from the run's view pool and
encoded once each by the frozen image tower (``augment``; off on the offline tasks).
Each training forward is charged to the meter (1 prompt × batch images) for comparison.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..boxes.capabilities import Needs
from ..data.staging import epoch_stop
from ..models.blackbox import SoftPrompt
from .base import Method, MethodConfig, register_method
from .common import initial_context


class CoOpConfig(MethodConfig):
    budget: int | None = Field(None, ge=1, description="white-box: no query budget (its forwards are counted)")
    batch_size: int = Field(32, ge=1, le=65536, description="SGD batch")
    n_ctx: int = Field(16, ge=1, le=75, description="context tokens")
    ctx_init: str = Field("random", min_length=1, description="'random' (N(0, 0.02²)), 'template' or a phrase (ctxv1)")
    class_specific: bool = Field(False, description="one context per class (CSC)")
    lr: float = Field(0.002, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    epochs: int | None = Field(None, ge=1, le=100_000, description="epochs; none: 200 (8/16 shots), 100 (2/4), 50 (1)")
    warmup_epochs: int = Field(1, ge=0, description="epochs at the constant warm-up rate")
    warmup_lr: float = Field(1e-5, gt=0, description="warm-up learning rate")

    sources = {

        "budget": "CoOp: white-box, no query budget",
        "batch_size": "CoOp configs: batch 32",
        "n_ctx": "CoOp: N_CTX 16",
        "ctx_init": "CoOp: CTX_INIT '' -> normal_(std=0.02) ('a photo of a' in the ctxv1 configs)",
        "class_specific": "CoOp: CSC False",
        "lr": "CoOp configs: SGD lr 0.002",
        "momentum": "Dassl SGD default: momentum 0.9",
        "weight_decay": "Dassl SGD default: weight decay 5e-4",
        "epochs": "CoOp: 200 epochs (8/16 shots), 100 (2/4), 50 (1)",
        "warmup_epochs": "CoOp: 1 warm-up epoch",
        "warmup_lr": "CoOp: constant warm-up lr 1e-5",
    }


@register_method
class CoOp(Method):
    name = "coop"
    needs = Needs(frozenset({"model"}), frozenset({"logits"}))
    Config = CoOpConfig
    black_box = False
    state = ("ctx", "opt", "rng", "epoch")

    @classmethod
    def resolve_config(cls, cfg: CoOpConfig, shots: int) -> CoOpConfig:
        if cfg.epochs is not None:
            return cfg
        return cfg.model_copy(update={"epochs": 200 if shots >= 8 else 100 if shots >= 2 else 50})

    def __init__(self, cfg: CoOpConfig, env):
        super().__init__(cfg, env)
        self.white = env.white_box()  # the model itself: gradients through the text tower
        self.scale = self.white.logit_scale
        self.feats = None if self.data.views is not None else self.white.image_features(self.data.images().pixels)  # (N, E)
        self._view_feats: dict[str, torch.Tensor] = {}  # training views' features by key (frozen tower)
        self._blocks: set[tuple[int, int]] = set()  # (view, block) encoded
        ctx = initial_context(self.box, cfg.ctx_init, cfg.n_ctx, self.task_info["templates"], self.seed)  # (m, D)
        if cfg.class_specific:
            ctx = ctx[None].repeat(self.box.num_classes, 1, 1)  # (C, m, D)
        self.ctx = torch.nn.Parameter(ctx.clone())
        self.opt = torch.optim.SGD([self.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0

    def total_steps(self) -> int:
        return self.cfg.epochs

    def lr_at(self, epoch: int) -> float:
        """Constant warm-up, then cosine over the epochs (Dassl's per-epoch schedule)."""
        cfg = self.cfg
        if epoch < cfg.warmup_epochs:
            return cfg.warmup_lr
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))

    def step(self, budget):
        """One epoch of SGD on shuffled batches of the few-shot set."""
        if self.epoch >= self.cfg.epochs:
            return None
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.epoch)
        order, bs, losses = self.rng.permutation(len(self.data)), self.cfg.batch_size, []
        for i in range(0, epoch_stop(len(order), bs), bs):
            idx = order[i : i + bs]
            feats = self.features(idx)  # (B, E)
            self.white.charge(1, len(idx))  # counted for comparison; never a black-box query
            txt = self.white.text_features(SoftPrompt(self.ctx[None]))[0]  # (C, E)
            logits = self.scale * feats @ txt.T  # (B, C)
            loss = F.cross_entropy(logits, self.data.labels[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(float(loss.detach()))
        self.epoch += 1
        return {"train_loss": float(np.mean(losses)), "lr": self.lr_at(self.epoch - 1)}

    def features(self, idx) -> torch.Tensor:
        """(B, E) frozen image features of images ``idx``: plain, or a fresh training view each
        (Dassl's per-batch augmentation), encoded once per view in fixed blocks."""
        views = self.data.draw_views(self.rng, len(idx))
        if views is None:
            return self.feats[idx]
        if not self.data.views.spec.pool:  # an unbounded pool: every view is new
            return self.white.image_features(self.data.views.pixels(idx, views))

        def encode(images):
            for k, f in zip(images.keys, self.white.image_features(images.pixels)):
                self._view_feats[k] = f

        self.data.encode_blocks(idx, views, self._blocks, encode)
        return torch.stack([self._view_feats[k] for k in self.data.views.keys(idx, views)])

    def prompt(self) -> SoftPrompt:
        return SoftPrompt(self.ctx.detach().clone()[None])
