"""bench/gpu_check.sh --smoke: every GPU figure's script runs on the CPU and lands in one JSON and one Markdown block."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["query_speed", "zip_imagenet_scale", "blackvip_step", "serve"]


def test_gpu_check_smoke_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["smoke"] is True and doc["device"] == "cpu" and list(doc["parts"]) == PARTS
    assert all(doc["parts"][k]["status"] == "ok" for k in PARTS), {k: v["status"] for k, v in doc["parts"].items()}
    f = {k: doc["parts"][k]["figures"] for k in PARTS}
    assert [r["classes"] for r in f["query_speed"]["rows"]] == [3, 5]
    assert all(r["reference_ms"] > 0 and r["fast_ms"] > 0 for r in f["query_speed"]["rows"])
    assert f["zip_imagenet_scale"]["classes"] == 3 and f["zip_imagenet_scale"]["api_calls"] == 10
    step = f["blackvip_step"]["steps"][0]
    assert step["method"] == "blackvip" and step["images_per_step"] == 10 * 128 and step["fast"] > 0
    assert f["blackvip_step"]["matmul_gflops"] > 0
    assert [(r["shape"], r["clients"]) for r in f["serve"]["throughput"]] == [("single", 2)]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "bench/gpu_check.sh --smoke" in md and "| query_speed | ok |" in md and "| serve | ok |" in md
    assert "| 3 |" in md and "blackvip_step:" in md and "api_calls/s" in md


def test_gpu_check_refuses_unknown_arguments_and_needs_cuda_without_smoke(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--fast"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "gpu_check.sh: unknown argument --fast (use --smoke, --out DIR)"
    import torch

    if not torch.cuda.is_available():
        p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path)], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and "no CUDA device here" in p.stderr
