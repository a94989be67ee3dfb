"""What a run returns and writes as ``result.json``: :class:`RunResult`.

The fields are declared in the order ``result.json`` stores them, and a result keeps track
of which ones it holds, so ``RunResult.load(path).to_json()`` gives back the file byte for
byte (a field a run leaves out, e.g. ``test_subset`` without ``--test-subset``, stays out).
A record of a run bbpt refused (``status: failed``, with ``error``) loads too; keys a newer
bbpt adds are kept, after the known ones.

Reading a result like a dict (``r["accuracy"]["test"]``) still works for one release and
warns; use the attributes (``r.accuracy.test``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict

Number = Union[int, float]  # as stored: an int stays an int, a float a float (byte-identical round trips)


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Accuracy(_Part):
    """Test accuracy (None until the test split is evaluated) and the last curve point's
    validation accuracy, as fractions in [0, 1]."""

    test: Number | None = None
    val: Number | None = None


class CurvePoint(_Part):
    """One point of the training curve: queries spent so far, the last training loss and the
    validation accuracy there."""

    api_calls: int
    prompt_evals: int | None = None
    train_loss: Number | None = None
    val_accuracy: Number | None = None


class TestSubset(_Part):
    """The seeded, stratified part of the test split a ``--test-subset`` run was tested on."""

    __test__ = False  # not a pytest class

    n: int
    of: int
    seed: int
    comparable_to_full_test: bool


class RunResult(BaseModel):
    """One run's outcome (``bbpt.run`` returns it; ``result.json`` stores it)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    dataset: str
    model: str | None = None  # "mini" or "ViT-B-32:openai" (model:pretrained)
    shots: int
    seed: int
    status: str  # finished | interrupted | failed
    stopped_by: str | None = None  # budget | key_budget | done | max_steps
    key: dict[str, Any] | None = None  # a bbpt server key's counts, when that key's budget stopped the run
    error: str | None = None  # a refused run's one-line reason (status failed)
    steps: int | None = None
    black_box: bool | None = None
    budget: dict[str, Number | None] | None = None
    queries: dict[str, Number] | None = None  # training queries, charged to the budget
    aux_queries: dict[str, Number] | None = None  # a method's side box (not charged to the main unit)
    queries_total: dict[str, Number] | None = None
    eval_queries: dict[str, Number] | None = None  # validation and test queries, never charged
    accuracy: Accuracy | None = None
    test_subset: TestSubset | None = None
    curve: list[CurvePoint] | None = None
    wall_seconds: Number | None = None
    config: dict[str, Any] | None = None  # the run fields and the resolved method options
    base_to_new: dict[str, Any] | None = None  # added by the protocols (bbpt.protocols)
    cross_dataset: dict[str, Any] | None = None
    distribution_shift: dict[str, Any] | None = None

    # ---- reading and writing --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        return cls.model_validate(d)

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """A stored ``result.json`` (a file or the run folder holding it)."""
        p = Path(path)
        return cls.from_dict(json.loads((p / "result.json" if p.is_dir() else p).read_text()))

    def to_dict(self) -> dict:
        """The result as ``result.json`` holds it: the fields it was made with, in their order."""
        return self.model_dump(exclude_unset=True)

    def to_json(self) -> str:
        """The text of ``result.json``."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def with_fields(self, **fields) -> RunResult:
        """A copy with ``fields`` added or replaced (a protocol's evaluations)."""
        return type(self).from_dict({**self.to_dict(), **fields})

    # ---- convenience ---------------------------------------------------------------------------
    @property
    def test_accuracy(self) -> float | None:
        return None if self.accuracy is None else self.accuracy.test

    @property
    def val_accuracy(self) -> float | None:
        return None if self.accuracy is None else self.accuracy.val

    # ---- deprecated: the dict a run returned before RunResult -----------------------------------
    def _deprecated(self) -> dict:
        warnings.warn("reading a run's result as a dict (r['key']) is deprecated; use its attributes (r.key)",
                      DeprecationWarning, stacklevel=3)
        return self.to_dict()

    def __getitem__(self, key: str):
        return self._deprecated()[key]

    def __contains__(self, key: str) -> bool:
        return key in self._deprecated()

    def get(self, key: str, default=None):
        return self._deprecated().get(key, default)
