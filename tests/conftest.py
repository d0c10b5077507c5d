import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CONTRA_RAY_SHARED", ROOT.parent / "shared"))
CIFAR_TARBALL = SHARED / "datasets" / "cifar10-jpeg.tar.gz"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Per-session cache; the real CIFAR-10 extraction is shared through CONTRA_RAY_TEST_CACHE if set."""
    return os.environ.get("CONTRA_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
