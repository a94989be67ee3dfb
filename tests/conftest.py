import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mini():
    from bbpt.models import create_backbone

    return create_backbone("mini")


@pytest.fixture(scope="session")
def mini_random():
    from bbpt.models import create_backbone

    return create_backbone("mini", "random")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{"clip": folder, "siglip": folder}: random-weight Hugging Face models (tests/hf_models.py)."""
    from hf_models import clip_folder, siglip_folder

    root = tmp_path_factory.mktemp("hf")
    return {"clip": clip_folder(root / "clip"), "siglip": siglip_folder(root / "siglip")}


@pytest.fixture(scope="session")
def backends(mini, hf_dirs):
    """One backbone per backend: the embedded model, open_clip architectures with random
    weights, Hugging Face CLIP and SigLIP with random weights."""
    from bbpt.models import create_backbone

    return {"mini": mini, "ViT-B-32": create_backbone("ViT-B-32", "random"), "RN50": create_backbone("RN50", "random"),
            "hf-clip": create_backbone(f"hf:{hf_dirs['clip']}"), "hf-siglip": create_backbone(f"hf:{hf_dirs['siglip']}")}


BACKENDS = ["mini", "ViT-B-32", "RN50", "hf-clip", "hf-siglip"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)
