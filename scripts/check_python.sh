#!/usr/bin/env bash
# Does bbpt install and run on another Python? scripts/check_python.sh [VERSION] (default 3.12)
#
# Takes that Python from pyenv, makes a fresh venv in a temporary folder, runs `pip install .`
# from a copy of this tree (the ranges in pyproject.toml, resolved from the package indexes pip is
# configured with: no constraints.txt, which pins the Python 3.11 set-up), imports every bbpt
# module, then runs one zero-shot and one ZIP run on the embedded `mini` model and mnist, and
# prints the install time, the versions resolved, each run's time and test accuracy, and the
# venv's size. The venv is deleted at the end (BBPT_CHECK_KEEP=1 keeps it).
# Knobs (environment): BBPT_CHECK_BUDGET (ZIP's api_calls, default 100), BBPT_CHECK_TEST_SUBSET
# (test images per run, default 1000; 0: the full test split), BBPT_CHECK_CONSTRAINTS=FILE
# (install with -c FILE). Exit 3: no such Python in pyenv.
set -euo pipefail
VERSION=${1:-3.12}
BUDGET=${BBPT_CHECK_BUDGET:-100}
SUBSET=${BBPT_CHECK_TEST_SUBSET:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TQDM_DISABLE=1

PYENV_ROOT=${PYENV_ROOT:-$( (command -v pyenv >/dev/null && pyenv root) || echo "$HOME/.pyenv")}
PREFIX=$(ls -d "$PYENV_ROOT/versions/$VERSION" "$PYENV_ROOT/versions/$VERSION".* 2>/dev/null | sort -V | tail -1 || true)
PY=${PREFIX:+$PREFIX/bin/python}
if [ -z "$PY" ] || [ ! -x "$PY" ]; then
  echo "check_python: no Python $VERSION under $PYENV_ROOT/versions (pyenv install $VERSION)" >&2
  exit 3
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bbpt-py$VERSION.XXXXXX")
[ "${BBPT_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

echo "check_python: $("$PY" -V) ($PY), in $TMP"
# a copy of the working tree (uncommitted changes included), without the venv, runs or results
tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./bench/results \
    --exclude='*.egg-info' --exclude=./build --exclude='__pycache__' -cf - . | (mkdir "$TMP/src" && tar -C "$TMP/src" -xf -)
"$PY" -m venv "$TMP/venv"
V=$TMP/venv/bin
echo "check_python: pip's indexes: $("$V/python" -m pip config list 2>/dev/null | grep -E 'index-url|find-links|constraint' | tr '\n' ' ')"
echo "check_python: pip's default index (PyPI) unless overridden above"
extra=()
[ -z "${BBPT_CHECK_CONSTRAINTS:-}" ] || extra=(-c "$BBPT_CHECK_CONSTRAINTS")
t0=$(now)
if ! "$V/python" -m pip install --progress-bar off "${extra[@]}" "$TMP/src" >"$TMP/pip.log" 2>&1; then
  tail -30 "$TMP/pip.log" >&2
  echo "check_python: pip install . failed on Python $VERSION" >&2
  exit 1
fi
t1=$(now)
echo "check_python: pip install . took $(secs "$t0" "$t1") s: $(grep -cE '^ *Downloading ' "$TMP/pip.log" || true) wheels downloaded (pip's indexes), $(grep -cE '^ *Using cached ' "$TMP/pip.log" || true) from pip's cache, $(grep -cE '^ *Processing /' "$TMP/pip.log" || true) from local files (this tree, local wheels or a file:// index)"
grep -E '^ *Downloading torch-' "$TMP/pip.log" | sed 's/^ */  /' || true
grep '^Successfully installed' "$TMP/pip.log" | fold -s -w 100 | sed 's/^/  /'
"$V/python" - <<'EOF'
from importlib.metadata import version
print("check_python: resolved " + ", ".join(f"{p} {version(p)}" for p in
      ["torch", "torchvision", "open-clip-torch", "numpy", "pydantic", "typer", "tensorboardX"]))
import torch
print(f"check_python: torch build {'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'}")
EOF

# every module of the installed package imports (a module whose optional extra is not installed
# is listed, not failed)
"$V/python" - <<'EOF'
import importlib, pkgutil, sys
import bbpt
ok, missing, bad = 0, [], []
for m in pkgutil.walk_packages(bbpt.__path__, "bbpt."):
    try:
        importlib.import_module(m.name)
        ok += 1
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "bbpt":
            bad.append(f"{m.name}: {e}")
        else:
            missing.append(f"{m.name} ({e.name})")
    except Exception as e:  # noqa: BLE001 - reported below
        bad.append(f"{m.name}: {type(e).__name__}: {e}")
print(f"check_python: {ok} bbpt modules import; optional extras not installed: {', '.join(missing) or 'none'}")
if bad:
    print("check_python: modules that fail to import:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF

cd "$TMP"
"$V/bbpt" data prepare mnist >/dev/null
run() {  # NAME ARGS...: one run, its wall time and test accuracy
  local name=$1; shift
  local a b
  a=$(now)
  "$V/bbpt" run --dataset mnist --model mini --shots 16 --seed 1 --test-subset "$SUBSET" --out "runs/$name" "$@" >"$name.log" 2>&1 \
    || { tail -20 "$name.log" >&2; echo "check_python: $name run failed on Python $VERSION" >&2; exit 1; }
  b=$(now)
  "$V/python" -c "import json,sys; r=json.load(open('runs/$name/result.json')); q=r['queries']['api_calls']
print(f'check_python: {sys.argv[1]}: {sys.argv[2]} s (run {r[\"wall_seconds\"]:.1f} s), test accuracy {100*r[\"accuracy\"][\"test\"]:.2f}% on {sys.argv[3]} test images, api_calls {q}')" \
    "$name" "$(secs "$a" "$b")" "$([ "$SUBSET" = 0 ] && echo all || echo "$SUBSET")"
}
run zeroshot --method zeroshot
run zip --method zip --budget "$BUDGET"
echo "check_python: venv size $(du -sh "$TMP/venv" | cut -f1) (torch $(du -sh "$TMP"/venv/lib/python*/site-packages/torch | cut -f1), NVIDIA libraries $(du -shc "$TMP"/venv/lib/python*/site-packages/nvidia 2>/dev/null | tail -1 | cut -f1))"
echo "check_python: Python $VERSION OK"
