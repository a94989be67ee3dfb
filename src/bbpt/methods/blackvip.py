"""BlackVIP (Oh et al., CVPR 2023): a coordinator writes an input-dependent visual prompt,
trained with SPSA-GC.

Coordinator (client side): a frozen image encoder gives z (B, E) per image; a trainable
decoder maps [z, trigger] (the trigger a learned vector, U(0, 0.1) at init) reshaped to
(32, s0, s0) through up-sampling blocks (grouped 2×2 transposed conv with stride 2, 1×1
transposed conv, BatchNorm, GELU) to an image-shaped prompt (3, S, S). The prompted image is
clamp(x + p_eps · prompt) in the model's normalised units, i.e. x + p_eps · std · prompt in
[0, 1] pixels, clamped to [0, 1]. The text side is the task's fixed hand-crafted template.

SPSA-GC: SPSA (5 segmented-uniform perturbation pairs: 10 api_calls per 128-image step) with
a_k = a/(k+o)^α, c_k = c/k^γ ([o, c, a, α, γ] = [1, 0.01, 0.01, 0.4, 0.1]) and the
Nesterov-style correction m ← βm + ĝ, w ← w - a_k (ĝ + βm), β = 0.9. BatchNorm runs in train
mode during SPSA (its running statistics update on every perturbed forward, as in the
official code) and in eval mode for prediction.

The official frozen encoder is a pretrained MAE ViT-B/16 (z = the CLS token, 768-d), which
cannot be had offline. ``encoder="mini"`` (default) uses the image tower of bbpt's embedded
model, loaded client-side from the weights shipped with bbpt (public weights, like MAE's:
nothing is read through the black box; when the black box is itself ``mini`` the client's
encoder shares its weights). ``encoder="conv"`` is a small seeded random frozen CNN that
shares nothing with any black box.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn as nn
from torch.func import functional_call

from pydantic import Field

from ..models.blackbox import Images, TextPrompt
from ..optim import SPSA, ZOSGD
from .base import BatchStream, Query, ZerothOrderMethod, register_method
from .zip import SPSAConfig

CHANNELS = [64, 32, 32, 16, 3]  # the official decoder's 5 blocks (7 -> 224)
ENCODERS = ("mini", "conv")


class BlackVIPConfig(SPSAConfig):
    encoder: Literal["mini", "conv"] = Field("mini", description="frozen client-side encoder of the coordinator")
    p_eps: float = Field(1.0, gt=0, description="prompt scale p_eps in normalised pixel units")
    momentum: float = Field(0.9, ge=0, lt=1, description="SPSA-GC's Nesterov-style momentum β")

    sources = {

        "encoder": "bbpt: the embedded model's image tower (official: facebook/vit-mae-base, not available offline)",
        "p_eps": "official config default P_EPS 1.0 (per dataset 0.2-1 in docs/configuration.md)",
        "perturbation": "official: SPSA-GC with segmented uniform Δ",
        "momentum": "official config default MOMS 0.9",
    }


class ConvEncoder(nn.Module):
    """A small frozen CNN (seeded random weights): (B, 3, S, S) in [0, 1] -> (B, 64)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.0)
        self.requires_grad_(False).eval()

    def forward(self, pixels):
        return self.net(pixels)


class MiniEncoder(nn.Module):
    """The embedded model's image tower, loaded client-side from bbpt's shipped weights: (B, E)."""

    def __init__(self):
        super().__init__()
        from ..models.backbone import create_backbone

        self.bb = create_backbone("mini")

    @torch.no_grad()
    def forward(self, pixels):
        size = self.bb.image_size
        if pixels.shape[-1] != size:
            pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        return self.bb.model.encode_image(self.bb.normalize(pixels)).float()


@functools.lru_cache(maxsize=2)
def make_encoder(kind: str) -> nn.Module:
    """The frozen encoder (cached: it never changes)."""
    return MiniEncoder() if kind == "mini" else ConvEncoder()


class Decoder(nn.Module):
    """[z (E), trigger] -> (32, s0, s0) -> n up-sampling blocks -> prompt (3, S), S = s0 · 2^n."""

    def __init__(self, z_dim: int, size: int):
        super().__init__()
        n = max(k for k in range(1, 6) if size % 2**k == 0 and size // 2**k >= 4 or k == 1)
        self.s0, self.z_dim = size // 2**n, z_dim
        src = 32 * self.s0**2
        if src <= z_dim:
            raise ValueError(f"decoder source ({src}) must exceed the encoder's {z_dim} features")
        self.trigger = nn.Parameter(torch.rand(src - z_dim) * 0.1)  # U(0, 0.1)
        chans = [32] + CHANNELS[-n:]
        blocks = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            blocks += [nn.ConvTranspose2d(cin, cin, 2, stride=2, groups=cin), nn.ConvTranspose2d(cin, cout, 1)]
            if i < n - 1:
                blocks += [nn.BatchNorm2d(cout), nn.GELU()]
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.trigger.expand(len(z), -1)], dim=1)  # (B, 32·s0²)
        return self.net(x.view(len(z), 32, self.s0, self.s0))  # (B, 3, S, S)


