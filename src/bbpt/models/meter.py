"""The query meter: every black-box query is charged here *before* it is computed.

Units (the papers count queries in two ways; we count both, plus the images behind them):

- ``api_calls``: one candidate prompt on one image batch of at most ``max_images_per_call``
  images (ZIP's unit, batch 128). A query of P candidates on B images costs
  ``P * ceil(B / max_images_per_call)``.
- ``prompt_evals``: one candidate prompt scored on the images sent with it, whatever their
  number (CraFT / SharpZO / BBT's unit when the images are the whole few-shot set): ``P``.
- ``images_forwarded``: image-prompt pairs scored, ``P * B`` (what an API bills per image).

A budget is a hard stop on any of the first two units: a query that would go past it is
refused whole with :class:`BudgetExhausted`, carrying the counts. ``images_encoded`` is a
diagnostic (images the image tower actually ran on, after caching), not a budget unit.
"""
from __future__ import annotations

import math
import threading

from ..errors import BadInput, BudgetExhausted

UNITS = ("api_calls", "prompt_evals", "images_forwarded")
BUDGET_UNITS = ("api_calls", "prompt_evals")


class QueryMeter:
    """Counts queries in :data:`UNITS` and enforces the budget; ``max_images_per_call`` is the
    API's images-per-call limit (also public on the box as ``BlackBox.max_images_per_call``)."""

    def __init__(self, budget: dict | None = None, max_images_per_call: int = 128):
        budget = dict(budget or {})
        for unit, lim in budget.items():
            if unit not in BUDGET_UNITS:
                raise BadInput(f"budget unit {unit!r} is not one of {', '.join(BUDGET_UNITS)}")
            if lim is not None and (not isinstance(lim, int) or lim < 0):
                raise BadInput(f"budget {unit}={lim!r} must be a non-negative integer")
        if isinstance(max_images_per_call, bool) or not hasattr(max_images_per_call, "__index__") or max_images_per_call < 1:
            raise BadInput(f"max_images_per_call must be an integer >= 1, got {max_images_per_call!r}")
        max_images_per_call = int(max_images_per_call)
        self.budget = {u: budget.get(u) for u in BUDGET_UNITS}
        self.max_images_per_call = max_images_per_call
        self._counts = {u: 0 for u in UNITS}
        self.images_encoded = 0
        self._lock = threading.Lock()

    def cost(self, num_prompts: int, num_images: int) -> dict:
        """What a query of ``num_prompts`` candidates on ``num_images`` images costs."""
        calls = math.ceil(num_images / self.max_images_per_call) if num_images else 0
        return {
            "api_calls": num_prompts * calls,
            "prompt_evals": num_prompts if num_images else 0,
            "images_forwarded": num_prompts * num_images,
        }

    def check(self, num_prompts: int, num_images: int) -> dict:
        """Raise :class:`BudgetExhausted` if the query would pass the budget; count nothing
        (a remote client checks before it sends and charges once the server answered)."""
        c = self.cost(num_prompts, num_images)
        with self._lock:
            for unit, lim in self.budget.items():
                if lim is not None and self._counts[unit] + c[unit] > lim:
                    raise BudgetExhausted(self._counts, self.budget, c)
        return c

    def charge(self, num_prompts: int, num_images: int) -> dict:
        """Count a query, or raise :class:`BudgetExhausted` without counting anything."""
        c = self.cost(num_prompts, num_images)
        with self._lock:
            for unit, lim in self.budget.items():
                if lim is not None and self._counts[unit] + c[unit] > lim:
                    raise BudgetExhausted(self._counts, self.budget, c)
            for unit in UNITS:
                self._counts[unit] += c[unit]
        return c

    def record_encoded(self, n: int) -> None:
        with self._lock:
            self.images_encoded += n

    @property
    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def remaining(self, unit: str = "api_calls") -> int | None:
        """Units left before the hard stop (None: no budget in that unit)."""
        lim = self.budget.get(unit)
        return None if lim is None else lim - self.counts[unit]

    def state_dict(self) -> dict:
        with self._lock:
            return {"counts": dict(self._counts), "images_encoded": self.images_encoded, "budget": dict(self.budget)}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._counts = {u: int(state["counts"][u]) for u in UNITS}
            self.images_encoded = int(state.get("images_encoded", 0))

    def __repr__(self) -> str:
        return f"QueryMeter(counts={self.counts}, budget={self.budget})"
