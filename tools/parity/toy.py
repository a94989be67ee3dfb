"""A toy CLIP that both sides of a parity fixture run: the official statements (through stubs
for their ``clip_model``, text encoder and image features) and bbpt (as a backbone behind the
real :class:`bbpt.models.BlackBox`, see ``tests/parity_model.py``).

It is small, seeded and nonlinear, so that a trajectory depends on every statement under test
(what a method sends and how it uses the scores), and identical on both sides by construction:
its weights are stored in the fixture and this one file computes with them.

- vocabulary: ``<pad> <sos> X a photo of . <class names> <eot>``; a text is split on spaces,
  a final "." is its own token; ``<eot>`` has the largest id (CLIP's argmax rule finds it);
- text features (unnormalised): sum over positions j <= eot of tanh(x_j W1[j]) W2,
  x the word embeddings (N, L, D), W1 (L, D, H), W2 (H, E);
- image features: normalise(flatten(pixels) Wimg), unit length already, so a statement that
  forgets to normalise (CraFT's head epoch, ``main_craft.py`` 212-214) computes what one
  that normalises does;
- logits: 100 · f_img · f_txt / |f_txt|, CLIP's scale.

Pure numpy / torch; no bbpt import.
"""
from __future__ import annotations

import numpy as np
import torch

SPECIALS = ["<pad>", "<sos>", "X", "a", "photo", "of", "."]
LOGIT_SCALE = 100.0


def generate(seed: int, classnames: list[str], n_images: int, *, dim: int = 16, embed: int = 16, hidden: int = 32,
             context: int = 16, size: int = 4) -> dict[str, np.ndarray]:
    """The toy model's weights and a labelled image set (float32 / uint8 arrays), from ``seed``."""
    rng = np.random.default_rng(seed)
    V = len(SPECIALS) + len(classnames) + 1
    f32 = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    labels = np.arange(n_images) % len(classnames)
    return {
        "token_embedding": f32(V, dim, scale=0.5),
        "w1": f32(context, dim, hidden, scale=1 / np.sqrt(dim)),
        "w2": f32(hidden, embed, scale=1 / np.sqrt(hidden)),
        "w_img": f32(3 * size * size, embed, scale=1 / np.sqrt(3 * size * size)),
        "pixels": rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8),  # (N, S, S, 3) as ImageSet
        "labels": rng.permutation(labels).astype(np.int64),
    }


class ToyCLIP:
    def __init__(self, arrays: dict, classnames: list[str]):
        self.classnames = list(classnames)
        self.vocab = SPECIALS + [c.replace("_", " ") for c in classnames] + ["<eot>"]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        t = lambda k: torch.as_tensor(np.asarray(arrays[k]))  # noqa: E731
        self.E, self.W1, self.W2, self.Wimg = t("token_embedding").float(), t("w1").float(), t("w2").float(), t("w_img").float()
        self.context_length, self.width = self.W1.shape[0], self.E.shape[1]
        self.image_size = int(round((self.Wimg.shape[0] / 3) ** 0.5))
        self.eot = len(self.vocab) - 1

    # ---- text
    def words(self, text: str) -> list[str]:
        text = text.strip()
        tail = ["."] if text.endswith(".") else []
        body = text[:-1] if tail else text
        out, rest = [], body.split()
        i = 0
        while i < len(rest):  # class names of several words are one token
            for c in sorted((c for c in self.vocab if " " in c), key=len, reverse=True):
                n = len(c.split())
                if " ".join(rest[i : i + n]) == c:
                    out.append(c)
                    i += n
                    break
            else:
                out.append(rest[i])
                i += 1
        return out + tail

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N, L) ids: <sos> words <eot> <pad>...; unknown words and overlong texts raise."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for n, text in enumerate(texts):
            ws = self.words(text)
            if len(ws) + 2 > self.context_length:
                raise ValueError(f"toy text {text!r} is longer than {self.context_length - 2} tokens")
            row = [self.ids["<sos>"]] + [self.ids[w] for w in ws] + [self.eot]
            out[n, : len(row)] = torch.tensor(row)
        return out

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.E[ids]

    def encode_text(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (N, L', D) + ids (N, L') -> (N, E) unnormalised; L' <= L."""
        L = x.shape[1]
        eot = ids.argmax(-1)  # (N,)
        h = torch.tanh(torch.einsum("nld,ldh->nlh", x.float(), self.W1[:L]))  # (N, L', H)
        keep = (torch.arange(L)[None] <= eot[:, None]).float()  # positions up to <eot>
        return (h * keep[..., None]).sum(1) @ self.W2

    # ---- images
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, E), unit length."""
        return torch.nn.functional.normalize(pixels.float().flatten(1) @ self.Wimg, dim=-1)

    def pixels(self, arrays: dict, idx=None) -> torch.Tensor:
        """The stored images as (N, 3, S, S) floats in [0, 1], as bbpt's ImageSet gives them."""
        a = np.asarray(arrays["pixels"])
        a = a if idx is None else a[np.asarray(idx)]
        return torch.from_numpy(np.ascontiguousarray(a)).float().div(255.0).permute(0, 3, 1, 2).contiguous()


