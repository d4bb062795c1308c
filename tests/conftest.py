import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
sys.path.insert(0, str(ROOT))

needs_real = pytest.mark.skipif(not REAL.exists(), reason="../shared/data/real is absent")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda skip where no GPU is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Six phantoms at 4 mm in an nnU-Net-style folder (seconds to make)."""
    from phantom import write_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_dataset(root, 6, seed=1, progress=False, spacing=(4.0, 4.0, 4.0))
    return root


@pytest.fixture(autouse=True, scope="session")
def _cache_in_tmp(tmp_path_factory):
    """Preprocessing caches (train.py's default is ~/.cache/abdomen-vnet) go to a temporary folder."""
    import os

    os.environ["ABDOMEN_VNET_CACHE"] = str(tmp_path_factory.mktemp("cache"))

