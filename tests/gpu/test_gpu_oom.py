"""Out of GPU memory names the fix (issue 15): a real ComfyUI on the GPU under a hard VRAM cap
(torch.cuda.set_per_process_memory_fraction, set before ComfyUI starts) too small for a 4096×4096 FLUX Fill with
vae_tiling off. The node error is Atelier's SettingError naming the toggles (offload / quantization / vae_tiling /
lower resolution), not a CUDA trace; the server stays up, frees what was half-loaded, and a small prompt runs next.

Run on the device machine: pytest -c tests/pytest.ini -m gpu tests/gpu/test_gpu_oom.py -q -s
"""
from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import torch

from tests.harness.comfy_server import ComfyClient, ComfyServer, comfy_python

log = logging.getLogger("atelier.tests")

pytestmark = pytest.mark.gpu

REPO_ROOT = Path(__file__).resolve().parents[2]
CAP_BYTES = 2 * 1024**3  # the hard VRAM cap of the server process
MIB = 1024**2


def _capped_python(tmp: Path, fraction: float) -> str:
    """A 'python' that caps this process' VRAM, then runs ComfyUI's main.py with the arguments it was given."""
    script = tmp / "python_capped.sh"
    code = ("import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction(%r); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')" % fraction)
    script.write_text(f'#!/bin/sh\nexec "{comfy_python()}" -c "{code}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _prompt(side: int, vae_tiling: bool = False, offload: str = "none") -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0x806040}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": side, "height": side}},
        "3": {"class_type": "AtelierFluxFillLoader", "inputs": {
            "model": "diffusers/flux-fill-tiny", "quantization": "none", "offload": offload, "attention_slicing": False,
            "vae_slicing": False, "vae_tiling": vae_tiling, "first_block_cache": 0.0, "dtype": "bf16"}},
        "4": {"class_type": "AtelierFluxFill", "inputs": {"pipe": ["3", 0], "image": ["1", 0], "mask": ["2", 0],
                                                          "prompt": "a vase", "steps": 1, "guidance": 30.0, "seed": 0,
                                                          "composite_back": True}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def _torch_reserved(client: ComfyClient) -> int:
    dev = client.system_stats()["devices"][0]
    return int(dev["torch_vram_total"])


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    from tests.harness import tiny_flux

    base = tmp_path_factory.mktemp("oom_base")
    tiny_flux.build_diffusers(base / "models" / "diffusers" / "flux-fill-tiny")
    total = torch.cuda.get_device_properties(0).total_memory
    server = ComfyServer(base, REPO_ROOT, cpu=False, python=_capped_python(base, CAP_BYTES / total))
    server.start(timeout=300)
    try:
        yield server, ComfyClient(server.url, timeout=60)
    finally:
        server.stop()


def test_oom_names_the_toggles_and_frees_vram(capped):
    server, client = capped
    small = client.run(_prompt(64), timeout=600)
    assert client.succeeded(small), client.error_message(small)
    before = _torch_reserved(client)

    entry = client.run(_prompt(4096), timeout=600)
    details = client.error_details(entry)
    assert details is not None, "a 4096² FLUX Fill fitted in the cap: raise the side or lower CAP_BYTES"
    message = details["exception_message"]
    log.info("OOM message: %s", message)
    assert details["exception_type"].endswith("SettingError"), details["exception_type"]
    for toggle in ("offload", "quantization", "vae_tiling", "lower resolution"):
        assert toggle in message, (toggle, message)
    assert "Traceback" not in message and server.alive()

    after = _torch_reserved(client)
    log.info(f"torch reserved VRAM: {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after the OOM")
    assert after <= before + 64 * MIB, (before, after)
    again = client.run(_prompt(64), timeout=600)
    assert client.succeeded(again), client.error_message(again)
