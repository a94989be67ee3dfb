"""A third-party server as the black box: Infinity (``infinity-emb`` on PyPI, its own venv,
made by scripts/infinity_venv.sh) serving a random-weight CLIP folder in Hugging Face format
that the test writes, on 127.0.0.1 and a free port. bbpt's ``openai`` transport runs methods
against it end to end. Slow (the venv is ~5 GB the first time): ``pytest -m slow
tests/test_infinity.py``; BBPT_INFINITY_VENV names an existing venv."""
import os
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from method_cases import METHOD_CASES
from test_serve import free_port

from bbpt.boxes import open_box
from bbpt.engine import make_run_config, run
from bbpt.models import BlackBox, Images, QueryMeter, create_backbone

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def infinity(tmp_path_factory):
    import transformers

    from hf_models import clip_folder

    venv = Path(os.environ.get("BBPT_INFINITY_VENV", ROOT / ".venv-infinity"))
    subprocess.run([str(ROOT / "scripts" / "infinity_venv.sh"), str(venv)], check=True, timeout=3600)
    folder = clip_folder(tmp_path_factory.mktemp("inf") / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(folder), "--served-model-name",
                             "clip", "--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    t_end = time.time() + 300
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"infinity exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("infinity did not start in 300 s")
    yield url, folder
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_infinity_embeddings_equal_the_model_bbpt_loads_from_the_same_folder(infinity):
    url, folder = infinity
    meter = QueryMeter()
    box = open_box(f"openai:{url}", ["cat", "dog"], meter, image_size=32, model="clip")
    px = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)).float() / 255
    local = BlackBox(create_backbone(f"hf:{folder}"), ["cat", "dog"])
    assert torch.allclose(box.embed_images(Images(px)), local.embed_images(Images(px)), atol=1e-5)
    assert torch.allclose(box.embed_texts(["a photo of a cat.", "dog"]), local.embed_texts(["a photo of a cat.", "dog"]),
                          atol=1e-5)
    assert meter.counts["images_forwarded"] == 3 and meter.counts["prompt_evals"] == 2
    assert meter.counts["billed_images"] == 3 and meter.counts["billed_tokens"] > 0  # Infinity's usage


@pytest.mark.parametrize("method", sorted(m for m, case in METHOD_CASES.items() if "openai" in case.fits))
def test_methods_run_end_to_end_against_infinity(infinity, method, tmp_path):
    """Every method that fits an embeddings box (the table's ``fits``), at its tiny settings:
    it finishes, spends exactly the table's queries (counted in bbpt's units, as in process),
    and zero-shot gives the in-process accuracy (100 x cosine against the model's own scale:
    the same argmax)."""
    url, folder = infinity
    case = METHOD_CASES[method].tiny
    kw = dict(method=method, dataset="shapes", shots=case.shots, seed=2, test_subset=40, model=f"hf:{folder}",
              options=case.options)
    there = run(make_run_config(**kw, box=f"openai:{url}", box_options={"image_size": 32, "model": "clip"}),
                out=tmp_path / "inf", progress=False)
    assert there.status == "finished" and there.accuracy.test is not None
    assert {u: there.queries[u] for u in case.queries} == case.queries
    if method == "zeroshot":
        here = run(make_run_config(**kw), out=tmp_path / "local", progress=False)
        assert there.accuracy == here.accuracy
