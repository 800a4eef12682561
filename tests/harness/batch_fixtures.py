"""Fixtures of the batch runner's tests (tests/batch; a pytest plugin loaded by tests/conftest.py): a local Ray
cluster, CPU ComfyUI servers with the tiny FLUX Fill.

The runner (atelier/batch) never imports from tests/; these fixtures use the harness to start the *external*
servers that `--servers` drives (the runner starts its own with `--cpu-servers`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.comfy_server import ComfyServer

REPO_ROOT = Path(__file__).resolve().parents[2]

N_SERVERS = 3


@pytest.fixture(scope="session")
def pack_base(comfy_base, tiny_flux) -> Path:
    """--base-directory for servers the runner starts: the shared models/ tree + custom_nodes/atelier."""
    link = comfy_base / "custom_nodes" / "atelier"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return comfy_base


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster in this process (small, no dashboard); subprocess runners join it by address."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def servers(pack_base, tmp_path_factory):
    """Three CPU ComfyUI servers (the pack, the tiny FLUX Fill); each with its own input/output folders."""
    from concurrent.futures import ThreadPoolExecutor

    made = []
    for i in range(N_SERVERS):
        base = tmp_path_factory.mktemp(f"batch_server{i}")
        (base / "models").symlink_to(pack_base / "models", target_is_directory=True)
        made.append(ComfyServer(base, REPO_ROOT, env={"OMP_NUM_THREADS": "1"}))
    try:
        with ThreadPoolExecutor(N_SERVERS) as pool:  # boot together
            list(pool.map(lambda s: s.start(timeout=400), made))
        yield made
    finally:
        for s in made:
            s.stop()
