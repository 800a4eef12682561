"""GPU tier: runs on the device machine (`pytest -m gpu tests/gpu`); skipped where there is no CUDA GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tests.harness import tiny_flux

    return tiny_flux.build_diffusers(tmp_path_factory.mktemp("gpu") / "flux-fill-tiny")
