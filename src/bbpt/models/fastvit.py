"""A faster CPU forward for open_clip ViT image towers (``mini`` and the library's ViTs).

The same operations as open_clip's forward, in the same order, so the same float32 values
(bit-equal on the machines measured; ``tests/test_image_tower.py`` holds logits within 1e-5). What
is saved is the traffic around the matmuls:

- images go through the layers at most ``block`` at a time, in equal blocks (measured by
  ``bench/image_tower.py``),
  so a block's activations stay in the core's cache whatever size of forward the black box
  asks for; open_clip runs each layer over the whole forward (2048 images: 70 MB of MLP
  activations per layer, far out of cache);
- attention is the library's own kernels (qkv without bias, then one pass that adds the
  bias, scales q and splits the heads; batched q·kᵀ, softmax, ·v) without
  ``nn.MultiheadAttention``'s Python checks; residual adds and GELU run in place.

Reordering more (SDPA's blocked softmax, residual adds fused into the matmuls, the input
normalisation folded into the patch embedding) is faster still but moves mini's logits by
up to 2e-5, over the 1e-5 kept here, so it is not done. :func:`fast_tower` returns None for
a tower this forward does not cover (attention pooling, custom blocks, other activations or
norms); the backbone then keeps the library's forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import equal_blocks

BLOCK = 128  # images per pass through the layers (bench/image_tower.py; see the README)


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch._C._nn.gelu_(x)


def _quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    return x.mul_(torch.sigmoid(1.702 * x))


def _activation(act: nn.Module):
    if type(act) is nn.GELU and act.approximate == "none":
        return _gelu_
    if type(act).__name__ == "QuickGELU":
        return _quick_gelu_
    raise ValueError(f"activation {type(act).__name__}")


def _scale(ls: nn.Module) -> torch.Tensor | None:
    """LayerScale's gamma (None: identity)."""
    if isinstance(ls, nn.Identity):
        return None
    if type(ls).__name__ != "LayerScale":
        raise ValueError(f"layer scale {type(ls).__name__}")
    return ls.gamma.detach()


def _ln(m: nn.Module) -> tuple | None:
    """(weight, bias, eps) of a LayerNorm (None: identity)."""
    if isinstance(m, nn.Identity):
        return None
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        raise ValueError(f"norm {type(m).__name__}")
    return (None if m.weight is None else m.weight.detach(), None if m.bias is None else m.bias.detach(), m.eps)


def _norm(x: torch.Tensor, ln: tuple) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), *ln)


