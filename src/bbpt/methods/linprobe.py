"""Linear probe on returned image embeddings (CLIP, Radford et al. 2021; CoOp's protocol).

The reference row of the embedding methods: multinomial logistic regression with an L2
penalty on the few-shot image embeddings, as CoOp's ``lpclip/linear_probe.py`` runs
scikit-learn's ``LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=c)``:

    min_{W, b}  (1/N) Σ_i CE(W x_i + b, y_i) + ||W||² / (2 C N)      (b unpenalised)

solved here in float64 by L-BFGS with strong-Wolfe line search (scikit-learn's objective,
its gradient tolerance 1e-4 and its 1000 iterations; no scikit-learn needed). C is chosen on
the few-shot validation split by CoOp's search: the best of 1e6, 1e4, ..., 1e-6, then 8
rounds of its bisection in log10(C) between 0.1 and 10 times that peak, keeping the side
with the higher validation accuracy (the left one on ties), as ``linear_probe.py`` 53-118.
Scores: W f + b. On classes other than the fitted ones (base-to-new, cross-dataset) a
probe cannot apply; ``apply`` then gives zero-shot scores 100 cos(f, t_c) from the
saved templates.

Deviation: CoOp probes the unnormalised image features (``feat_extractor.py`` 154); an
embedding API returns unit vectors, so those are probed. Queries: the few-shot images and
the validation images, once each; no text.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..boxes.capabilities import Needs
from .base import register_method
from .embedding import EmbeddingConfig, EMBEDDINGS_OUT, EmbeddingMethod

COOP_C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip/linear_probe.py 54
LPCLIP = "CoOp lpclip/linear_probe.py (KaiyangZhou/CoOp @ff61507)"


class LinearProbeConfig(EmbeddingConfig):
    budget: int | None = Field(None, ge=1, description="api_calls; none: no limit (the fit costs a fixed, small "
                               "number of embedding requests)")
    augment: bool = Field(False, description="embed training views instead of the test transform")
    C: float | None = Field(None, gt=0, description="inverse L2 strength; none: CoOp's search on the val split")
    search_steps: int = Field(8, ge=0, le=50, description="bisection rounds of the C search after the grid")
    max_iter: int = Field(1000, ge=1, le=100_000, description="L-BFGS iterations per fit")
    tol: float = Field(1e-4, gt=0, description="stop when the largest gradient entry is below this")

    sources = {
        "budget": "bbpt: none (the probe's cost is fixed by the data: ceil(N / 128) + ceil(N_val / 128) api_calls "
                  "in requests of encode_chunk images)",
        "augment": "official " + LPCLIP + ": features of the test transform (feat_extractor.py 131)",
        "C": "official " + LPCLIP + " 53-118: grid 1e6 ... 1e-6 on the val split, then bisection",
        "search_steps": "official " + LPCLIP + ": --num_step 8",
        "max_iter": "official " + LPCLIP + " 57: LogisticRegression(max_iter=1000)",
        "tol": "official " + LPCLIP + ": scikit-learn LogisticRegression's default tol=1e-4 (its L-BFGS gradient "
               "tolerance)",
    }


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int = 1000,
                        tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) features, (N,) labels -> W (K, E), b (K,), float64: scikit-learn's multinomial
    L2 logistic regression objective, by L-BFGS from zero."""
    x = x.double()
    N, E = x.shape
    wb = torch.zeros(num_classes, E + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([wb], lr=1, max_iter=max_iter, max_eval=max_iter * 5 // 4, tolerance_grad=tol,
                            tolerance_change=64 * float(np.finfo(float).eps), history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        W, b = wb[:, :E], wb[:, E]
        loss = F.cross_entropy(x @ W.T + b, y, reduction="sum") / N + (W * W).sum() / (2 * C * N)
        loss.backward()
        return loss

    opt.step(closure)
    wb = wb.detach()
    return wb[:, :E].clone(), wb[:, E].clone()


def correct(W, b, x, y) -> int:
    return int(((x.double() @ W.T + b).argmax(-1) == y).sum())


def coop_search(fit, score, steps: int = 8) -> tuple[float, object]:
    """CoOp's choice of C: ``fit(C) -> model``, ``score(model) -> val correct``; returns
    (C, its model). ``linear_probe.py`` 53-118, the log10 bookkeeping included."""
    accs = [score(fit(c)) for c in COOP_C_GRID]
    peak = COOP_C_GRID[int(np.argmax(accs))]
    left, right = 1e-1 * peak, 1e1 * peak
    c_final, model = peak, None
    for _ in range(steps):
        m_left, m_right = fit(left), fit(right)
        if score(m_left) < score(m_right):
            c_final, model = right, m_right
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            c_final, model = left, m_left
            right, left = 0.5 * (np.log10(right) + np.log10(left)), np.log10(left)
        left, right = float(np.power(10, left)), float(np.power(10, right))
    return float(c_final), model if model is not None else fit(peak)


@register_method
class LinearProbe(EmbeddingMethod):
    name = "linprobe"
    needs = Needs(frozenset({"pixels"}), EMBEDDINGS_OUT)
    Config = LinearProbeConfig
    uses_text = False
    uses_val = True

    def fit(self, x, y, text, val):
        x = x.reshape(-1, x.shape[-1])  # the passes' embeddings are all training samples
        y = y.repeat(len(x) // len(y))
        K, cfg = self.box.num_classes, self.cfg
        fit = lambda c: logistic_regression(x, y, K, c, cfg.max_iter, cfg.tol)  # noqa: E731
        if cfg.C is not None or val is None or not len(val[1]):
            C, (W, b) = (cfg.C or 1.0), fit(cfg.C or 1.0)
        else:
            C, (W, b) = coop_search(fit, lambda m: correct(*m, *val), cfg.search_steps)
        loss = float(F.cross_entropy(x.double() @ W.T + b, y))
        stats = {"train_loss": loss, "C": C}
        if val is not None and len(val[1]):
            stats["val_accuracy"] = correct(W, b, *val) / len(val[1])
        return {"weight": W, "bias": b, "C": torch.tensor(C, dtype=torch.float64)}, stats

    @classmethod
    def logits(cls, fit, f, text, same):
        if not same:  # a probe is for its own classes: zero-shot from the saved templates
            return 100.0 * f @ text.T
        return (f.double() @ fit["weight"].T + fit["bias"]).float()
