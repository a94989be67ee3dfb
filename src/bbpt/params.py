"""Parameterisations: a flat vector z (d) -> soft-prompt context (m, D). Pure; never queries.

Each has ``dim`` (d), ``init()`` (the starting z) and ``decode(z)`` mapping an (n, d) batch of
candidates to contexts (n, m, D), so a whole generation decodes in one call.

- :class:`Direct`: z is the context itself (plain ZO-SGD, CoOp).
- :class:`RandomProjection`: ctx = ctx0 + reshape(A z), A (m·D × d) Gaussian with BBT's std
  (α · std_emb / (√d · σ)) or a fixed std (CraFT / SharpZO: 0.2 or 1). BBT, CraFT, SharpZO.
- :class:`ZIPProjection`: ZIP's θ_i = θ_0,i + M_i w_i with
  W = [w_1 .. w_m]ᵀ = U diag(s) Vᵀ + 1 uᵀ (low rank + feature sharing),
  U (m×r) = 0, s (r) = 1, V (q×r) ~ N(0, 1), u (q) = 0 at init, q = intrinsic_dim // m,
  δ = r(q + m + 1) + q; M_i a Fastfood transform (q -> D) per token, or dense Gaussian.
"""
from __future__ import annotations

import math

import torch

from .errors import BadInput


class Direct:
    def __init__(self, ctx0: torch.Tensor):
        self.ctx0 = ctx0.float()  # (m, D)
        self.dim = ctx0.numel()

    def init(self) -> torch.Tensor:
        return self.ctx0.flatten().clone()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(-1, *self.ctx0.shape)


class RandomProjection:
    """ctx = ctx0 + reshape(A z); z = 0 is the initial prompt.

    init: "normal", A ~ N(0, std²) (BBT, CraFT, SharpZO); "uniform", A ~ U(±1/√d), what
    ``nn.Linear(d, m·D)`` holds at its default init (CraFT's ImageNet script; std unused).
    """

    def __init__(self, ctx0: torch.Tensor, dim: int, std: float, seed: int, init: str = "normal"):
        if dim < 1:
            raise BadInput(f"intrinsic dimension must be >= 1, got {dim}")
        if init not in ("normal", "uniform"):
            raise BadInput(f"projection init {init!r} must be 'normal' or 'uniform'")
        self.ctx0 = ctx0.float()  # (m, D)
        self.dim = dim
        g = torch.Generator().manual_seed(seed)
        if init == "normal":
            self.A = torch.randn(ctx0.numel(), dim, generator=g) * std  # (m·D, d)
        else:
            self.A = (torch.rand(ctx0.numel(), dim, generator=g) * 2 - 1) / math.sqrt(dim)

    @staticmethod
    def bbt_std(embedding_std: float, dim: int, sigma: float, alpha: float = 1.0) -> float:
        """BBT's A std: α · std(word embeddings) / (√d · σ)."""
        return alpha * embedding_std / (math.sqrt(dim) * sigma)

    def init(self) -> torch.Tensor:
        return torch.zeros(self.dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.view(-1, self.dim)
        return self.ctx0 + (z @ self.A.T).view(-1, *self.ctx0.shape)  # (n, m, D)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of two)."""
    n = x.shape[-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(x.shape)


class Fastfood:
    """m independent Fastfood maps R^q -> R^D: F(x) = H G Π H B pad(x) / (√(LL ΣG²) · √(D/LL)).

    Approximately norm-preserving; each token has its own (B, Π, G), drawn once from ``seed``.
    """

    def __init__(self, m: int, q: int, D: int, seed: int):
        self.m, self.q, self.D = m, q, D
        self.LL = 2 ** math.ceil(math.log2(max(q, D)))
        g = torch.Generator().manual_seed(seed)
        self.B = torch.randint(0, 2, (m, self.LL), generator=g).float() * 2 - 1
        self.Pi = torch.stack([torch.randperm(self.LL, generator=g) for _ in range(m)])  # (m, LL)
        self.G = torch.randn(m, self.LL, generator=g)

    @property
    def scale(self) -> torch.Tensor:
        """(m,) 1 / (divisor · √(D/LL)), divisor = √(LL ΣG²): follows G (also when G is set)."""
        return 1.0 / (torch.sqrt(self.LL * (self.G**2).sum(-1)) * math.sqrt(self.D / self.LL))

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """(n, m, q) -> (n, m, D)."""
        n = w.shape[0]
        x = torch.zeros(n, self.m, self.LL)
        x[..., : self.q] = w
        x = fwht(x * self.B)
        x = torch.gather(x, -1, self.Pi.expand(n, -1, -1))
        x = fwht(x * self.G)
        return (x * self.scale[:, None])[..., : self.D]


class DenseGaussian:
    """m dense maps R^q -> R^D with N(0, 1/D) entries (norm-preserving on average)."""

    def __init__(self, m: int, q: int, D: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.M = torch.randn(m, D, q, generator=g) / math.sqrt(D)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mdq,nmq->nmd", self.M, w)


class ZIPProjection:
    """ZIP's low-rank, feature-shared, per-token random projection (see module docstring).

    low_rank=False: W is a free m×q matrix; feature_sharing=False: no shared u.
    """

    def __init__(self, ctx0: torch.Tensor, intrinsic_dim: int = 500, rank: int = 5, projection: str = "fastfood",
                 low_rank: bool = True, feature_sharing: bool = True, seed: int = 0):
        m, D = ctx0.shape
        self.ctx0, self.m, self.D = ctx0.float(), m, D
        self.q = intrinsic_dim // m
        if self.q < 1:
            raise BadInput(f"intrinsic_dim {intrinsic_dim} is smaller than the {m} context tokens")
        if low_rank and rank < 1:
            raise BadInput(f"rank must be >= 1, got {rank}")
        self.r, self.low_rank, self.sharing = rank, low_rank, feature_sharing
        proj = {"fastfood": Fastfood, "gaussian": DenseGaussian}.get(projection)
        if proj is None:
            raise BadInput(f"projection {projection!r} must be 'fastfood' or 'gaussian'")
        self.M = proj(m, self.q, D, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.V0 = torch.randn(self.q, rank, generator=g)  # V's N(0, 1) init
        m_, q, r = m, self.q, rank
        self.sizes = ([("U", m_ * r), ("s", r), ("V", q * r)] if low_rank else [("W", m_ * q)]) + ([("u", q)] if feature_sharing else [])
        self.dim = sum(n for _, n in self.sizes)  # δ = r(q + m + 1) + q at the defaults

    def init(self) -> torch.Tensor:
        parts = {"U": torch.zeros(self.m * self.r), "s": torch.ones(self.r), "V": self.V0.flatten(),
                 "W": torch.zeros(self.m * self.q), "u": torch.zeros(self.q)}
        return torch.cat([parts[k] for k, _ in self.sizes])

    def matrix(self, z: torch.Tensor) -> torch.Tensor:
        """(n, δ) -> W (n, m, q): row i is w_i, the input of token i's projection."""
        z = z.view(-1, self.dim)
        n, parts, i = z.shape[0], {}, 0
        for k, size in self.sizes:
            parts[k] = z[:, i : i + size]
            i += size
        if self.low_rank:
            U = parts["U"].view(n, self.m, self.r)
            V = parts["V"].view(n, self.q, self.r)
            W = torch.einsum("nmr,nr,nqr->nmq", U, parts["s"], V)
        else:
            W = parts["W"].view(n, self.m, self.q)
        if self.sharing:
            W = W + parts["u"][:, None, :]
        return W

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.ctx0 + self.M(self.matrix(z))  # (n, m, D)
