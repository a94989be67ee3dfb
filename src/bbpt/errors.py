"""Errors bbpt raises for the user's mistakes.

Every error here is a one-line message that names what was wrong and how to fix it; the
CLI prints it and exits with code 2 (``--debug`` shows the traceback). Internal bugs are
left as ordinary exceptions so they are never mistaken for bad input.
"""
from __future__ import annotations

import difflib
from typing import Iterable


def excerpt(e: BaseException, n: int = 80) -> str:
    """``e``'s message on one line, at most ``n`` characters (torch's span several lines)."""
    return " ".join(str(e).split())[:n]


class BBPTError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in bbpt."""

    def __reduce__(self):  # picklable whatever the subclass's __init__ takes (a sweep's workers send them back)
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> BBPTError:
    e = Exception.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


class BadInput(BBPTError, ValueError):
    """A value, file or folder the user gave is unusable."""


class UnknownName(BadInput, KeyError):
    """A registered name (dataset, method, model, ...) that does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = ""):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}"
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
        msg += f" Known: {', '.join(known)}."
        if hint:
            msg += " " + hint
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class MissingWeights(BBPTError):
    """Pretrained weights are not available offline."""


class CorruptCheckpoint(BadInput):
    """A weights or prompt file exists but cannot be read or does not match the model."""


class WriteFailed(BBPTError):
    """A file bbpt writes (checkpoint, result) could not be written: a full disk, permissions."""


class DataNotPrepared(BBPTError):
    """An offline task's files are not in the data directory yet."""


class BudgetExhausted(BBPTError):
    """The query budget would be exceeded: a hard stop.

    ``counts`` holds the meter's counters at the moment of refusal, ``budget`` the limits
    and ``requested`` what the refused query would have cost.
    """

    def __init__(self, counts: dict, budget: dict, requested: dict):
        self.counts, self.budget, self.requested = dict(counts), dict(budget), dict(requested)
        over = [k for k, lim in budget.items() if lim is not None and counts[k] + requested[k] > lim]
        spent = ", ".join(f"{k}={v}" for k, v in counts.items())
        limits = ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None)
        need = ", ".join(f"{k}={requested[k]}" for k in over)
        super().__init__(
            f"query budget exhausted: this query needs {need} but the budget is {limits} "
            f"and {spent} are spent; raise the budget (--budget) or ask for fewer candidates"
        )

    stopped_by = "budget"  # what a run records when this ends its training; a subclass names another budget

    def details(self) -> dict:
        """Fields a run's result records beside ``stopped_by`` (none for the run's own budget)."""
        return {}
