"""Pieces shared by the methods: losses per candidate, initial contexts, embedding statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pydantic import Field

from ..errors import BadInput
from ..models.blackbox import BlackBoxAPI


def ce_per_candidate(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits (P, B, C), labels (B,) -> mean cross-entropy per candidate (P,)."""
    P, B, C = logits.shape
    return F.cross_entropy(logits.reshape(P * B, C), y.repeat(P), reduction="none").view(P, B).mean(1)


def kl_per_candidate(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) averaged over the batch, per candidate: (P, B, C) x2 -> (P,)."""
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean(-1)


def initial_context(box: BlackBoxAPI, how: str, n_ctx: int | None, templates: list[str], seed: int) -> torch.Tensor:
    """The starting context (m, D).

    how: "template" (the words of the task's template before "{}", e.g. "a photo of a";
    left-padded with N(0, 0.02²) vectors when n_ctx is longer, cut from the left when shorter),
    "random" (N(0, 0.02²), CoOp's and the official ZIP code's init), or any phrase to embed.
    """
    g = torch.Generator().manual_seed(seed + 7919)
    D = box.ctx_dim
    if how == "random":
        if not n_ctx:
            raise BadInput("ctx_init='random' needs n_ctx >= 1")
        return torch.randn(n_ctx, D, generator=g) * 0.02
    text = templates[0].split("{}")[0].strip() if how == "template" else how
    words = box.embed_words(text) if text else torch.zeros(0, D)
    m = n_ctx or len(words)
    if m < 1:
        raise BadInput(f"the template {templates[0]!r} has no words before '{{}}'; set n_ctx or ctx_init")
    if len(words) >= m:
        return words[len(words) - m :].clone()
    return torch.cat([torch.randn(m - len(words), D, generator=g) * 0.02, words])


def embedding_std(box: BlackBoxAPI, words: list[str]) -> float:
    """Std of word embeddings the client received through ``embed_words`` (BBT's statistic,
    estimated client-side, without reading the model's weights)."""
    return float(torch.cat([box.embed_words(w) for w in words if w.strip()]).std())


def focal_per_candidate(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss mean_b (1 - p_t)^γ · (-log p_t) per candidate: (P, B, C), (B,) -> (P,)."""
    logp = F.log_softmax(logits, -1).gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)  # (P, B)
    return ((1 - logp.exp()) ** gamma * -logp).mean(1)


STEP_SIZE_SOURCE = ("official: CSA, pycma's step-size rule before 4.5, which every release ran (CraFT, BBT and "
                    "BPT-VLM predate 4.5; SharpZO pins cma==4.0.0); tests/parity/optim_cmaes.json")


def step_size_field():
    """The CMA-ES methods' ``step_size`` option (see :class:`bbpt.optim.CMAES`)."""
    return Field("csa", description="CMA-ES step-size rule: 'csa' (the releases' pycma) or 'pycma' (pycma 4.5's "
                                    "own choice: TPA at d >= 300)")
