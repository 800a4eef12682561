"""Budgeted offload: the planner (what stays on the GPU under a VRAM budget), block sizes read from file headers,
and the streaming hooks installed on the right modules (CPU: hooks without a side stream, same outputs)."""

from __future__ import annotations

import pytest
import torch

from atelier import fill, pipelines
from atelier.memory import (
    ACTIVATION_RESERVE,
    GiB,
    PartBlocks,
    footprint,
    plan_budget,
    plan_offload,
    spread,
)
from atelier.types import FluxFillFiles, FluxFillSpec

MiB = 1024**2

# FLUX.1 Fill's shape in bf16: 19 double blocks of ~680 MB, 38 single blocks of ~283 MB, ~0.5 GB outside them;
# T5-XXL: 24 blocks of ~400 MB + 0.5 GB embedding; CLIP-L 12 × 28 MB; VAE 160 MB
FLUX = PartBlocks("transformer", 500 * MiB, tuple([(f"transformer_blocks.{i}", 680 * MiB) for i in range(19)]
                                                 + [(f"single_transformer_blocks.{i}", 283 * MiB) for i in range(38)]))
T5 = PartBlocks("text_encoder_2", 500 * MiB, tuple((f"encoder.block.{i}", 400 * MiB) for i in range(24)))
CLIP = PartBlocks("text_encoder", 90 * MiB, tuple((f"text_model.encoder.layers.{i}", 28 * MiB) for i in range(12)))
VAE = PartBlocks("vae", 160 * MiB)
PARTS = [FLUX, T5, CLIP, VAE]
TOTAL = sum(p.total for p in PARTS)


# ------------------------------------------------------------------------------------------------- spread


@pytest.mark.parametrize("n", [1, 2, 5, 19, 57])
def test_spread_picks_k_distinct_evenly_spaced_indices(n):
    for k in range(n + 1):
        idx = spread(n, k)
        assert len(idx) == len(set(idx)) == k
        assert all(0 <= i < n for i in idx)
        if 1 < k < n:
            gaps = [b - a for a, b in zip(idx, idx[1:])]
            assert max(gaps) - min(gaps) <= 1  # even spacing
    assert spread(n, n + 3) == tuple(range(n))
    assert spread(n, 0) == ()


# --------------------------------------------------------------------------------------------- plan_budget


def test_everything_fits_keeps_everything_and_needs_no_window():
    plan = plan_budget(PARTS, TOTAL + ACTIVATION_RESERVE, ACTIVATION_RESERVE)
    assert plan.fits and not plan.streams_anything
    assert plan.resident_bytes == TOTAL and plan.window == 0
    assert len(plan.resident["transformer"]) == 57


@pytest.mark.parametrize("budget_gib", [6, 8, 12, 16, 24, 32])
def test_a_budget_is_never_exceeded_and_the_denoiser_comes_first(budget_gib):
    budget = budget_gib * GiB
    plan = plan_budget(PARTS, budget, ACTIVATION_RESERVE)
    assert plan.fits
    assert plan.resident_bytes + plan.window + ACTIVATION_RESERVE <= budget
    # the window holds two of the largest streamed blocks (the one computing, the one being copied)
    streamed_sizes = [s for p in PARTS for path, s in p.blocks if path in plan.streamed[p.name]]
    assert plan.window == 2 * max(streamed_sizes)
    # fixed bytes of every part are always resident
    assert plan.resident_bytes >= sum(p.fixed for p in PARTS)
    # nothing more fits: every streamed block is larger than the room left
    left = budget - plan.resident_bytes - plan.window - ACTIVATION_RESERVE
    assert all(s > left for s in streamed_sizes)
    # resident + streamed = every block, no block in both
    for p in PARTS:
        res, st = set(plan.resident[p.name]), set(plan.streamed[p.name])
        assert not res & st and res | st == {path for path, _ in p.blocks}


