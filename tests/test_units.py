"""The budget units have one definition (bbpt.models.meter); every other user reads it."""
from __future__ import annotations

import typing

import pytest


def test_units_defined_once_and_imported():
    from bbpt import results
    from bbpt.methods.base import Method, MethodConfig
    from bbpt.models import meter
    from bbpt.serve import store

    assert meter.BUDGET_UNITS == ("api_calls", "prompt_evals")
    assert meter.UNITS == ("api_calls", "prompt_evals", "images_forwarded")
    assert store.UNITS is meter.UNITS and store.BUDGET_UNITS is meter.BUDGET_UNITS
    assert results.CURVE_FIELDS[:2] == meter.BUDGET_UNITS
    ann = MethodConfig.model_fields["budget_unit"].annotation
    assert set(typing.get_args(typing.get_args(ann)[0])) == set(meter.BUDGET_UNITS)
    assert Method.budget_unit in meter.BUDGET_UNITS


def test_budget_option_takes_exactly_the_budget_units():
    from bbpt.cli import _parse_budget
    from bbpt.errors import BadInput

    assert _parse_budget(["api_calls=5", "prompt_evals=7"]) == {"api_calls": 5, "prompt_evals": 7}
    with pytest.raises(BadInput, match="expected api_calls=N or prompt_evals=N"):
        _parse_budget(["images_forwarded=3"])
