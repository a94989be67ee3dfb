"""The backbone registry: Hugging Face models by id or folder, their one-line errors, and
the black box reaching no library's internals."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bbpt.errors import BadInput, MissingWeights
from bbpt.models import BlackBox, Images, SoftPrompt, create_backbone

BBPT = [sys.executable, "-m", "bbpt.cli"]


def test_importing_bbpt_does_not_set_hf_hub_offline():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, bbpt, bbpt.cli, bbpt.models, bbpt.models.hf, bbpt.engine; "
            "print(os.environ.get('HF_HUB_OFFLINE'))")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "None"


def test_hf_errors_are_one_line(tmp_path, hf_dirs):
    with pytest.raises(BadInput, match="no such folder"):
        create_backbone(f"hf:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeights, match="config.json is missing"):
        create_backbone(f"hf:{empty}")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(hf_dirs["clip"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MissingWeights, match=r"has no readable the weights \(model.safetensors\)"):
        create_backbone(f"hf:{no_weights}")
    assert create_backbone(f"hf:{no_weights}", "random").pretrained == "random"  # architecture only: fine
    with pytest.raises(BadInput, match="does not apply to hf: models"):
        create_backbone(f"hf:{hf_dirs['clip']}", "openai")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BadInput, match="is a 'bert' model; bbpt's hf: backend takes clip, siglip"):
        create_backbone(f"hf:{other}")


def test_hf_hub_id_missing_offline_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    with pytest.raises(MissingWeights) as e:
        create_backbone("hf:openai/clip-vit-base-patch16")
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download openai/clip-vit-base-patch16" in msg


def test_cli_runs_a_method_on_an_hf_model_and_errors_in_one_line(tmp_path, hf_dirs):
    args = ["run", "--method", "zip", "--dataset", "shapes", "--shots", "1", "--budget", "40", "--test-subset", "60",
            "--set", "n_ctx=2", "--quiet"]
    for kind in ("clip", "siglip"):
        p = subprocess.run([*BBPT, *args, "--model", f"hf:{hf_dirs[kind]}", "--out", str(tmp_path / kind)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        r = json.loads((tmp_path / kind / "result.json").read_text())
        assert r["queries"]["api_calls"] == 40 and r["model"] == f"hf:{Path(hf_dirs[kind]).resolve()}"
    p = subprocess.run([*BBPT, *args, "--model", f"hf:{tmp_path / 'missing'}", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no such folder" in p.stderr
    assert not (tmp_path / "x").exists()


def test_hf_siglip_logits_carry_its_bias(backends):
    bb = backends["hf-siglip"]
    box = BlackBox(bb, ["cat", "dog"])
    px = torch.rand(3, 3, bb.image_size, bb.image_size)
    ctx = box.embed_words("a photo of a")[None]
    logits = box.query(SoftPrompt(ctx), Images(px))[0]  # (B, C)
    with torch.no_grad():
        t = torch.nn.functional.normalize(bb.library_text_features(["a photo of a cat.", "a photo of a dog."]), dim=-1)
        ref = bb.logit_scale * bb.encode_images(px) @ t.T + bb.logit_bias
    assert bb.logit_bias == pytest.approx(-2.0) and torch.allclose(logits, ref, atol=1e-4)


def test_the_black_box_reads_only_the_backbone_protocol():
    """The black box's modules and whitebox.py reach the model only through Backbone's public
    interface: no library attribute, nothing private of it."""
    from bbpt.models import blackbox, localbox, texts, whitebox
    from bbpt.models.backbone import Backbone, TextEncoder

    allowed = {n for n in dir(Backbone) if not n.startswith("_")} | set(Backbone.__annotations__) | {"placeholder_id"}
    text_allowed = ({n for n in vars(TextEncoder) if not n.startswith("_")} | set(TextEncoder.__annotations__)
                    | {"prefix"})  # the protocol's own members only, not nn.Module's
    bad = []
    for mod in (blackbox, localbox, texts, whitebox):
        for node in ast.walk(ast.parse(Path(mod.__file__).read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            v = node.value
            if isinstance(v, ast.Attribute) and v.attr == "_bb" and node.attr not in allowed:
                bad.append(f"{mod.__name__}: _bb.{node.attr}")
            if isinstance(v, ast.Name) and v.id in ("bb", "backbone") and node.attr not in allowed:
                bad.append(f"{mod.__name__}: {v.id}.{node.attr}")
            is_text = (isinstance(v, ast.Attribute) and v.attr == "text") or (isinstance(v, ast.Name) and v.id == "tower")
            if is_text and node.attr not in text_allowed:
                bad.append(f"{mod.__name__}: text.{node.attr}")
    assert bad == []
    assert not any(n.attr == "model" for mod in (blackbox, localbox, texts) for n in ast.walk(ast.parse(Path(mod.__file__).read_text()))
                   if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "_bb")