# ---- a toy ViT image tower, for visual prompt tokens (BPT-VLM) -----------------------------------
# Added after the rest so that the text tower, ``encode_image`` and every stored array above are
# unchanged: a model whose arrays lack the ``vit_*`` keys has no visual tokens.
#
# - patch tokens: x = [CLS, conv(pixels)] + positions, (B, 1 + G, W), conv a patch-sized stride;
# - prompt tokens (n, W) are appended after them, without positions (the caller does that);
# - features: normalise(sum_t a_t tanh(x_t Wv) Wproj), with attention a = softmax over tokens
#   of tanh(x_0 Wq) . tanh(x_t Wk) / sqrt(W) - log(1 + t): nonlinear, and the position prior
#   -log(1 + t) makes where a token sits matter (so do the count and scale of prompt tokens).

def generate_vit(seed: int, arrays: dict, *, width: int = 8, patch: int = 2) -> dict[str, np.ndarray]:
    """A toy ViT's weights (float32) for the model ``arrays`` (its image size and feature width)."""
    rng = np.random.default_rng(seed)
    size = int(np.asarray(arrays["pixels"]).shape[1])
    embed = int(np.asarray(arrays["w2"]).shape[1])
    if size % patch:
        raise ValueError(f"toy image size {size} is not a multiple of the patch {patch}")
    grid = (size // patch) ** 2
    f32 = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    return {
        "vit_conv1": f32(width, 3, patch, patch, scale=1 / np.sqrt(3 * patch * patch)),  # (W, 3, p, p)
        "vit_class": f32(width, scale=0.5),
        "vit_positions": f32(1 + grid, width, scale=0.5),
        "vit_q": f32(width, width, scale=1 / np.sqrt(width)),
        "vit_k": f32(width, width, scale=1 / np.sqrt(width)),
        "vit_v": f32(width, width, scale=1 / np.sqrt(width)),
        "vit_proj": f32(width, embed, scale=1 / np.sqrt(width)),
    }


class ToyViT:
    """The toy image tower with visual prompt tokens (weights from :func:`generate_vit`)."""

    def __init__(self, arrays: dict):
        t = lambda k: torch.as_tensor(np.asarray(arrays[k])).float()  # noqa: E731
        self.conv1, self.cls, self.positions = t("vit_conv1"), t("vit_class"), t("vit_positions")
        self.Wq, self.Wk, self.Wv, self.proj = t("vit_q"), t("vit_k"), t("vit_v"), t("vit_proj")
        self.width, self.patch = self.conv1.shape[0], self.conv1.shape[-1]

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model input (B, 3, S, S) -> [CLS, patches] + positions, (B, 1 + G, W)."""
        x = torch.nn.functional.conv2d(pixels.float(), self.conv1, stride=self.patch)  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, G, W)
        return torch.cat([self.cls.expand(len(x), 1, -1), x], dim=1) + self.positions

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, W) -> pooled (N, W), before the projection."""
        T = x.shape[1]
        s = (torch.tanh(x[:, :1] @ self.Wq) * torch.tanh(x @ self.Wk)).sum(-1) / self.width**0.5  # (N, T)
        a = torch.softmax(s - torch.log1p(torch.arange(T, dtype=x.dtype)), dim=-1)
        return (a[..., None] * torch.tanh(x @ self.Wv)).sum(1)

    def encode_tokens(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (N, 1 + G, W), prompt tokens (N, n, W) appended -> (N, E), unit length."""
        if prompt is not None:
            x = torch.cat([x, prompt.to(x.dtype)], dim=1)
        return torch.nn.functional.normalize(self.pool(x.float()) @ self.proj, dim=-1)


# ---- large images and a stub pretrained encoder (BlackVIP: its official decoder writes 224 px) -----
# Added after the rest; nothing above changes. The toy's image features read pixels through
# ``w_img`` at its own small size, so a larger image is first averaged over blocks down to it.

def encode_image_pooled(toy: ToyCLIP, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S), S a multiple of the toy's size k -> mean over (S/k)² blocks -> encode_image."""
    return toy.encode_image(torch.nn.functional.avg_pool2d(x.float(), x.shape[-1] // toy.image_size))


def stub_encoder(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A frozen pretrained encoder's features (BlackVIP's MAE CLS token) as a stub:
    (B, 3, S, S) model input -> tanh(2×2 block means (B, 12) @ w (12, Z)), (B, Z)."""
    return torch.tanh(torch.nn.functional.avg_pool2d(x.float(), x.shape[-1] // 2).flatten(1) @ w)