def test_the_denoiser_blocks_are_kept_before_text_encoder_blocks():
    a = PartBlocks("transformer", 0, tuple((f"b.{i}", GiB) for i in range(10)))
    b = PartBlocks("text_encoder_2", 0, tuple((f"e.{i}", GiB) for i in range(10)))
    plan = plan_budget([a, b], 7 * GiB + ACTIVATION_RESERVE, ACTIVATION_RESERVE)
    assert len(plan.resident["transformer"]) == 5 and plan.resident["text_encoder_2"] == ()  # 5 + window of 2
    plan = plan_budget([a, b], 16 * GiB + ACTIVATION_RESERVE, ACTIVATION_RESERVE)
    assert len(plan.resident["transformer"]) == 10 and len(plan.resident["text_encoder_2"]) == 4


def test_more_budget_never_keeps_fewer_bytes():
    last = -1
    for gib in range(5, 40):
        plan = plan_budget(PARTS, gib * GiB, ACTIVATION_RESERVE)
        assert plan.resident_bytes >= last
        last = plan.resident_bytes


def test_streamed_blocks_are_spread_between_resident_ones():
    plan = plan_budget([FLUX], 12 * GiB, ACTIVATION_RESERVE)
    order = [path for path, _ in FLUX.blocks]
    streamed = [order.index(p) for p in plan.streamed["transformer"]]
    assert 0 < len(streamed) < len(order)
    assert max(b - a for a, b in zip(streamed, streamed[1:])) <= 3  # not one long streamed tail


def test_a_budget_below_the_fixed_bytes_does_not_fit():
    plan = plan_budget(PARTS, 2 * GiB, ACTIVATION_RESERVE)
    assert not plan.fits


# -------------------------------------------------------------------------------------- auto chooses budget


FP = footprint({"transformer": 24 * GiB, "text_encoders": 10 * GiB, "vae": GiB // 4}, "none", torch.bfloat16)


def test_auto_picks_budget_between_everything_and_nothing():
    blocks = lambda: PARTS  # noqa: E731
    assert plan_offload("auto", "cuda", FP, 80 * GiB, blocks)[0] == "none"
    mode, why = plan_offload("auto", "cuda", FP, 12 * GiB, blocks)
    assert mode == "budget" and "blocks resident" in why and "12.0 GiB" in why
    assert plan_offload("auto", "cuda", FP, 2 * GiB, blocks)[0] == "sequential"  # not even the fixed part fits
    assert plan_offload("auto", "cuda", FP, 12 * GiB)[0] in ("model", "sequential")  # stages without blocks
    assert plan_offload("model", "cuda", FP, 12 * GiB, blocks)[0] == "model"  # an explicit choice is kept


# -------------------------------------------------------------------------------- block sizes from headers


def test_part_blocks_from_headers_name_real_modules(files_diffusers, files_single):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    t = FluxTransformer2DModel.from_pretrained(files_diffusers.path, subfolder="transformer")
    t5 = T5EncoderModel.from_pretrained(files_diffusers.path, subfolder="text_encoder_2")
    clip = CLIPTextModel.from_pretrained(files_diffusers.path, subfolder="text_encoder")
    for files in (files_diffusers, files_single):
        parts = {p.name: p for p in fill.part_blocks(files, "none", torch.bfloat16)}
        assert list(parts) == ["transformer", "text_encoder_2", "text_encoder", "vae"]
        for name, module in (("transformer", t), ("text_encoder_2", t5), ("text_encoder", clip)):
            p = parts[name]
            assert p.blocks, name
            for path, size in p.blocks:
                block = pipelines.submodule(module, path)
                assert size == sum(x.numel() * 2 for x in block.state_dict().values()), path
            assert p.total == sum(x.numel() * 2 for x in module.state_dict().values()) or name == "text_encoder_2"
        assert [b for b, _ in parts["transformer"].blocks] == (
            [f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))]
            + [f"single_transformer_blocks.{i}" for i in range(len(t.single_transformer_blocks))])
        assert parts["vae"].blocks == () and parts["vae"].fixed > 0
    nf4 = {p.name: p for p in fill.part_blocks(files_diffusers, "nf4", torch.bfloat16)}
    bf16 = {p.name: p for p in fill.part_blocks(files_diffusers, "none", torch.bfloat16)}
    assert nf4["transformer"].total < 0.35 * bf16["transformer"].total
    assert nf4["vae"].total == bf16["vae"].total


