"""The full-size FLUX.1-Fill-dev architecture (random weights, built by `benchmarks/bench_comfy.py make`) on a real
GPU: every quantization × offload combination runs 2 steps with finite output; through a real ComfyUI server,
POST /free hands Atelier's VRAM back and a core model that needs the VRAM evicts Atelier's pipeline (no OOM).

Needs $ATELIER_FULL_FLUX_BASE = the folder `bench_comfy.py make --base` wrote (≈ 58 GB); skipped without it.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from atelier import fill, stage
from atelier.registry import REGISTRY
from atelier.types import FluxFillFiles, FluxFillSpec

pytestmark = pytest.mark.gpu
GiB = 1024**3


@pytest.fixture(scope="module")
def base() -> Path:
    env = os.environ.get("ATELIER_FULL_FLUX_BASE")
    if not env:
        pytest.skip("set ATELIER_FULL_FLUX_BASE to a folder made by `benchmarks/bench_comfy.py make`")
    return Path(env)


@pytest.fixture(scope="module")
def folder(base) -> Path:
    from benchmarks import bench_comfy

    return base / "models" / "diffusers" / bench_comfy.DIFFUSERS_NAME


@pytest.fixture(autouse=True)
def clean():
    REGISTRY.release_all()
    yield
    REGISTRY.release_all()
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_full_size_combo_two_steps(folder, quantization, offload):
    base = torch.cuda.memory_allocated()
    spec = FluxFillSpec(files=FluxFillFiles("diffusers", str(folder)), quantization=quantization, offload=offload,
                        device="cuda")
    model = stage.get(fill.STAGE, fill.make_handle(spec))
    assert model.offload == offload
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 512, 512, 3, generator=g)
    mask = torch.zeros(1, 512, 512)
    mask[:, 128:384, 160:352] = 1
    out = fill.inpaint(model, image, mask, "a vase", steps=2, seed=0, composite_back=True)
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, :128], image[:, :128])  # outside the mask: the input's pixels
    del model
    REGISTRY.release_all()
    gc.collect()
    assert torch.cuda.memory_allocated() - base <= 0.1 * GiB


def test_free_hands_the_vram_back_through_comfyui(base):
    from benchmarks import bench_comfy

    srv = bench_comfy.Server(base)
    try:
        before = srv.probe(reset=False, tag="before")
        job = srv.job(bench_comfy.atelier_graph(dict(quantization="none", offload="none"), 1, 2))
        assert job["ok"], job.get("error")
        assert job["mem"]["allocated_gib"] > 20  # the pipeline is resident after the run
        srv.client.free(unload_models=True, free_memory=True)
        srv.client.wait_idle(timeout=60)
        import time

        time.sleep(3)
        after = srv.probe(reset=False, tag="after")
        assert after["allocated_gib"] - before["allocated_gib"] <= 0.1, (before, after)
    finally:
        srv.stop()


def test_a_core_model_evicts_atelier_instead_of_running_out_of_memory(base):
    from benchmarks import bench_comfy

    row = bench_comfy.run_eviction(base, steps=2)
    assert "error" not in row, row
    assert row["atelier_ok"] and row["native_after_atelier_ok"] and row["atelier_again_ok"], row
    assert row["atelier_released_by_comfy"] >= 1 and not row["oom"], row
