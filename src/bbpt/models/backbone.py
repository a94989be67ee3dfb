"""Backbones: a CLIP model behind a factory, with its text tower's parts reachable.

``create_backbone(name, pretrained)`` builds either the embedded model ``mini`` (an open_clip
``CLIP`` with the config in ``configs/mini.json`` and the weights shipped in
``weights/mini.safetensors``) or any open_clip architecture by name, with a pretrained tag
or a local checkpoint path. Everything here is *inside* the black box: tuning methods never
see a :class:`Backbone`, only :class:`bbpt.models.blackbox.BlackBox`.

The soft-prompt path is one piece of code for every backbone: :class:`TextTower` resolves
token embedding, positional embedding, transformer, final norm, projection, causal mask and
pooling once, and encodes token *embeddings* (not ids), so context vectors can be fed in.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

# Offline first: without this, a missing pretrained tag retries the Hugging Face hub for
# ~40 s before failing. A user who wants downloads sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..errors import BadInput, CorruptCheckpoint, MissingWeights, UnknownName  # noqa: E402

HERE = Path(__file__).parent
CONFIG_DIR = HERE / "configs"
WEIGHTS_DIR = HERE / "weights"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_TAGS = ("random", "none")


def embedded_models() -> list[str]:
    """Names of the architectures that ship with bbpt (``configs/*.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def embedded_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


class TextTower(nn.Module):
    """The parts of a CLIP text tower, resolved once for open_clip ``CLIP``/``CustomTextCLIP``.

    ``encode(x, ids)`` runs the tower from token embeddings ``x`` (N, L, D) with the token
    ids ``ids`` (N, L) that locate the pooling position (EOT). With ``cut=True`` sequences are
    cut to the longest real length first: exact under the causal mask, because no position
    at or before EOT attends to the padding after it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        src = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if src is None or not hasattr(src, "token_embedding") or not hasattr(src, "ln_final"):
            raise BadInput(
                f"{type(model).__name__}: only CLIP-style text towers (token embedding + "
                "transformer) can take soft prompts; Hugging Face text towers are not supported"
            )
        if getattr(src, "cls_emb", None) is not None:
            raise BadInput(f"{type(model).__name__}: text towers with a CLS embedding are not supported")
        self.token_embedding: nn.Embedding = src.token_embedding
        self.positional_embedding: torch.Tensor = src.positional_embedding
        self.transformer: nn.Module = src.transformer
        self.ln_final: nn.Module = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask = src.attn_mask
        self.pool_type: str = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        self.eos_id = getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None)
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.token_embedding.embedding_dim)
        if self.pool_type not in ("argmax", "eos"):
            raise BadInput(f"text pooling {self.pool_type!r} is not supported (need argmax or eos)")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> word embeddings (N, L, D)."""
        return self.token_embedding(ids)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N,) index of the pooled (EOT) token."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def real_length(self, ids: torch.Tensor) -> int:
        """Longest real length: positions after every sequence's EOT can be dropped."""
        if self.attn_mask is None:  # bidirectional: padding matters, no cut
            return ids.shape[1]
        return int(self.eot_positions(ids).max()) + 1

    def encode(self, x: torch.Tensor, ids: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Embeddings (N, L, D) + ids (N, L) -> text features (N, E), unnormalised."""
        if cut:
            L = self.real_length(ids)
            x, ids = x[:, :L], ids[:, :L]
        L = x.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = x.to(cast) + self.positional_embedding[:L].to(cast)
        mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.transformer(x, attn_mask=mask)  # (N, L, D)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]  # (N, D)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x


@dataclass
class Backbone:
    """A frozen CLIP model with its tokenizer and preprocessing: the inside of the black box."""

    name: str
    pretrained: str
    model: nn.Module
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple
    device: torch.device

    def __post_init__(self):
        self.model.eval().requires_grad_(False).to(self.device)
        self.text = TextTower(self.model)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def logit_bias(self) -> float:
        b = getattr(self.model, "logit_bias", None)
        return 0.0 if b is None else float(b)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, context_length) token ids on the backbone's device."""
        return self.tokenizer(texts).to(self.device)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, S, S) -> model input."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise BadInput(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) RGB in [0, 1] for "
                f"{self.name}; got {tuple(pixels.shape)} (ImageSet.pixels(size=...) makes them)"
            )
        return torch.sub(pixels.to(self.device, torch.float32), self._mean).div_(self._std)  # one copy

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> L2-normalised image features (B, E)."""
        return F.normalize(self.model.encode_image(self.normalize(pixels)).float(), dim=-1)

    # ---- visual prompt tokens (BPT-VLM) ---------------------------------------------
    @property
    def vit(self) -> nn.Module | None:
        """The image tower if it is an open_clip VisionTransformer (visual tokens need one)."""
        v = self.model.visual
        return v if all(hasattr(v, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "_pool")) else None

    def _need_vit(self) -> nn.Module:
        if self.vit is None:
            raise BadInput(f"{self.name}: visual prompt tokens need a ViT image tower; {type(self.model.visual).__name__} has none")
        return self.vit

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> [CLS, patches] + positional embedding, (B, 1 + G, W)."""
        v = self._need_vit()
        x = v.conv1(self.normalize(pixels).to(v.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, G, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)

    def encode_tokens(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (N, 1 + G, W) with visual prompt tokens (N, n, W) appended after the
        patches (no positional embedding, before ln_pre, as BPT-VLM) -> normalised features (N, E)."""
        v = self._need_vit()
        if prompt is not None:
            x = torch.cat([x, prompt.to(x.dtype)], dim=1)  # (N, 1 + G + n, W)
        x = v.transformer(v.ln_pre(x))
        pooled, _ = v._pool(x)  # CLS token ('tok' pooling) after ln_post
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled.float(), dim=-1)


def open_clip_models() -> list[str]:
    import open_clip

    return open_clip.list_models()


def create_backbone(name: str = "mini", pretrained: str | None = None, device: str = "cpu") -> Backbone:
    """Build a backbone by name.

    name: ``mini`` (embedded) or an open_clip architecture (``ViT-B-16``, ``RN50``, ...).
    pretrained: for open_clip, a tag (``openai``, ``laion2b_s34b_b88k``, ...), a path to a local
    checkpoint, or ``random`` (untrained weights: tests and speed benchmarks). For ``mini``,
    None means the shipped weights, a path means other weights, ``random`` untrained ones.
    """
    import open_clip

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise BadInput(f"device {device!r} does not exist: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device {device!r} requested but MPS is not available; use --device cpu")
    if name in embedded_models():
        return _create_embedded(name, pretrained, dev)
    if name not in open_clip.list_models():
        raise UnknownName(
            "model", name, embedded_models() + open_clip.list_models(),
            hint="`bbpt models` lists them.",
        )
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise MissingWeights(
            f"model {name} needs --pretrained: a tag ({', '.join(tags[:4]) or 'none known'}...), "
            "a local checkpoint path, or 'random' for untrained weights"
        )
    tag = pretrained
    if pretrained.lower() in RANDOM_TAGS:
        tag = None
    elif not Path(pretrained).expanduser().exists():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags and pretrained.lower() not in tags:
            if any(sep in pretrained for sep in ("/", "\\", ".")):
                raise BadInput(f"checkpoint file {pretrained} does not exist; pass an existing path or a tag of {name}")
            raise UnknownName(f"pretrained tag for {name}", pretrained, tags + list(RANDOM_TAGS))
    else:
        tag = str(Path(pretrained).expanduser())
    try:
        with _quiet_root_log():  # open_clip logs a failed download as an ERROR line; bbpt says it in one
            model = open_clip.create_model(name, pretrained=tag, device=dev)
    except RuntimeError as e:
        if tag is not None and not Path(tag).exists() and "download" in str(e).lower():
            raise MissingWeights(
                f"weights for {name} tag {pretrained!r} are not available offline; download the "
                "checkpoint elsewhere and pass --pretrained /path/to/open_clip_pytorch_model.bin "
                "(or place it in the Hugging Face cache)"
            ) from None
        if tag is not None and Path(tag).exists():
            raise CorruptCheckpoint(f"checkpoint {tag} does not load into {name}: {_first_line(e)}") from None
        raise
    except Exception as e:  # unpickling / safetensors header errors on a bad local file
        if tag is not None and Path(tag).exists():
            raise CorruptCheckpoint(f"checkpoint {tag} is not a readable {name} checkpoint: {_first_line(e)}") from None
        raise
    cfg = open_clip.get_pretrained_cfg(name, pretrained) if tag and not Path(tag).exists() else {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Backbone(
        name=name,
        pretrained=pretrained,
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=int(size),
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        device=dev,
    )


@contextlib.contextmanager
def _quiet_root_log():
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _create_embedded(name: str, pretrained: str | None, dev: torch.device) -> Backbone:
    import open_clip

    cfg = embedded_config(name)
    model = open_clip.model.CLIP(**cfg)
    if pretrained is None or pretrained.lower() not in RANDOM_TAGS:
        path = Path(pretrained).expanduser() if pretrained else WEIGHTS_DIR / f"{name}.safetensors"
        load_weights(model, path, name)
    return Backbone(
        name=name,
        pretrained=pretrained or "bbpt",
        model=model,
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),  # the CLIP BPE tokenizer, shipped with open_clip
        image_size=int(cfg["vision_cfg"]["image_size"]),
        mean=CLIP_MEAN,
        std=CLIP_STD,
        device=dev,
    )


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Strict safetensors load: every key present, every shape equal; errors name the file."""
    from safetensors.torch import load_file

    if not path.exists():
        raise CorruptCheckpoint(
            f"weights file {path} for {name} is missing; reinstall bbpt or rebuild it with "
            f"`python -m bbpt.models.pretrain --out {path}`"
        )
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CorruptCheckpoint(
            f"weights file {path} is corrupt ({_first_line(e)}); reinstall bbpt or rebuild it with "
            "`python -m bbpt.models.pretrain`"
        ) from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or bad:
        raise CorruptCheckpoint(
            f"weights file {path} does not match the {name} architecture "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]}); "
            "rebuild it with `python -m bbpt.models.pretrain`"
        )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def save_weights(model: nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def timed_load(name: str = "mini") -> float:
    """Seconds to build ``name`` with its weights (model construction + load, imports excluded)."""
    import open_clip  # noqa: F401  (import cost excluded)

    t = time.perf_counter()
    create_backbone(name)
    return time.perf_counter() - t