def test_make_handle_plans_a_budget_and_need_bytes_follows_it(files_diffusers, monkeypatch):
    # the tiny model's blocks are too small to be worth streaming: plan with FLUX's full-size blocks
    monkeypatch.setattr(fill, "part_blocks", lambda files, q, dtype: PARTS)
    monkeypatch.setattr(fill, "part_sizes", lambda files: {"transformer": FLUX.total, "text_encoders": T5.total
                                                           + CLIP.total, "vae": VAE.total})
    total = TOTAL
    budget = 12 * GiB
    spec = FluxFillSpec(files=files_diffusers, device="cuda", dtype="bf16", offload="auto")
    handle = fill.make_handle(spec, free_vram=budget)
    assert handle.offload == "budget" and handle.vram_budget == budget
    plan = fill.budget_plan(handle)
    assert plan.streams_anything and plan.resident["transformer"]
    assert fill.need_bytes(handle, budget) == plan.vram <= budget - ACTIVATION_RESERVE
    roomy = fill.make_handle(spec, free_vram=total + ACTIVATION_RESERVE)
    assert roomy.offload == "none" and roomy.vram_budget is None and fill.budget_plan(roomy) is None


# ------------------------------------------------------------------------------------- hooks on the modules


def _hook_names(module):
    reg = getattr(module, "_diffusers_hook", None)
    return set(reg.hooks) if reg is not None else set()


def _flux_inputs(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = t.config
    n_img, n_txt = 16, 8
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([30.0]),
                img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False)


@pytest.mark.parametrize("leaf", [False, True])
def test_stream_blocks_hooks_only_the_streamed_blocks_and_keeps_outputs(files_diffusers, leaf):
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_pretrained(files_diffusers.path, subfolder="transformer")
    x = _flux_inputs(t)
    with torch.no_grad():
        want = t(**x)[0]
    streamed = ["transformer_blocks.0", "single_transformer_blocks.0"]
    pipelines.stream_blocks(t, streamed, torch.device("cpu"), stream=None, leaf=leaf)
    assert "group_offloading" in _hook_names(t)  # the anchor: the pipeline reads its execution device here
    for path in streamed:
        block = t.get_submodule(path)
        hooked = [n for n, m in block.named_modules() if "group_offloading" in _hook_names(m)]
        if leaf:
            own = [n for n, m in block.named_modules() if next(m.parameters(recurse=False), None) is not None]
            assert sorted(hooked) == sorted(own) and "" not in hooked
        else:
            assert hooked == [""]
    resident = [n for n, m in t.named_modules() if "group_offloading" in _hook_names(m)
                and n and not any(n == p or n.startswith(p + ".") for p in streamed)]
    assert resident == []
    with torch.no_grad():
        got = t(**x)[0]
        again = t(**x)[0]
    assert torch.equal(got, want) and torch.equal(again, want)


def test_stream_blocks_moves_torchao_float8_weights(files_diffusers, monkeypatch):
    """fp8 weights (torchao tensor subclasses) go through the same hooks (on the CPU: quantized with torchao's
    GPU check switched off, since this machine has no float8 GPU)."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as qa
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(qa, "_check_hardware_support", lambda *_: None)
    from atelier.memory import diffusers_quant_config

    t = FluxTransformer2DModel.from_pretrained(files_diffusers.path, subfolder="transformer",
                                               torch_dtype=torch.bfloat16,
                                               quantization_config=diffusers_quant_config("fp8", torch.bfloat16))
    w = t.transformer_blocks[0].attn.to_q.weight
    assert "float8" in str(w.qdata.dtype)
    assert not pipelines.has_bnb(t)  # torchao modules are placed by Atelier, like plain ones
    pipelines.stream_blocks(t, ["transformer_blocks.0"], torch.device("cpu"), stream=None)
    assert "group_offloading" in _hook_names(t.transformer_blocks[0])
    assert "float8" in str(t.transformer_blocks[0].attn.to_q.weight.qdata.dtype)
