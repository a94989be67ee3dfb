"""pyproject.toml's ranges, constraints.txt's pins and scripts/setup.sh agree."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from bbpt._compat import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements():
    yield from PROJECT["dependencies"]
    for reqs in PROJECT["optional-dependencies"].values():
        yield from reqs


def test_every_dependency_is_pinned_within_its_range():
    pins = _pins()
    checked = 0
    for text in _requirements():
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"python_version": "3.11", "python_full_version": "3.11.7"}):
            continue  # e.g. tomli, for Python 3.10 only; constraints.txt is the 3.11 set-up
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req.specifier}"
        checked += 1
    assert checked >= 20


def test_ranges_not_pins_and_python_310():
    assert PROJECT["requires-python"] == ">=3.10"
    for text in PROJECT["dependencies"]:
        assert not any(s.operator == "==" for s in Requirement(text).specifier), f"{text}: an exact pin belongs in constraints.txt"
    assert any(Requirement(t).name == "tomli" and Requirement(t).marker for t in PROJECT["dependencies"])


def test_setup_installs_every_extra_with_the_constraints():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    extras = re.search(r"^EXTRAS=(\S+)$", script, re.M).group(1).split(",")
    assert sorted(extras) == sorted(PROJECT["optional-dependencies"])
    assert "-c constraints.txt" in script
