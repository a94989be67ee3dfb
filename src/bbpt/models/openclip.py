"""The open_clip backend (and the embedded ``mini``, an open_clip ``CLIP``): library internals
resolved here, once, from public attributes."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import BadInput, CorruptCheckpoint, MissingWeights, UnknownName
from .backbone import (CLIP_MEAN, CLIP_STD, RANDOM_TAGS, WEIGHTS_DIR, Backbone, TextEncoder, embedded_config,
                       first_line, load_weights, normalized, quiet_root_log)
from .fastvit import FastViT, fast_tower

TOWERS = ("fast", "reference")


class OpenClipText(TextEncoder):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` text tower from token embeddings: positions,
    transformer under its causal mask, final norm, pooling at EOT (argmax or eos id),
    projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        src = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if src is None or not hasattr(src, "token_embedding") or not hasattr(src, "ln_final"):
            raise BadInput(f"{type(model).__name__}: only CLIP-style open_clip text towers (token embedding + "
                           "transformer) can take soft prompts; for Hugging Face models use --model hf:ID")
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
        if self.pool_type not in ("argmax", "eos"):
            raise BadInput(f"text pooling {self.pool_type!r} is not supported (need argmax or eos)")
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.token_embedding.embedding_dim)
        self.causal = self.attn_mask is not None
        self.pad_id = 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def encode(self, x: torch.Tensor, ids: torch.Tensor, cut: bool = True) -> torch.Tensor:
        if cut:
            L = self.real_length(ids)
            x, ids = x[:, :L], ids[:, :L]
        L = x.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = x.to(cast) + self.positional_embedding[:L].to(cast)
        mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.transformer(x, attn_mask=mask)  # (N, L, D)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(ids)]  # (N, D)
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x


class OpenClipBackbone(Backbone):
    def __init__(self, name: str, pretrained: str, model: nn.Module, tokenizer, image_size: int, mean: tuple,
                 std: tuple, device: torch.device):
        self.name, self.pretrained, self.model, self.tokenizer = name, pretrained, model, tokenizer
        self.image_size, self.mean, self.std, self.device = image_size, mean, std, device
        self.text = OpenClipText(model)
        v = model.visual  # a ViT whose tokens bbpt can extend: 'tok' or 'avg' pooling, no attention pool
        self.vit = v if (all(hasattr(v, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                                     "ln_post", "transformer", "proj"))
                         and getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", "tok") in ("tok", "avg")) else None
        self._finish()
        self._fast: tuple[tuple, FastViT | None] = ((), None)  # (the weights' stamp, the fast forward)
        self.image_tower = os.environ.get("BBPT_IMAGE_TOWER", "fast")

    # ---- which image-tower forward ----------------------------------------------------------------
    @property
    def image_tower(self) -> str:
        """``fast`` (:mod:`bbpt.models.fastvit`, on CPU, where it covers the tower) or
        ``reference`` (the library's own forward). Default: ``$BBPT_IMAGE_TOWER`` or fast."""
        return self._tower

    @image_tower.setter
    def image_tower(self, value: str) -> None:
        if value not in TOWERS:
            raise BadInput(f"image tower {value!r} is not one of {', '.join(TOWERS)} (BBPT_IMAGE_TOWER)")
        self._tower = value

    def fast_vit(self) -> FastViT | None:
        """The fast forward in use, None for the library's: rebuilt whenever the tower's weights
        changed (moved, loaded, trained), so it never runs on stale folded weights."""
        if self._tower != "fast" or self.vit is None or self.device.type != "cpu":
            return None
        stamp = tuple((p.data_ptr(), p._version) for p in self.vit.parameters())
        if stamp != self._fast[0]:
            self._fast = (stamp, fast_tower(self.vit, self.image_size, self.mean, self.std))
        return self._fast[1]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def count_tokens(self, text: str) -> int | None:
        enc = getattr(self.tokenizer, "encode", None)
        return None if enc is None else len(enc(text))

    def library_text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(texts)).float()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        fast = self.fast_vit()
        if fast is not None:
            return normalized(fast.encode_images(self.check_pixels(pixels)))
        return normalized(self.model.encode_image(self.normalize(pixels)))

    @property
    def visual_width(self) -> int | None:
        return None if self.vit is None else int(self.vit.conv1.out_channels)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        v, fast = self._vit(), self.fast_vit()
        if fast is not None:
            return fast.patch_tokens(self.check_pixels(pixels))
        x = v.conv1(self.normalize(pixels).to(v.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, G, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)

    def encode_tokens(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prompt tokens go after the patches, without positional embedding, before
        ln_pre (as BPT-VLM); pooled as the tower pools (CLS or mean of the rest, ln_post)."""
        v, fast = self._vit(), self.fast_vit()
        if fast is not None:
            return normalized(fast.encode_tokens(x, prompt))
        if prompt is not None:
            x = torch.cat([x, prompt.to(x.dtype)], dim=1)  # (N, 1 + G + n, W)
        x = v.transformer(v.ln_pre(x))
        pool = (lambda t: t[:, 0]) if getattr(v, "pool_type", "tok") == "tok" else (lambda t: t[:, 1:].mean(dim=1))
        pooled = v.ln_post(pool(x)) if getattr(v, "final_ln_after_pool", False) else pool(v.ln_post(x))
        if v.proj is not None:
            pooled = pooled @ v.proj
        return normalized(pooled)

    def _vit(self) -> nn.Module:
        if self.vit is None:
            raise self._no_visual_tokens()
        return self.vit


def create_embedded(name: str, pretrained: str | None, dev: torch.device) -> OpenClipBackbone:
    import open_clip

    cfg = embedded_config(name)
    model = open_clip.model.CLIP(**cfg)
    if pretrained is None or pretrained.lower() not in RANDOM_TAGS:
        path = Path(pretrained).expanduser() if pretrained else WEIGHTS_DIR / f"{name}.safetensors"
        load_weights(model, path, name)
    return OpenClipBackbone(name, pretrained or "bbpt", model, open_clip.get_tokenizer("ViT-B-32"),  # CLIP's BPE
                            int(cfg["vision_cfg"]["image_size"]), CLIP_MEAN, CLIP_STD, dev)


def create_open_clip(name: str, pretrained: str | None, dev: torch.device) -> OpenClipBackbone:
    import open_clip

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
        with quiet_root_log():  # open_clip logs a failed download as an ERROR line; bbpt says it in one
            model = open_clip.create_model(name, pretrained=tag, device=dev)
    except RuntimeError as e:
        if tag is not None and not Path(tag).exists() and "download" in str(e).lower():
            raise MissingWeights(
                f"weights for {name} tag {pretrained!r} are not available offline; download the "
                "checkpoint elsewhere and pass --pretrained /path/to/open_clip_pytorch_model.bin "
                "(or place it in the Hugging Face cache)"
            ) from None
        if tag is not None and Path(tag).exists():
            raise CorruptCheckpoint(f"checkpoint {tag} does not load into {name}: {first_line(e)}") from None
        raise
    except Exception as e:  # unpickling / safetensors header errors on a bad local file
        if tag is not None and Path(tag).exists():
            raise CorruptCheckpoint(f"checkpoint {tag} is not a readable {name} checkpoint: {first_line(e)}") from None
        raise
    cfg = open_clip.get_pretrained_cfg(name, pretrained) if tag and not Path(tag).exists() else {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClipBackbone(name, pretrained, model, open_clip.get_tokenizer(name), int(size),
                            tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)), dev)
