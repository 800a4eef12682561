"""Offload ``budget`` on a real GPU: some blocks resident, the others streamed from pinned RAM with prefetch on a
side stream, for every weight format; same pixels as everything resident; load peak within the run peak."""

from __future__ import annotations

import logging
import pytest
import torch

from atelier import fill, stage
from atelier.memory import BudgetPlan
from atelier.registry import REGISTRY
from atelier.types import FluxFillFiles, FluxFillHandle, FluxFillSpec

log = logging.getLogger("atelier.tests")

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def clean():
    REGISTRY.release_all()
    yield
    REGISTRY.release_all()


def _inputs(h=64, w=96):
    image = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, h, w)
    mask[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return image, mask


# the tiny model's blocks are too small for the planner to choose streaming (the window of two blocks outweighs
# what streaming one saves), so the plan is given: half of each part's blocks resident, half streamed
PLAN = BudgetPlan(budget=1 << 40, reserve=0,
                  resident={"transformer": ("transformer_blocks.0",), "text_encoder_2": ("encoder.block.0",),
                            "text_encoder": ("encoder.layers.0",), "vae": ()},
                  streamed={"transformer": ("single_transformer_blocks.0",), "text_encoder_2": ("encoder.block.1",),
                            "text_encoder": ("encoder.layers.1",), "vae": ()},
                  resident_bytes=0, window=0)


@pytest.mark.parametrize("quantization,compile_", [("none", False), ("nf4", False), ("int8", False), ("none", True)])
def test_budget_streams_some_blocks_and_matches_resident(tiny_dir, monkeypatch, quantization, compile_):
    files = FluxFillFiles("diffusers", str(tiny_dir))
    image, mask = _inputs()
    ref_model = stage.get(fill.STAGE, fill.make_handle(FluxFillSpec(files=files, quantization=quantization,
                                                                    offload="none", device="cuda")))
    ref = fill.inpaint(ref_model, image, mask, "a lamp", steps=2, seed=1)
    del ref_model
    REGISTRY.release_all()
    monkeypatch.setattr(fill, "budget_plan", lambda handle: PLAN)
    spec = FluxFillSpec(files=files, quantization=quantization, offload="auto", device="cuda", compile=compile_)
    handle = FluxFillHandle(spec=spec, offload="budget", dtype="bf16", vram_budget=1 << 40)
    model = stage.get(fill.STAGE, handle)
    t = model.pipe.transformer
    if quantization == "int8":  # LLM.int8 parts cannot stream: they stay whole on the GPU, and the node says so
        assert any("stays on the GPU" in n for n in model.notes)
    else:
        assert next(t.single_transformer_blocks[0].parameters()).device.type == "cpu"  # streamed: rests in RAM
        assert next(t.transformer_blocks[0].parameters()).device.type == "cuda"  # resident
        assert next(t.x_embedder.parameters()).device.type == "cuda"  # fixed weights resident
    out = fill.inpaint(model, image, mask, "a lamp", steps=2, seed=1)
    again = fill.inpaint(model, image, mask, "a lamp", steps=2, seed=1)  # prefetch order learnt on the 1st run
    delta = float((out - ref).abs().max())
    log.info(f"budget {quantization} (compile {compile_}) vs all resident: max abs {delta:.2e}")
    assert torch.equal(out, again)
    assert delta <= (2e-2 if compile_ else 1e-3)
    assert any("offload budget" in n for n in model.notes)
