"""BlackVIP (Oh et al., CVPR 2023): a coordinator writes an input-dependent visual prompt,
trained with SPSA-GC.

Coordinator (client side): a frozen image encoder gives z (B, E) per image; a trainable
decoder maps z to an image-shaped prompt (3, S, S). The prompted image is
clamp(x + p_eps · prompt) in the model's normalised units, i.e. x + p_eps · std · prompt in
[0, 1] pixels, clamped to [0, 1] (the official ``clip_clipping``). The text side is the
task's fixed hand-crafted template.

Decoder, following the official ``DecoderManual`` (``trainers/visual_prompters.py`` 158-217,
arch 'vit-mae-base', lines 175-190, SRC_DIM 1568):

- a learned trigger ``p_trigger`` (1, 32·s0² - E), ``uniform_(0, 0.1)`` at init, is
  concatenated after z and the (B, 32·s0²) result reshaped to a (32, s0, s0) source cube;
- up-sampling blocks, each a grouped 2×2 transposed conv with stride 2 (groups min(c_in, 64),
  with bias), a 1×1 transposed conv without bias, BatchNorm and GELU, with widths
  (64, 64), (64, 32), (32, 32), (32, 16) (after the grouped conv, after the 1×1);
- a last 2×2 transposed conv with stride 2 to RGB, 16 -> 3, without bias.

At 224 px with a 768-d z (the MAE CLS token) this is the official decoder layer for layer:
s0 = 7, five stages (7 -> 224), 9,920 trainable parameters (800 trigger, the convs, the
BatchNorm affine weights), with the same parameter names and order (``p_trigger``,
``body.0.weight``, ..., ``body.16.weight``: an official state dict loads 1:1) and the same
init: built after ``torch.manual_seed(s)`` it holds the weights ``DecoderManual`` gets after
the same seed (the trigger first, then PyTorch's default init layer by layer).

What bbpt adapts, for other image sizes and encoders (the official code fixes s0 = 7, i.e.
224 px): the decoder takes the most stages n <= 5 that leave a whole source grid
s0 = S / 2^n of at least 4×4 holding z (32·s0² > E). With fewer than five stages it keeps
the official *last* n - 1 blocks and the RGB conv, the first kept block's grouped conv
reading the 32-channel source cube (groups min(32, 64) = 32, as the official first block
reads its own). At 32 px (bbpt's embedded ``mini``, E = 128) that is s0 = 4, blocks
(32, 32), (32, 16) and the RGB conv: 2,528 parameters. A trigger is always kept (the
official one is 800 values at SRC_DIM 1568 with a 768-d z).

SPSA-GC (``trainers/blackvip.py`` 112-173): SPSA (5 segmented-uniform perturbation pairs:
10 api_calls per 128-image step) with a_k = a/(k+o)^α, c_k = c/k^γ
([o, c, a, α, γ] = [1, 0.01, 0.01, 0.4, 0.1]) and the Nesterov-style correction
m ← βm + ĝ (m = ĝ at step 1), w ← w - a_k (ĝ + βm), β = 0.9. BatchNorm runs in train mode
during SPSA (its running statistics update on every perturbed forward, w + c_kΔ_j then
w - c_kΔ_j, as in the official code) and in eval mode for prediction. The decoder runs in
float32 (the official step runs under CUDA autocast, i.e. in float16 on a GPU).

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
import torch.nn.functional as F

from pydantic import Field

from ..boxes.capabilities import Needs
from ..data.staging import BatchStream
from ..errors import BadInput, CorruptCheckpoint
from ..models.blackbox import Images, TextPrompt
from ..optim import SPSA, ZOSGD
from .base import Preset, Query, register_method, ZerothOrderMethod
from .zip import SPSAConfig

# The official DecoderManual's up-sampling blocks (visual_prompters.py 175-189): widths after
# the grouped 2×2 transposed conv and after the 1×1; then a 2×2 transposed conv to RGB (190).
BLOCKS = [(64, 64), (64, 32), (32, 32), (32, 16)]
SOURCE_CHANNELS = 32  # official SRC_DIM 1568 = 32 · 7 · 7
ENCODERS = ("mini", "conv")


DOCS = "docs/configuration.md, table 1 (changdaeoh/BlackVIP @66606fb)"
# docs/configuration.md, "Transfer Learning Benchmarks": moms, gamma, spsa_c, p_eps per dataset (BlackVIP columns)
_TABLE = {
    "caltech101": (0.9, 0.2, 0.005, 0.2), "oxford_pets": (0.9, 0.1, 0.01, 1), "stanford_cars": (0.9, 0.2, 0.01, 0.3),
    "oxford_flowers": (0.5, 0.2, 0.02, 1), "food101": (0.9, 0.1, 0.01, 0.3), "fgvc_aircraft": (0.3, 0.1, 0.01, 0.5),
    "sun397": (0.5, 0.1, 0.01, 1), "dtd": (0.7, 0.2, 0.01, 0.3), "svhn": (0.9, 0.2, 0.005, 1),
    "eurosat": (0.9, 0.2, 0.005, 0.4), "resisc45": (0.95, 0.1, 0.01, 0.3), "clevr": (0.9, 0.2, 0.005, 1),
    "ucf101": (0.9, 0.1, 0.01, 0.3), "imagenet": (0.9, 0.2, 0.005, 0.3)}
PRESETS = {name: Preset(DOCS, {
    "momentum": (float(m), f"{name}: moms (BlackVIP) {m}"), "gamma": (float(g), f"{name}: gamma (BlackVIP) {g}"),
    "c": (float(c), f"{name}: spsa_c (BlackVIP) {c}"), "p_eps": (float(e), f"{name}: p_eps (BlackVIP) {e}"),
    }) for name, (m, g, c, e) in _TABLE.items()}


class BlackVIPConfig(SPSAConfig):
    encoder: Literal["mini", "conv"] = Field("mini", description="frozen client-side encoder of the coordinator")
    p_eps: float = Field(1.0, gt=0, description="prompt scale p_eps in normalised pixel units")
    momentum: float = Field(0.9, ge=0, lt=1, description="SPSA-GC's Nesterov-style momentum β")
    preset: str | None = Field(None, description="the release's per-dataset settings (docs/configuration.md: "
                               "momentum, gamma, c, p_eps), e.g. 'eurosat'; explicit options win")

    sources = {

        "encoder": "bbpt: the embedded model's image tower (official: facebook/vit-mae-base, not available offline); "
                   "the decoder it feeds is the official DecoderManual (trainers/visual_prompters.py 158-217, "
                   "'vit-mae-base' 175-190, SRC_DIM 1568), at 224 px with a 768-d z the same layers, parameter "
                   "order and init (9,920 parameters); bbpt: below 224 px the most stages n <= 5 leaving a >= 4x4 "
                   "source grid that holds z, keeping the official last n - 1 blocks and the RGB conv (2,528 "
                   "parameters at 32 px with mini's 128-d z)",
        "decoder": "see encoder (the coordinator's decoder; not an option)",
        "p_eps": "official config default P_EPS 1.0 (per dataset 0.2-1 in docs/configuration.md); the prompted "
                 "image clip_clipping(x + P_EPS · prompt) (trainers/blackvip.py 58, trainers/utils.py 102-112), "
                 "clamped here in [0, 1] pixels: the same range",
        "perturbation": "official: SPSA-GC with segmented uniform Δ",
        "momentum": "official config default MOMS 0.9; SPSA-GC as trainers/blackvip.py 124-134 (m = ĝ at step 1, "
                    "then m = β m + ĝ; w - a_k (ĝ + β m))",
        "preset": "official " + DOCS,
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


def stages(size: int, z_dim: int) -> int:
    """Up-sampling stages n: the most (<= 5, the official count) leaving a whole source grid
    s0 = size / 2^n of at least 4×4 whose 32·s0² values hold z and a trigger."""
    for n in range(len(BLOCKS) + 1, 0, -1):
        s0 = size // 2**n
        if size % 2**n == 0 and s0 >= 4 and SOURCE_CHANNELS * s0 * s0 > z_dim:
            return n
    raise BadInput(f"BlackVIP's decoder cannot write a {size} px prompt from {z_dim} encoder features: it needs "
                   f"size = s0 · 2^n with n >= 1, s0 >= 4 and 32·s0² > {z_dim}")


class Decoder(nn.Module):
    """[z (E), p_trigger] -> (32, s0, s0) -> n - 1 up-sampling blocks -> RGB conv -> prompt
    (3, S, S), S = s0 · 2^n; the official DecoderManual at 224 px (see the module docstring)."""

    def __init__(self, z_dim: int, size: int):
        super().__init__()
        n = stages(size, z_dim)
        self.s0, self.z_dim = size // 2**n, z_dim
        # official order: the trigger is made (and drawn) first, then the layers
        self.p_trigger = nn.Parameter(torch.empty(1, SOURCE_CHANNELS * self.s0**2 - z_dim))
        nn.init.uniform_(self.p_trigger, a=0.0, b=0.1)
        body, c = [], SOURCE_CHANNELS
        for mid, out in BLOCKS[len(BLOCKS) - (n - 1):]:  # the official last n - 1 blocks
            body += [nn.ConvTranspose2d(c, mid, 2, 2, 0, groups=min(c, 64)),
                     nn.ConvTranspose2d(mid, out, kernel_size=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
            c = out
        body += [nn.ConvTranspose2d(c, 3, 2, 2, 0, bias=False)]
        self.body = nn.Sequential(*body)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.p_trigger.expand(len(z), -1)], dim=1)  # (B, 32·s0²)
        return self.body(x.view(len(z), SOURCE_CHANNELS, self.s0, self.s0))  # (B, 3, S, S)

    def run(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``functional_call(self, params, (z,))``: the same values and the same BatchNorm
        statistics updates, in less time on the CPU (the transposed convolutions, all with
        kernel = stride, written as the products they are; tests/test_blackvip_decoder.py)."""
        B = len(z)
        x = torch.cat([z, params["p_trigger"].expand(B, -1)], dim=1).view(B, SOURCE_CHANNELS, self.s0, self.s0)
        for i, m in enumerate(self.body):
            w, b = params.get(f"body.{i}.weight"), params.get(f"body.{i}.bias")
            if isinstance(m, nn.ConvTranspose2d):
                x = transposed_conv(x, w, b, m)
            elif isinstance(m, nn.BatchNorm2d):
                if m.training:
                    m.num_batches_tracked.add_(1)
                x = F.batch_norm(x, m.running_mean, m.running_var, w, b, m.training, m.momentum, m.eps)
            else:
                x = m(x)
        return x  # (B, 3, S, S)


