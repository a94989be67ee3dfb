"""What a black box accepts and returns, what a method needs, and whether they fit.

A box declares :class:`Capabilities`; a method declares :class:`Needs` (``Method.needs``).
The engine calls :func:`check_fit` before any query, so a method the box cannot serve is
refused in one line naming what is missing and the methods that do fit, not at its first
query. Plain strings, no torch: ``bbpt methods --box`` imports this alone.

| accepts          | what a query may send                                                  |
|------------------|------------------------------------------------------------------------|
| ``templates``    | hard text prompts: a template with ``{}`` where the class name goes      |
| ``soft_context`` | soft prompt vectors in the text tower's embedding space                  |
| ``visual_tokens``| prompt tokens appended to the image tower's tokens (ViTs)                |
| ``pixels``       | images as pixels (prompted images included)                              |
| ``uploaded_ids`` | images uploaded once, then sent by id                                    |
| ``model``        | the model itself (white-box: only the in-process box)                    |

| returns          | what a query gives back                                                  |
|------------------|--------------------------------------------------------------------------|
| ``logits``       | unnormalised class scores                                                |
| ``probabilities``| softmax class scores (methods get their logarithms: the same cross-entropy)|
| ``topk``         | the k best labels with scores                                            |
| ``embeddings``   | a vector per text or image                                               |

Billing units (what the API charges for): ``api_calls``, ``requests``, ``images``, ``tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ACCEPTS = ("templates", "soft_context", "visual_tokens", "pixels", "uploaded_ids", "model")
RETURNS = ("logits", "probabilities", "topk", "embeddings")
BILLING = ("api_calls", "requests", "images", "tokens")
SCORES = frozenset({"logits", "probabilities"})  # what a cross-entropy on class scores can use

_WHY = {  # what each missing capability means, for the refusal
    "templates": "text prompts",
    "soft_context": "soft prompts",
    "visual_tokens": "visual prompt tokens",
    "pixels": "images as pixels",
    "uploaded_ids": "uploaded image ids",
    "model": "the model itself (white-box)",
}


def _check(values, allowed: tuple, what: str) -> frozenset:
    out = frozenset(values)
    bad = sorted(out - set(allowed))
    if bad:
        raise ValueError(f"unknown {what} {bad}; known: {', '.join(allowed)}")
    return out


@dataclass(frozen=True)
class Capabilities:
    """What a box accepts (all of them), returns (all of them) and bills in."""

    accepts: frozenset
    returns: frozenset
    billing: str = "api_calls"
    note: str = ""  # e.g. how probabilities or logits are derived

    def __post_init__(self):
        object.__setattr__(self, "accepts", _check(self.accepts, ACCEPTS, "input kind"))
        object.__setattr__(self, "returns", _check(self.returns, RETURNS, "output kind"))
        if self.billing not in BILLING:
            raise ValueError(f"unknown billing unit {self.billing!r}; known: {', '.join(BILLING)}")

    def describe(self) -> str:
        return (f"accepts {', '.join(sorted(self.accepts)) or 'nothing'}; returns {', '.join(sorted(self.returns))}; "
                f"bills {self.billing}")


@dataclass(frozen=True)
class Needs:
    """What a method needs: every kind in ``accepts``, and one of ``returns``."""

    accepts: frozenset = field(default_factory=frozenset)
    returns: frozenset = SCORES

    def __post_init__(self):
        object.__setattr__(self, "accepts", _check(self.accepts, ACCEPTS, "input kind"))
        object.__setattr__(self, "returns", _check(self.returns, RETURNS, "output kind"))

    def missing(self, caps: Capabilities) -> list[str]:
        """What ``caps`` lacks for these needs, as phrases ([] when they fit)."""
        out = [f"{k} ({_WHY[k]})" for k in sorted(self.accepts - caps.accepts)]
        if not self.returns & caps.returns:
            out.append(f"{' or '.join(sorted(self.returns))} out (it returns {', '.join(sorted(caps.returns))})")
        return out

    def describe(self) -> str:
        return f"sends {', '.join(sorted(self.accepts)) or 'nothing'}; reads {' or '.join(sorted(self.returns))}"


def fitting(methods: dict[str, Needs], caps: Capabilities) -> list[str]:
    """Names of the methods whose needs ``caps`` meets."""
    return sorted(name for name, needs in methods.items() if not needs.missing(caps))


def refusal(method: str, needs: Needs, caps: Capabilities, box: str, others: dict[str, Needs]) -> str | None:
    """The one-line refusal of ``method`` on ``box``, or None when it fits."""
    missing = needs.missing(caps)
    if not missing:
        return None
    fit = fitting(others, caps)
    return (f"method {method} cannot run on {box}: the box lacks {'; '.join(missing)}; methods that fit it: "
            f"{', '.join(fit) or 'none'} (`bbpt methods --box {box}`)")
