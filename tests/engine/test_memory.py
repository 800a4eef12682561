"""Memory decisions: dtype, quantization configs, VRAM estimates and the offload plan (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import SettingError
from atelier.memory import (
    ACTIVATION_RESERVE,
    QUANT_MODES,
    QUANTIZATIONS,
    GiB,
    Footprint,
    check_quantization,
    diffusers_quant_config,
    dtype_name,
    footprint,
    plan_offload,
    quantization_tooltip,
    resident_vram,
    resolve_dtype,
    transformers_quant_config,
)

# ------------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_auto_dtype_is_fp32_on_cpu(device):
    assert resolve_dtype("auto", device) is torch.float32
    # bf16 support of some GPU does not matter on the CPU
    assert resolve_dtype("auto", device, bf16_supported=True) is torch.float32


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_auto_dtype_on_gpus_follows_bf16_support(device):
    assert resolve_dtype("auto", device, bf16_supported=True) is torch.bfloat16
    assert resolve_dtype("auto", device, bf16_supported=False) is torch.float16


@pytest.mark.parametrize("choice,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_dtypes_are_kept(choice, dtype, device):
    assert resolve_dtype(choice, device, bf16_supported=False) is dtype
    assert dtype_name(dtype) == choice


@pytest.mark.parametrize("bad", ["float32", "BF16", "", "int8"])
def test_unknown_dtype_is_a_setting_error(bad):
    with pytest.raises(SettingError) as e:
        resolve_dtype(bad, "cpu")
    assert repr(bad) in str(e.value)
    for name in ("auto", "bf16", "fp16", "fp32"):
        assert name in e.value.expected


# ------------------------------------------------------------------------------------------ quantization


def test_no_quantization_is_fine_on_cpu():
    check_quantization("none", "cpu")
    check_quantization("none", torch.device("cpu"))


@pytest.mark.parametrize("q", ["int8", "nf4", "fp8"])
def test_quantization_on_cpu_is_refused_and_points_to_none(q):
    with pytest.raises(SettingError) as e:
        check_quantization(q, "cpu")
    assert q in str(e.value)
    assert "'none'" in e.value.fix
    assert "cpu" in e.value.received


@pytest.mark.parametrize("q", ["none", "int8", "nf4"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_quantization_on_cuda_is_accepted(q, device):
    check_quantization(q, device)  # a device name only: no GPU is touched


def test_unknown_quantization_is_refused():
    with pytest.raises(SettingError, match="'fp4'"):
        check_quantization("fp4", "cuda")


# ------------------------------------------------------------------------------------------------- fp8


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_fp8_is_one_row_of_the_table():
    mode = QUANT_MODES["fp8"]
    assert "fp8" in QUANTIZATIONS and QUANTIZATIONS[-1] == "fp8"  # added last: saved combo values keep their place
    assert mode.needs_cuda and mode.min_capability == (8, 9) and mode.package == "torchao"
    assert 0.5 <= mode.bytes_factor <= 0.6  # one byte per weight + per-row scales
    assert "fp8" in quantization_tooltip("transformer and T5 quantized")


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (8, 7)])
def test_fp8_on_a_gpu_without_float8_names_nf4(monkeypatch, capability):
    _fake_gpu(monkeypatch, capability)
    with pytest.raises(SettingError) as e:
        check_quantization("fp8", "cuda:0")
    assert f"{capability[0]}.{capability[1]}" in e.value.received
    assert "8.9" in e.value.expected
    assert "'nf4'" in e.value.fix
    check_quantization("nf4", "cuda:0")  # the alternative it names is accepted on the same GPU


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_on_ada_hopper_blackwell_is_accepted(monkeypatch, capability):
    _fake_gpu(monkeypatch, capability)
    check_quantization("fp8", "cuda")


def test_fp8_without_torchao_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    _fake_gpu(monkeypatch, (9, 0))
    with pytest.raises(SettingError) as e:
        check_quantization("fp8", "cuda")
    assert "pip install torchao" in e.value.fix and "nf4" in e.value.fix


def test_fp8_configs_are_torchao_float8():
    pytest.importorskip("torchao")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow

    d = diffusers_quant_config("fp8", torch.bfloat16)
    t = transformers_quant_config("fp8", torch.bfloat16)
    assert type(d).__module__.startswith("diffusers") and type(d).__name__ == "TorchAoConfig"
    assert type(t).__module__.startswith("transformers") and type(t).__name__ == "TorchAoConfig"
    # the denoiser: float8 weights and per-row float8 activations (scaled matmul); text encoders: weight-only
    assert isinstance(d.quant_type, Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, PerRow) for g in d.quant_type.granularity)
    assert d.quant_type.weight_dtype == torch.float8_e4m3fn
    assert isinstance(t.quant_type, Float8WeightOnlyConfig)


def test_fp8_runs_in_bf16_only():
    from atelier.memory import check_quant_dtype

    check_quant_dtype("fp8", torch.bfloat16)
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(SettingError) as e:
            check_quant_dtype("fp8", dtype)
        assert "bf16" in e.value.fix
    check_quant_dtype("nf4", torch.float16)  # the others take any dtype


def test_fp8_footprint_is_about_half():
    fp8, full = footprint(SIZES, "fp8", torch.bfloat16), footprint(SIZES, "none", torch.bfloat16)
    assert 0.5 * full.transformer <= fp8.transformer <= 0.6 * full.transformer
    assert full.vae == fp8.vae


def test_nf4_configs():
    d = diffusers_quant_config("nf4", torch.bfloat16)
    t = transformers_quant_config("nf4", torch.float16)
    assert type(d).__module__.startswith("diffusers")
    assert type(t).__module__.startswith("transformers")
    for cfg, dtype in ((d, torch.bfloat16), (t, torch.float16)):
        assert cfg.load_in_4bit is True and cfg.load_in_8bit is False
        assert cfg.bnb_4bit_quant_type == "nf4"
        assert cfg.bnb_4bit_compute_dtype == dtype


def test_int8_configs():
    for cfg in (diffusers_quant_config("int8", torch.bfloat16), transformers_quant_config("int8", torch.bfloat16)):
        assert cfg.load_in_8bit is True and cfg.load_in_4bit is False


def test_no_quantization_has_no_config():
    assert diffusers_quant_config("none", torch.bfloat16) is None
    assert transformers_quant_config("none", torch.float32) is None


# ------------------------------------------------------------------------------------------- footprint

SIZES = {"transformer": 12 * GiB, "text_encoders": 5 * GiB, "vae": GiB // 2}


def test_footprint_in_16_bit_is_the_16_bit_size():
    for dtype in (torch.bfloat16, torch.float16):
        fp = footprint(SIZES, "none", dtype)
        assert fp.transformer == SIZES["transformer"]
        assert fp.text_encoders == SIZES["text_encoders"]
        assert fp.vae == SIZES["vae"]
        assert fp.total == sum(SIZES.values())
        assert fp.largest == SIZES["transformer"]


def test_footprint_in_fp32_doubles():
    fp16, fp32 = footprint(SIZES, "none", torch.bfloat16), footprint(SIZES, "none", torch.float32)
    assert fp32.transformer == 2 * fp16.transformer
    assert fp32.text_encoders == 2 * fp16.text_encoders
    assert fp32.vae == 2 * fp16.vae
    assert fp32.total == 2 * fp16.total


def test_quantization_shrinks_the_quantized_parts_only():
    full = footprint(SIZES, "none", torch.bfloat16)
    int8 = footprint(SIZES, "int8", torch.bfloat16)
    nf4 = footprint(SIZES, "nf4", torch.bfloat16)
    # int8 stores one byte per weight (+ scales), nf4 half a byte (+ scales): about 1/2 and 1/4 of 16 bit
    assert 0.5 * full.transformer <= int8.transformer <= 0.6 * full.transformer
    assert 0.25 * full.transformer <= nf4.transformer <= 0.35 * full.transformer
    assert nf4.transformer < int8.transformer < full.transformer
    assert nf4.text_encoders < int8.text_encoders < full.text_encoders
    assert int8.vae == nf4.vae == full.vae  # the VAE is never quantized
    # quantized weights do not grow with an fp32 run dtype; the VAE does
    nf4_32 = footprint(SIZES, "nf4", torch.float32)
    assert nf4_32.transformer == nf4.transformer
    assert nf4_32.vae == 2 * nf4.vae


def test_footprint_of_missing_parts_is_zero():
    fp = footprint({"transformer": 100}, "none", torch.bfloat16)
    assert (fp.transformer, fp.text_encoders, fp.vae) == (100, 0, 0)


# ------------------------------------------------------------------------------------------- plan_offload

FP = Footprint(transformer=10 * GiB, text_encoders=5 * GiB, vae=GiB)


@pytest.mark.parametrize("choice", ["auto", "none", "model", "sequential"])
def test_on_cpu_every_choice_runs_without_offload(choice):
    mode, reason = plan_offload(choice, "cpu", FP, free_vram=None)
    assert mode == "none"
    assert reason.strip()


def test_on_cpu_an_explicit_offload_says_why_it_is_ignored():
    _, reason = plan_offload("sequential", "cpu", FP, free_vram=None)
    assert "sequential" in reason and "CPU" in reason


def test_auto_offload_thresholds():
    need_all = FP.total + ACTIVATION_RESERVE
    need_one = FP.largest + ACTIVATION_RESERVE
    assert need_one < need_all
    cases = [
        (need_all + 10 * GiB, "none"),
        (need_all, "none"),
        (need_all - 1, "model"),
        (need_one, "model"),
        (need_one - 1, "sequential"),
        (GiB, "sequential"),
    ]
    for free, expected in cases:
        mode, reason = plan_offload("auto", "cuda", FP, free_vram=free)
        assert mode == expected, (free, mode, reason)
        assert f"{free / GiB:.1f} GiB" in reason


def test_auto_offload_uses_the_quantized_footprint():
    sizes = {"transformer": 24 * GiB, "text_encoders": 10 * GiB, "vae": GiB // 4}
    free = 16 * GiB
    full = footprint(sizes, "none", torch.bfloat16)
    nf4 = footprint(sizes, "nf4", torch.bfloat16)
    assert plan_offload("auto", "cuda", full, free)[0] == "sequential"
    assert plan_offload("auto", "cuda", nf4, free)[0] == "none"


@pytest.mark.parametrize("choice", ["none", "model", "sequential"])
def test_explicit_offload_on_cuda_is_kept(choice):
    for free in (0, 1000 * GiB):
        mode, reason = plan_offload(choice, "cuda:0", FP, free_vram=free)
        assert mode == choice
        assert reason


def test_unknown_offload_is_refused():
    with pytest.raises(SettingError, match="'cpu'"):
        plan_offload("cpu", "cuda", FP, free_vram=0)
    with pytest.raises(SettingError):
        plan_offload("", "cpu", FP, free_vram=0)


def test_resident_vram_per_mode():
    assert resident_vram("none", FP) == FP.total
    assert resident_vram("model", FP) == FP.largest
    seq = resident_vram("sequential", FP)
    assert 0 < seq < FP.largest
    # streaming keeps about the same small amount whatever the model's size
    assert resident_vram("sequential", Footprint(100 * GiB, 50 * GiB, GiB)) == seq


def test_footprint_properties():
    fp = Footprint(transformer=3, text_encoders=7, vae=2)
    assert fp.total == 12
    assert fp.largest == 7
