#!/usr/bin/env bash
# Every GPU figure in one prepared script: the first thing to run on a machine with a GPU.
#
#   bench/gpu_check.sh                 # on CUDA: under 8 minutes on one H100 / H200
#   bench/gpu_check.sh --smoke         # on the CPU, tiny sizes (the default test suite runs it)
#   bench/gpu_check.sh --out DIR       # where gpu_check.json and gpu_check.md go (default bench/results/gpu_check)
#
# 1. query_speed: ms per query, fast path vs the official loop's, at C = 10 / 100 / 1000, and
#    the fast query as a multiple of its FLOP bound (bench/query_speed.py);
# 2. zip_imagenet_scale: a 16-shot ZIP run at C = 1000 on ViT-B/16, api_calls/s (bench/zip_imagenet_scale.py);
# 3. blackvip_step: one BlackVIP query step (mini, mnist) and mini's image tower (bench/image_tower.py);
# 4. serve: the API's dynamic batching, api_calls/s from 1, 8, 32 clients, batched vs not (bench/serve.py).
#
# Each part runs in its own process under a time limit; a part that fails or runs out of time
# is recorded as such and the others still run. The script writes DIR/gpu_check.json (every
# figure, each part's status and seconds) and DIR/gpu_check.md (the block for the README), and
# exits 1 if any part did not finish.
set -uo pipefail

SMOKE=0
OUT=bench/results/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

OUT=$(realpath -m "$OUT")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's bbpt

if [ "$SMOKE" = 1 ]; then
  DEV=cpu
  QUERY=(--device cpu --arch ViT-B-32 --classes 3,5 --prompts 2 --batch 2 --repeats 1)
  ZIPS=(--device cpu --model ViT-B-32 --classes 3 --api-calls 10 --view-pool 1 --val-per-class 1 --root "${TMPDIR:-/tmp}/bbpt-gpu-check-smoke")
  STEP=(--device cpu --sizes 64 --repeats 1 --steps 1 --methods blackvip --candidates 2)
  SERVE=(--device cpu --seconds 0.5 --clients 2 --shapes single --no-zip)
  LIMITS=(120 120 120 120)
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; run it on a GPU machine, or with --smoke on the CPU" >&2
    exit 2
  fi
  DEV=cuda
  QUERY=(--device cuda --classes 10,100,1000)
  ZIPS=(--device cuda)
  STEP=(--device cuda --sizes 128,2048 --steps 10 --methods blackvip --candidates 40)
  SERVE=(--device cuda --seconds 4 --clients 1,8,32)
  LIMITS=(90 200 50 120)  # seconds per part: 460 s at most, with start-up under 8 minutes
fi

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/gpu_check.md

PARTS=(query_speed zip_imagenet_scale blackvip_step serve)
SCRIPTS=(bench/query_speed.py bench/zip_imagenet_scale.py bench/image_tower.py bench/serve.py)
T0=$(date +%s)
for i in 0 1 2 3; do
  part=${PARTS[$i]}
  case $part in
    query_speed) args=("${QUERY[@]}") ;;
    zip_imagenet_scale) args=("${ZIPS[@]}") ;;
    blackvip_step) args=("${STEP[@]}") ;;
    serve) args=("${SERVE[@]}") ;;
  esac
  echo "== $part: $PY ${SCRIPTS[$i]} ${args[*]} (limit ${LIMITS[$i]} s)"
  t=$(date +%s)
  timeout --kill-after=10 "${LIMITS[$i]}" "$PY" "${SCRIPTS[$i]}" "${args[@]}" --json "$OUT/$part.json" 2>&1 \
    | tee "$OUT/$part.log"
  rc=${PIPESTATUS[0]}
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t ))}" > "$OUT/$part.status.json"
done
echo "== all parts: $(( $(date +%s) - T0 )) s"

"$PY" - "$OUT" "$DEV" "$SMOKE" <<'EOF'
"""Merge the parts' JSON into gpu_check.json and write the README block gpu_check.md."""
import datetime, json, platform, sys
from pathlib import Path

out, dev, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
parts = ["query_speed", "zip_imagenet_scale", "blackvip_step", "serve"]
doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": dev,
       "smoke": smoke, "host": platform.node(), "parts": {}}
for p in parts:
    st = json.loads((out / f"{p}.status.json").read_text())
    f = out / f"{p}.json"
    ok = st["rc"] == 0 and f.is_file()
    doc["parts"][p] = {"status": "ok" if ok else ("timeout" if st["rc"] in (124, 137) else f"failed (exit {st['rc']})"),
                       "seconds": st["seconds"], "figures": json.loads(f.read_text()) if ok else None}
P = doc["parts"]
name = (P["query_speed"]["figures"] or {}).get("device") or (P["blackvip_step"]["figures"] or {}).get("device") or dev
md = [f"**GPU check** (`bench/gpu_check.sh{' --smoke' if smoke else ''}`, {name}, {doc['date']}"
      f"{'; smoke run on the CPU, tiny sizes: not figures to quote' if smoke else ''}):", ""]
md += ["| part | status | seconds |", "|---|---|---|"] + [f"| {p} | {P[p]['status']} | {P[p]['seconds']} |" for p in parts]
q = P["query_speed"]["figures"]
if q:
    md += ["", f"query_speed ({q['arch']}, {q['batch']} images, {q['prompts']} candidates per fast call):", "",
           "| classes C | reference ms/query | fast ms/query | speed-up | x FLOP bound |", "|---|---|---|---|---|"]
    md += [f"| {r['classes']} | {r['reference_ms']:.2f} | {r['fast_ms']:.3f} | {r['speedup']:.1f}x | "
           + (f"{r['x_flop_bound']:.2f}x |" if r["x_flop_bound"] is not None else "- |") for r in q["rows"]]
z = P["zip_imagenet_scale"]["figures"]
if z:
    md += ["", f"zip_imagenet_scale: ZIP at C = {z['classes']}, {z['api_calls']} api_calls in {z['run_s']:.1f} s: "
           f"**{z['api_calls_per_s']:.1f} api_calls/s** (tree {z['tree_s']:.0f} s; test {100 * z['test_accuracy']:.2f} %, random weights)"]
b = P["blackvip_step"]["figures"]
if b and b["steps"]:
    s = b["steps"][0]
    md += ["", f"blackvip_step: {1 / s['fast']:.1f} steps/s ({s['fast'] * 1e3:.1f} ms a step of {s['images_per_step']} "
           f"images; mini's image tower {max(r['fast'] for r in b['tower']):.0f} GFLOP/s, "
           f"float32 matmul {b['matmul_gflops']:.0f} GFLOP/s)"]
sv = P["serve"]["figures"]
if sv:
    if sv.get("zip"):
        zz = sv["zip"]
        md += ["", f"serve: ZIP in process {zz['local_s']:.1f} s, remote {zz['remote_s']:.1f} s "
               f"({zz['remote_s'] / zz['local_s']:.2f}x), same result: {zz['same']}"]
    md += ["", "| query shape | clients | batched api_calls/s | unbatched api_calls/s | batched / unbatched |",
           "|---|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['clients']} | {r['batched']:.0f} | {r['unbatched']:.0f} | {r['ratio']:.2f}x |"
           for r in sv["throughput"]]
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
sys.exit(0 if all(P[p]["status"] == "ok" for p in parts) else 1)
EOF