def prompted(pixels: torch.Tensor, prompt: torch.Tensor, p_eps: float, std: tuple) -> torch.Tensor:
    """x + p_eps · prompt in normalised units, clamped to the valid range: [0, 1] pixels."""
    return (pixels + p_eps * prompt * torch.tensor(std).view(1, 3, 1, 1)).clamp(0, 1)


@register_method
class BlackVIP(ZerothOrderMethod):
    name = "blackvip"
    cached_images = False  # prompted pixels / visual tokens: every query re-encodes its images
    Config = BlackVIPConfig
    state = ("opt", "batches", "decoder")  # the decoder's BatchNorm statistics; its weights are opt.w

    def __init__(self, cfg: BlackVIPConfig, env):
        super().__init__(cfg, env)
        self.encoder = make_encoder(cfg.encoder)
        self._z: dict[str, torch.Tensor] = {}  # encoder features by image key (the encoder is frozen)
        for images in self.data.chunks(512):  # once, in a fixed order: the same features on resume
            with torch.no_grad():
                self._z.update(zip(images.keys, self.encoder(images.pixels)))
        z_dim = next(iter(self._z.values())).shape[0]
        with torch.random.fork_rng(devices=[]):  # the decoder's init from the seed alone
            torch.manual_seed(self.seed)
            self.decoder = Decoder(z_dim, self.box.image_size).train()
        self.names = [n for n, _ in self.decoder.named_parameters()]
        self.shapes = [p.shape for _, p in self.decoder.named_parameters()]
        w0 = torch.cat([p.detach().flatten() for p in self.decoder.parameters()])
        self.opt = ZOSGD(w0, SPSA(cfg.n_perturb, cfg.perturbation), cfg.schedule(), momentum=cfg.momentum, seed=self.seed)
        self.template = TextPrompt(self.task_info["templates"][0])
        self.batches = BatchStream(self.data, cfg.batch_size, self.seed)

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            out[n] = w[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    @torch.no_grad()
    def features(self, images: Images) -> torch.Tensor:
        if images.keys is None:  # views of an unbounded pool: never seen again
            return self.encoder(images.pixels)
        miss = [i for i, k in enumerate(images.keys) if k not in self._z]
        for i in miss:  # one at a time: a view's features never depend on which views came with it
            self._z[images.keys[i]] = self.encoder(images.pixels[i : i + 1])[0]
        return torch.stack([self._z[k] for k in images.keys])  # (B, E)

    @torch.no_grad()
    def candidates(self, points, images):
        """(2N, d) decoder weights -> prompted images (2N, B, 3, S, S) under the fixed template.
        BatchNorm in train mode: its running statistics update on every perturbed forward."""
        z = self.features(images)
        px = torch.stack([prompted(images.pixels, functional_call(self.decoder, self.params(w), (z,)),
                                   self.cfg.p_eps, self.box.pixel_std) for w in points])
        return Query(self.template, Images(px))

    def prompt(self) -> TextPrompt:
        return self.template

    def extra_state(self) -> dict[str, torch.Tensor]:
        self.decoder.load_state_dict({**self.decoder.state_dict(), **self.params(self.opt.w)})
        state = {f"decoder.{k}": v.clone() for k, v in self.decoder.state_dict().items()}
        return {**state, "p_eps": torch.tensor(self.cfg.p_eps),
                "encoder": torch.tensor(ENCODERS.index(self.cfg.encoder)),
                "pixel_std": torch.tensor(self.box.pixel_std)}

    @classmethod
    @torch.no_grad()
    def apply(cls, prompt, extra, box, images) -> torch.Tensor:
        enc = make_encoder(ENCODERS[int(extra["encoder"])])
        z = enc(images.pixels)
        dec = Decoder(z.shape[1], box.image_size)
        dec.load_state_dict({k[len("decoder."):]: v for k, v in extra.items() if k.startswith("decoder.")})
        std = tuple(extra["pixel_std"].tolist())
        px = prompted(images.pixels, dec.eval()(z), float(extra["p_eps"]), std)
        return box.query(prompt, Images(px))[0]

    def predict(self, box, images) -> torch.Tensor:
        z = self.features(images) if images.keys is not None else self.encoder(images.pixels)
        self.decoder.load_state_dict({**self.decoder.state_dict(), **self.params(self.opt.w)})
        with torch.no_grad():
            px = prompted(images.pixels, self.decoder.eval()(z), self.cfg.p_eps, self.box.pixel_std)
            out = box.query(self.template, Images(px))[0]
        self.decoder.train()
        return out