class Block:
    """One open_clip ``ResidualAttentionBlock``'s weights: ln_1, fused qkv, out_proj, ln_2, MLP."""

    def __init__(self, b: nn.Module):
        a = b.attn
        if (type(b).__name__ != "ResidualAttentionBlock" or type(a) is not nn.MultiheadAttention or not a.batch_first
                or not a._qkv_same_embed_dim or a.in_proj_bias is None or a.bias_k is not None or a.add_zero_attn
                or hasattr(b, "ln_1_kv") or list(b.mlp._modules) != ["c_fc", "gelu", "c_proj"]):
            raise ValueError("not a plain self-attention block")
        self.act = _activation(b.mlp.gelu)
        self.ls1, self.ls2 = _scale(b.ls_1), _scale(b.ls_2)
        self.ln1, self.ln2 = _ln(b.ln_1), _ln(b.ln_2)
        self.heads = a.num_heads
        self.wqkv, self.bqkv = a.in_proj_weight.detach(), a.in_proj_bias.detach()  # (3W, W), (3W,)
        self.wo, self.bo = a.out_proj.weight.detach(), a.out_proj.bias.detach()  # (W, W), (W,)
        self.wfc, self.bfc = b.mlp.c_fc.weight.detach(), b.mlp.c_fc.bias.detach()  # (4W, W), (4W,)
        self.wp, self.bp = b.mlp.c_proj.weight.detach(), b.mlp.c_proj.bias.detach()  # (W, 4W), (W,)

    def __call__(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """x (B·T, W), the residual stream, updated in place."""
        W, H = x.shape[1], self.heads
        qkv = torch.mm(_norm(x, self.ln1), self.wqkv.t()).view(B, T, 3 * W)
        q, k, v = torch._transform_bias_rescale_qkv(qkv, self.bqkv, H)  # (B, H, T, d) each: + bias, q / √d
        o = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # (B, H, T, d)
        a = F.linear(o.transpose(1, 2).reshape(B * T, W), self.wo, self.bo)  # (B·T, W)
        x.add_(a if self.ls1 is None else a.mul_(self.ls1))
        m = F.linear(self.act(F.linear(_norm(x, self.ln2), self.wfc, self.bfc)), self.wp, self.bp)  # (B·T, W)
        return x.add_(m if self.ls2 is None else m.mul_(self.ls2))


class FastViT:
    """An open_clip ``VisionTransformer``'s forward from its weights (shared, not copied).
    ``patch_tokens`` and ``encode_tokens`` split the forward where visual prompt tokens go in
    (BPT-VLM), as the backbone's own methods do."""

    def __init__(self, v: nn.Module, image_size: int, mean: tuple, std: tuple, block: int = BLOCK):
        conv = v.conv1
        if (type(conv) is not nn.Conv2d or conv.kernel_size != conv.stride or image_size % conv.stride[0]
                or getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") not in ("tok", "avg")
                or not isinstance(v.patch_dropout, nn.Identity) and v.patch_dropout.training):
            raise ValueError("not a plain ViT tower")
        self.blocks = [Block(b) for b in v.transformer.resblocks]
        self.conv, self.block = conv, block
        self.pool, self.ln_after_pool = v.pool_type, bool(getattr(v, "final_ln_after_pool", False))
        self.cls = v.class_embedding.detach()  # (W,)
        self.pos = v.positional_embedding.detach()  # (1 + G, W)
        self.ln_pre, self.ln_post = _ln(v.ln_pre), _ln(v.ln_post)
        if self.ln_post is None:
            raise ValueError("no ln_post")
        self.proj = None if v.proj is None else v.proj.detach()  # (W, E)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> [CLS, patches] + positions (B, 1 + G, W)."""
        x = self.conv(torch.sub(pixels, self.mean).div_(self.std)).flatten(2).transpose(1, 2)  # (B, G, W)
        x = torch.cat([self.cls.expand(len(x), 1, -1), x], dim=1)  # (B, 1 + G, W)
        return x.add_(self.pos)

    def per_block(self, n: int) -> int:
        """Images per pass when a forward holds ``n``: at most ``block``, in equal blocks
        (:func:`equal_blocks`: 129 images as 65 + 64, whose values are the library's, not
        128 + 1, whose 1-image pass MKL on AMD EPYC rounds differently)."""
        return equal_blocks(n, self.block)

    def encode_tokens(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (N, T, W), prompt tokens (N, n, W) appended -> (N, E) unnormalised, at most
        ``block`` at a time."""
        if prompt is not None:
            x = torch.cat([x, prompt.to(x.dtype)], dim=1)  # (N, T + n, W)
        b = self.per_block(len(x))
        return torch.cat([self._tower(x[i : i + b]) for i in range(0, len(x), b)])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> (B, E) unnormalised, at most ``block`` images at a time."""
        b = self.per_block(len(pixels))
        return torch.cat([self._tower(self.patch_tokens(pixels[i : i + b])) for i in range(0, len(pixels), b)])

    def _tower(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, W) tokens -> (B, E): ln_pre, the blocks, pooling, ln_post, projection."""
        B, T, W = x.shape
        x = _norm(x, self.ln_pre) if self.ln_pre else x.clone()  # a stream of its own: the blocks write it
        x = x.reshape(B * T, W)
        for blk in self.blocks:
            x = blk(x, B, T)
        x = x.view(B, T, W)
        if self.ln_after_pool:
            pooled = _norm(x[:, 0] if self.pool == "tok" else x[:, 1:].mean(dim=1), self.ln_post)
        elif self.pool == "tok":
            pooled = _norm(x[:, 0], self.ln_post)  # a norm per token: only the pooled one is needed
        else:
            pooled = _norm(x[:, 1:], self.ln_post).mean(dim=1)
        return pooled if self.proj is None else pooled @ self.proj


def fast_tower(v: nn.Module, image_size: int, mean: tuple, std: tuple) -> FastViT | None:
    """The fast forward of open_clip tower ``v``, or None where it does not cover the tower."""
    try:
        if v.conv1.weight.dtype != torch.float32 or v.conv1.weight.device.type != "cpu":
            return None
        return FastViT(v, image_size, mean, std)
    except (AttributeError, TypeError, ValueError):
        return None
