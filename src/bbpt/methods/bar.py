"""BAR (Tsai et al., ICML 2020): black-box adversarial reprogramming, as BlackVIP and ZIP run it.

The image is shrunk into the centre of the model's input (194 of 224 pixels: the same ratio
at other sizes) and surrounded by a learned frame: X = pad(resize(x)) + sigmoid(W) ⊙ M, with
W (3, S, S) ~ N(0, 1) and M = 1 outside the centre, 0 inside. The text side is the task's
fixed hand-crafted template. W is trained with the one-sided random gradient-free estimate
(q = 5 unit directions and one pivot: 6 api_calls per 128-image step, smoothing β = 0.01)
on the focal loss (γ = 2), step size by poly decay from lr0 = 10 to lr_min = 0.1 (ZIP's
setting) over the steps the budget allows. ``decay_steps`` sets the horizon instead (the ZIP
code's quirk: a 1000-epoch horizon, so the rate barely decays before the 5000-call cap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pydantic import Field

from ..boxes.capabilities import Needs
from ..data.staging import BatchStream
from ..models.blackbox import Images, TextPrompt
from ..optim import ZOSGD, OneSidedRGF, PolyDecay
from .base import MethodConfig, Preset, Query, register_method, ZerothOrderMethod
from .common import focal_per_candidate


DOCS = "docs/configuration.md, table 1 (changdaeoh/BlackVIP @66606fb)"
# docs/configuration.md, "Transfer Learning Benchmarks": init_lr, min_lr (BAR) per dataset
_TABLE = {
    "caltech101": (10.0, 0.1), "oxford_pets": (10.0, 0.1), "stanford_cars": (10.0, 0.1), "oxford_flowers": (5.0, 0.1),
    "food101": (5.0, 0.1), "fgvc_aircraft": (10.0, 0.1), "sun397": (5.0, 0.01), "dtd": (5.0, 0.1), "svhn": (5.0, 0.1),
    "eurosat": (5.0, 0.01), "resisc45": (5.0, 0.01), "clevr": (10.0, 0.1), "ucf101": (5.0, 0.01),
    "imagenet": (10.0, 0.1)}
PRESETS = {name: Preset(DOCS, {"lr0": (lr0, f"{name}: init_lr (BAR) {lr0}"),
                               "lr_min": (lr_min, f"{name}: min_lr (BAR) {lr_min}")})
           for name, (lr0, lr_min) in _TABLE.items()}


class BARConfig(MethodConfig):
    budget: int | None = Field(5000, ge=1, description="api_calls (ZIP's cap)")
    inner_ratio: float = Field(194 / 224, gt=0, le=1, description="side of the shrunk image / side of the input")
    q: int = Field(5, ge=1, le=1000, description="random directions per step (q + 1 candidates)")
    beta: float = Field(0.01, gt=0, description="smoothing of the one-sided finite difference")
    lr0: float = Field(10.0, gt=0, description="initial learning rate of the poly decay")
    lr_min: float = Field(0.1, ge=0, description="final learning rate of the poly decay")
    power: float = Field(0.9, gt=0, description="power of the poly decay")
    decay_steps: int | None = Field(None, ge=1, description="T, steps of the decay (the official total_length = "
                                    "batches per epoch x MAX_EPOCH): the rate reaches lr_min at 0.9·T; none: the "
                                    "steps the budget allows")
    gamma: float = Field(2.0, ge=0, description="focal loss γ (0: cross-entropy)")
    preset: str | None = Field(None, description="the BlackVIP release's per-dataset BAR rates (docs/configuration.md: "
                               "lr0, lr_min), e.g. 'eurosat'; explicit options win")

    sources = {

        "budget": "ZIP's re-implementation: MAX_API_CALLS=5000",
        "inner_ratio": "official (BlackVIP / ZIP PROGRAM): INPUT.SIZE 194 in a FRAME_SIZE 224 frame",
        "q": "official: q = 5 (q + 1 = 6 queries per step)",
        "beta": "official: SMOOTH β = 0.01",
        "lr0": "official (ZIP's scripts): LRS [10.0, 0.1]",
        "lr_min": "official (ZIP's scripts): LRS [10.0, 0.1]",
        "power": "official: DECAYING 0.9",
        "decay_steps": "bbpt: the steps the budget allows (ZIP's code, trainers/bar.py 103-105 and 151: "
                       "total_length = batches per epoch x 1000 epochs, so the rate barely decays; set decay_steps "
                       "to that to follow it; tests/parity/bar.json)",
        "gamma": "official: focal loss γ = 2",
        "preset": "official BlackVIP " + DOCS,
    }


def frame_mask(size: int, inner: int) -> torch.Tensor:
    """(S, S) mask: 1 on the frame, 0 on the centred inner x inner square."""
    m = torch.ones(size, size)
    lo = (size - inner) // 2
    m[lo : lo + inner, lo : lo + inner] = 0
    return m


def reprogram(pixels: torch.Tensor, W: torch.Tensor, inner: int) -> torch.Tensor:
    """Images (B, 3, S, S) in [0, 1] and frames W (P, 3, S, S) -> programmed images (P, B, 3, S, S)."""
    S = pixels.shape[-1]
    lo = (S - inner) // 2
    small = F.interpolate(pixels, size=(inner, inner), mode="bilinear", antialias=True, align_corners=False)
    x = F.pad(small, (lo, S - inner - lo, lo, S - inner - lo))  # zero frame around the centre
    frame = torch.sigmoid(W) * frame_mask(S, inner)  # (P, 3, S, S)
    return (x[None] + frame[:, None]).clamp(0, 1)


def inner_size(size: int, ratio: float) -> int:
    return max(1, min(size, round(size * ratio)))


@register_method
class BAR(ZerothOrderMethod):
    name = "bar"
    needs = Needs(frozenset({"templates", "pixels"}))
    cached_images = False  # prompted pixels / visual tokens: every query re-encodes its images
    Config = BARConfig
    presets = PRESETS
    revision = 1  # 1: the poly decay counts t = k, as the official trainers (was k - 1)

    def __init__(self, cfg: BARConfig, env):
        super().__init__(cfg, env)
        S = self.box.image_size
        self.inner = inner_size(S, cfg.inner_ratio)
        self.template = TextPrompt(self.task_info["templates"][0])
        g = torch.Generator().manual_seed(self.seed)
        W0 = torch.randn(3 * S * S, generator=g)  # (d,) = 3·S·S
        per_batch = -(-min(cfg.batch_size, len(self.data)) // self.box.max_images_per_call)
        steps = cfg.decay_steps or max(1, (cfg.budget or 1000 * (cfg.q + 1)) // ((cfg.q + 1) * per_batch))
        sched = PolyDecay(cfg.lr0, cfg.lr_min, steps, cfg.power, 0.9, cfg.beta)
        self.opt = ZOSGD(W0, OneSidedRGF(cfg.q), sched, seed=self.seed)
        self.batches = BatchStream(self.data, cfg.batch_size, self.seed)

    def frames(self, w: torch.Tensor) -> torch.Tensor:
        S = self.box.image_size
        return w.view(-1, 3, S, S)

    def candidates(self, points, images):
        """(q + 1, 3·S·S): the pivot, then q perturbed frames -> programmed images (q + 1, B, 3, S, S)."""
        return Query(self.template, Images(reprogram(images.pixels, self.frames(points), self.inner)))

    def loss(self, logits, y):
        return focal_per_candidate(logits, y, self.cfg.gamma)

    def prompt(self) -> TextPrompt:
        return self.template

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"frame": self.frames(self.opt.w)[0].clone(), "inner": torch.tensor(self.inner)}

    @classmethod
    def apply(cls, prompt, extra, box, images) -> torch.Tensor:
        W, inner = extra["frame"], int(extra["inner"])
        if W.shape[-1] != box.image_size:  # another input size: same ratio, frame resized
            W = F.interpolate(W[None], size=(box.image_size,) * 2, mode="bilinear", align_corners=False)[0]
            inner = inner_size(box.image_size, inner / extra["frame"].shape[-1])
        return box.query(prompt, Images(reprogram(images.pixels, W[None], inner)))[0]
