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


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)
