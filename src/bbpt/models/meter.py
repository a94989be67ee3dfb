"""The query meter: every black-box query is charged here *before* it is computed.

Units (the papers count queries in two ways; we count both, plus the images behind them):

- ``api_calls``: one candidate prompt on one image batch of at most ``max_images_per_call``
  images (ZIP's unit, batch 128). A query of P candidates on B images costs
  ``P * ceil(B / max_images_per_call)``.
- ``prompt_evals``: one candidate prompt scored on the images sent with it, whatever their
  number (CraFT / SharpZO / BBT's unit when the images are the whole few-shot set): ``P``.
- ``images_forwarded``: image-prompt pairs scored, ``P * B`` (what an API bills per image).

An embedding request (a box that returns embeddings) of T texts and I images costs
``ceil(T / max_images_per_call) + ceil(I / max_images_per_call)`` api_calls, T prompt_evals
(each text is a prompt the API ran) and I images_forwarded (:meth:`QueryMeter.embed_cost`).
What the API itself bills (``requests``, ``tokens``, ...) is counted beside, as
``billed_<unit>`` (:meth:`QueryMeter.record_billed`), when it differs from bbpt's units.

A budget is a hard stop on any of the first two units: a query that would go past it is
refused whole with :class:`BudgetExhausted`, carrying the counts. Several queries answered
together (:func:`charge_all`, a server's batch) are charged all or nothing: if the whole
batch does not fit, none of it is charged. ``images_encoded`` is a
diagnostic (images the image tower actually ran on, after caching), not a budget unit.
"""
from __future__ import annotations

import math
import threading
from contextlib import ExitStack
from typing import Literal, get_args

from ..errors import BadInput, BudgetExhausted

# The one definition of the units (see above); everything else imports these.
BudgetUnit = Literal["api_calls", "prompt_evals"]  # a budget's unit (a method's ``budget_unit``)
BUDGET_UNITS: tuple[str, ...] = get_args(BudgetUnit)  # ("api_calls", "prompt_evals")
UNITS: tuple[str, ...] = (*BUDGET_UNITS, "images_forwarded")  # every counted unit


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
        self._billed: dict[str, int] = {}  # the API's own units, where they differ from UNITS
        self._lock = threading.Lock()

    def _over(self, c: dict) -> bool:
        """Whether adding ``c`` would pass the budget (the caller holds the lock)."""
        return any(lim is not None and self._counts[u] + c[u] > lim for u, lim in self.budget.items())

    def cost(self, num_prompts: int, num_images: int) -> dict:
        """What a query of ``num_prompts`` candidates on ``num_images`` images costs."""
        calls = math.ceil(num_images / self.max_images_per_call) if num_images else 0
        return {
            "api_calls": num_prompts * calls,
            "prompt_evals": num_prompts if num_images else 0,
            "images_forwarded": num_prompts * num_images,
        }

    def embed_cost(self, num_texts: int, num_images: int) -> dict:
        """What an embedding request of ``num_texts`` texts and ``num_images`` images costs."""
        per = self.max_images_per_call
        return {"api_calls": math.ceil(num_texts / per) + math.ceil(num_images / per),
                "prompt_evals": num_texts, "images_forwarded": num_images}

    def charge_cost(self, c: dict) -> dict:
        """Count a query of cost ``c`` (a dict over :data:`UNITS`), or raise BudgetExhausted
        without counting anything."""
        with self._lock:
            if self._over(c):
                raise BudgetExhausted(self._counts, self.budget, c)
            for u in UNITS:
                self._counts[u] += c[u]
        return c

    def check_cost(self, c: dict) -> dict:
        """BudgetExhausted if a query of cost ``c`` would pass the budget; counts nothing."""
        with self._lock:
            if self._over(c):
                raise BudgetExhausted(self._counts, self.budget, c)
        return c

    def record_billed(self, unit: str, n: int) -> None:
        """Count ``n`` of the API's own billing unit (``requests``, ``tokens``, ...), beside
        bbpt's units (never a budget unit)."""
        with self._lock:
            self._billed[unit] = self._billed.get(unit, 0) + int(n)

    def check(self, num_prompts: int, num_images: int) -> dict:
        """Raise :class:`BudgetExhausted` if the query would pass the budget; count nothing
        (a remote client checks before it sends and charges once the server answered)."""
        return self.check_cost(self.cost(num_prompts, num_images))

    def charge(self, num_prompts: int, num_images: int) -> dict:
        """Count a query, or raise :class:`BudgetExhausted` without counting anything."""
        return self.charge_cost(self.cost(num_prompts, num_images))

    def record_encoded(self, n: int) -> None:
        with self._lock:
            self.images_encoded += n

    @property
    def counts(self) -> dict:
        """bbpt's units, then ``billed_<unit>`` for each API unit counted (if any)."""
        with self._lock:
            return {**self._counts, **{f"billed_{u}": n for u, n in sorted(self._billed.items())}}

    def remaining(self, unit: str = "api_calls") -> int | None:
        """Units left before the hard stop (None: no budget in that unit)."""
        lim = self.budget.get(unit)
        return None if lim is None else lim - self.counts[unit]

    def state_dict(self) -> dict:
        with self._lock:
            return {"counts": dict(self._counts), "images_encoded": self.images_encoded, "budget": dict(self.budget),
                    **({"billed": dict(self._billed)} if self._billed else {})}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._counts = {u: int(state["counts"][u]) for u in UNITS}
            self.images_encoded = int(state.get("images_encoded", 0))
            self._billed = {str(u): int(n) for u, n in state.get("billed", {}).items()}

    def __repr__(self) -> str:
        return f"QueryMeter(counts={self.counts}, budget={self.budget})"


def _totals(queries: list[tuple[QueryMeter, int, int]]) -> tuple[list[dict], dict[int, tuple[QueryMeter, dict]]]:
    """Each query's cost, and the summed cost per meter (by identity)."""
    costs = [m.cost(P, B) for m, P, B in queries]
    per: dict[int, tuple[QueryMeter, dict]] = {}
    for (m, _, _), c in zip(queries, costs):
        total = per.setdefault(id(m), (m, dict.fromkeys(UNITS, 0)))[1]
        for u in UNITS:
            total[u] += c[u]
    return costs, per


def _refuse_any(per: dict[int, tuple[QueryMeter, dict]]) -> None:
    for m, total in per.values():
        if m._over(total):
            raise BudgetExhausted(m._counts, m.budget, total)


def check_all(queries: list[tuple[QueryMeter, int, int]]) -> list[dict]:
    """:meth:`QueryMeter.check` of several queries (meter, P, B) together: BudgetExhausted if
    any meter's share of them would pass its budget; counts nothing."""
    costs, per = _totals(queries)
    with ExitStack() as locks:
        for k in sorted(per):
            locks.enter_context(per[k][0]._lock)
        _refuse_any(per)
    return costs


def charge_all(queries: list[tuple[QueryMeter, int, int]]) -> list[dict]:
    """Charge several queries (meter, P, B) all or nothing: if any meter's share of them would
    pass its budget, BudgetExhausted (that meter's counts and its share's summed cost) and
    nothing is counted on any meter. Returns each query's cost. One query is exactly
    :meth:`QueryMeter.charge`."""
    if len(queries) == 1:
        m, P, B = queries[0]
        return [m.charge(P, B)]
    costs, per = _totals(queries)
    with ExitStack() as locks:
        for k in sorted(per):  # one global order: two batches never wait on each other
            locks.enter_context(per[k][0]._lock)
        _refuse_any(per)
        for m, total in per.values():
            for u in UNITS:
                m._counts[u] += total[u]
    return costs
