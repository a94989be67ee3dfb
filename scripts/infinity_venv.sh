#!/usr/bin/env bash
# A separate virtual environment with Infinity (infinity-emb on PyPI), the third-party
# embedding server tests/test_infinity.py runs bbpt against. Usage: scripts/infinity_venv.sh DIR
# (default .venv-infinity). Idempotent; about 5 GB (Infinity brings its own torch).
set -euo pipefail
dir=${1:-.venv-infinity}
PY=${PYTHON:-python3.11}
if [ ! -x "$dir/bin/infinity_emb" ]; then
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "infinity-emb[server,torch,vision]==0.0.78" aiohttp
fi
"$dir/bin/infinity_emb" --help >/dev/null && echo "infinity venv: $dir"
