"""Conformance of the parity fixtures (tests/parity/): every registered method has one (or a
written reason in tests/parity/no_fixture.toml), every fixture names the official file, line
range and commit it ran and the command that regenerates it, and every fixture has a test."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from parity_model import all_fixtures

from bbpt._compat import tomllib
from bbpt.methods import METHODS

HERE = Path(__file__).parent
PINNED = {"LOG-postech/ZIP": "2ba908b", "mrflogs/CraFT": "1a4c251", "yifanycc/sharpzo": "13b491f",
          "changdaeoh/BlackVIP": "66606fb", "ECNU-ICALK/BPT-VLM": "15f2e25", "txsun1997/Black-Box-Tuning": "e4013f7",
          "shizhediao/Black-Box-Prompt-Learning": "3fd736a",
          "saic-fi/LFA": "2ee3bba", "gaopengcuhk/Tip-Adapter": "d0e2d6f"}
FIXTURES = all_fixtures()
REASONS = tomllib.loads((HERE / "parity" / "no_fixture.toml").read_text())


def header(path: Path) -> dict:
    return json.loads(path.read_text())


def builtin_methods() -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("bbpt.")]


@pytest.mark.parametrize("name", builtin_methods())
def test_every_registered_method_has_a_fixture_or_a_written_reason(name):
    covered = {header(p)["method"] for p in FIXTURES}
    assert name in covered or len(REASONS.get(name, "").split()) >= 10, (
        f"method {name} has no parity fixture in tests/parity/ and no reason in tests/parity/no_fixture.toml: add "
        "tools/parity/<name>.py (see tools/parity/craft.py) or write down why it cannot have one")
    assert not (name in covered and name in REASONS), f"{name} has a fixture: drop its entry in no_fixture.toml"


def test_reasons_name_registered_methods():
    assert set(REASONS) <= set(builtin_methods())


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_fixture_names_its_official_statements_and_how_to_regenerate_it(path):
    fx = header(path)
    off = fx["official"]
    assert off["repo"] in PINNED and re.fullmatch(r"[0-9a-f]{40}", off["commit"])
    assert off["commit"].startswith(PINNED[off["repo"]]), f"{path.name}: not the pinned commit of {off['repo']}"
    assert off["statements"], path.name
    for s in off["statements"]:
        a, b = s["lines"]
        assert s["file"] and 1 <= a <= b and s["what"], (path.name, s)
    assert fx["regenerate"].startswith("python tools/parity/"), fx["regenerate"]
    script = HERE.parent / fx["regenerate"].split()[1]
    assert script.exists(), f"{path.name}: {script} is gone"
    assert {"python", "torch", "numpy"} <= set(fx["environment"])
    if "trajectory" in fx:  # a fixture of steps; otherwise one of a component (BlackVIP's decoder forward)
        assert len(fx["trajectory"]) >= 3, f"{path.name}: a fixture holds at least 3 steps or generations"


@pytest.mark.parametrize("name", builtin_methods())
def test_every_fixtured_method_has_a_trajectory_of_at_least_three_steps(name):
    steps = [len(header(p).get("trajectory", [])) for p in FIXTURES if header(p)["method"] == name]
    assert not steps or max(steps) >= 3, f"{name}: no fixture of at least 3 steps or generations"


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_fixture_is_read_by_a_default_suite_test(path):
    tests = "".join(p.read_text() for p in HERE.glob("test_parity_*.py"))
    assert re.search(rf"""load\(["']{re.escape(path.stem)}["']\)""", tests), f"no test loads {path.stem}"
