"""bbpt installs from its ranges and runs on the other supported Pythons (scripts/check_python.sh).

Slow (a fresh venv per version: torch resolves from the package index, about 10 minutes each);
run with ``pytest -m slow tests/test_python_versions.py``. BBPT_CHECK_PYTHONS=3.10,3.13 picks the
versions; each is skipped, with the reason, where pyenv or that Python is missing.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_python.sh"
VERSIONS = os.environ.get("BBPT_CHECK_PYTHONS", "3.10,3.12").split(",")


def _pyenv_python(version: str) -> Path | None:
    root = os.environ.get("PYENV_ROOT")
    if not root:
        if not shutil.which("pyenv"):
            return None
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    found = sorted(Path(root, "versions").glob(f"{version}*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)])
    found = [p for p in found if p.name == version or p.name.startswith(version + ".")]
    return found[-1] / "bin" / "python" if found else None


@pytest.mark.parametrize("version", VERSIONS)
def test_install_and_run_on_python(version, tmp_path):
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        pytest.skip(f"Python {version} is the interpreter running the tests")
    py = _pyenv_python(version)
    if py is None or not py.exists():
        pytest.skip(f"Python {version} is not installed with pyenv (pyenv install {version})")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.run(["bash", str(SCRIPT), version], capture_output=True, text=True, env=env, timeout=3600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"Python {version} OK" in out
    assert "modules that fail to import" not in out
    accuracies = dict(re.findall(r"check_python: (zeroshot|zip): .* test accuracy ([\d.]+)%", out))
    assert set(accuracies) == {"zeroshot", "zip"}, out[-3000:]
    # mini reads mnist digits at ~74% zero-shot (README); 10 classes: chance is 10%
    assert all(float(a) > 50 for a in accuracies.values()), accuracies
    assert list(tmp_path.iterdir()) == [], "the check's temporary venv was left behind"