def transposed_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: nn.ConvTranspose2d) -> torch.Tensor:
    """``m``'s transposed convolution of x (B, C, H, W) under weights w (C, O/groups, k, k):
    with kernel = stride, every output pixel is one input pixel times one weight tap (depthwise)
    or a sum over the input channels (a matmul), as PyTorch's kernels compute it."""
    B, C, H, W = x.shape
    k = m.kernel_size[0]
    if (m.kernel_size != m.stride or m.kernel_size[0] != m.kernel_size[1] or m.padding != (0, 0)
            or m.output_padding != (0, 0) or m.dilation != (1, 1) or m.groups not in (1, C)):
        return F.conv_transpose2d(x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    if m.groups == C and C > 1:  # depthwise: out[:, c·n + o, k·i + a, k·j + e] = x[:, c, i, j] · w[c, o, a, e]
        n = w.shape[1]
        up = F.interpolate(x if n == 1 else x.repeat_interleave(n, dim=1), scale_factor=k, mode="nearest")
        y = up.mul_(w.reshape(C * n, k, k).repeat(1, H, W))  # (B, C·n, kH, kW)
    else:  # a sum over C: one matmul, (B·H·W, C) @ (C, O·k·k)
        y = torch.mm(x.permute(0, 2, 3, 1).reshape(-1, C), w.reshape(C, -1))
        O = w.shape[1]
        y = y.view(B, H, W, O, k, k).permute(0, 3, 1, 4, 2, 5).reshape(B, O, k * H, k * W).contiguous()  # NCHW, as BatchNorm sums it
    return y if b is None else y.add_(b.view(1, -1, 1, 1))


def old_decoder(state: dict, what: str) -> None:
    """Refuse a decoder state saved before the decoder became the official one (its keys were
    ``trigger`` and ``net.*``; now ``p_trigger`` and ``body.*``)."""
    if "trigger" in state or any(k.startswith("net.") for k in state):
        raise CorruptCheckpoint(f"this BlackVIP {what} was saved by an older bbpt, whose coordinator decoder was not "
                                f"the official one (decoder.trigger / decoder.net.*): it cannot be loaded; run the "
                                f"method again")


def prompted(pixels: torch.Tensor, prompt: torch.Tensor, p_eps: float, std: tuple) -> torch.Tensor:
    """x + p_eps · prompt in normalised units, clamped to the valid range: [0, 1] pixels."""
    return (pixels + p_eps * prompt * torch.tensor(std).view(1, 3, 1, 1)).clamp(0, 1)


@register_method
class BlackVIP(ZerothOrderMethod):
    name = "blackvip"
    needs = Needs(frozenset({"templates", "pixels"}))
    cached_images = False  # prompted pixels / visual tokens: every query re-encodes its images
    Config = BlackVIPConfig
    presets = PRESETS
    revision = 1  # 1: the official DecoderManual (grouped 32->64 first block, bias-free 1x1 convs, one 16->3 last)
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
        px = torch.stack([prompted(images.pixels, self.decoder.run(self.params(w), z),
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

    def load_state_dict(self, state: dict) -> None:
        old_decoder(state.get("decoder", {}).get("__state_dict__", {}), "checkpoint")
        super().load_state_dict(state)

    @classmethod
    @torch.no_grad()
    def apply(cls, prompt, extra, box, images) -> torch.Tensor:
        state = {k[len("decoder."):]: v for k, v in extra.items() if k.startswith("decoder.")}
        old_decoder(state, "prompt")
        enc = make_encoder(ENCODERS[int(extra["encoder"])])
        z = enc(images.pixels)
        with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the global RNG alone
            dec = Decoder(z.shape[1], box.image_size)
        dec.load_state_dict(state)
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
