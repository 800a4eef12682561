"""fp8 quantization (torchao float8) on a GPU with float8 matmuls (compute capability 8.9+): parity of a Linear
against plain torch bf16, the tiny FLUX Fill in fp8 resident (and compiled, and through auto), offload model/sequential refused."""

from __future__ import annotations

import logging
import pytest
import torch

from atelier import fill, stage
from atelier.errors import SettingError
from atelier.memory import diffusers_quant_config, transformers_quant_config
from atelier.registry import REGISTRY
from atelier.types import FluxFillFiles, FluxFillSpec

log = logging.getLogger("atelier.tests")

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def fp8_gpu():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with float8 matmuls (compute capability 8.9+)")
    pytest.importorskip("torchao")
    REGISTRY.release_all()
    yield
    REGISTRY.release_all()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("which", ["diffusers", "transformers"])
def test_fp8_linear_matches_bf16_torch(which):
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    ref = torch.nn.Linear(3072, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(x)
        q = torch.nn.Linear(3072, 4096, bias=True, device="cuda", dtype=torch.bfloat16)
        q.load_state_dict(ref.state_dict())
        cfg = (diffusers_quant_config if which == "diffusers" else transformers_quant_config)("fp8", torch.bfloat16)
        quantize_(q, cfg.quant_type)
        got = q(x)
    assert "float8" in str(getattr(q.weight, "qdata", q.weight).dtype)  # stored in float8
    err = _rel(got, want)
    log.info(f"fp8 ({which}) relative error vs bf16: {err:.4f}")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert err < 0.06  # e4m3 keeps 3 mantissa bits: ~2-4 % on a random matmul


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_fp8_with_offload_is_refused_with_the_fix(tiny_dir, offload):
    """torchao float8 weights cannot move under offload hooks (H200, torchao 0.18: 'Attempted to set the storage of
    a tensor on device cuda:0 to a storage on different device cpu'): the loader says so before loading."""
    spec = FluxFillSpec(files=FluxFillFiles("diffusers", str(tiny_dir)), quantization="fp8", offload=offload,
                        device="cuda")
    with pytest.raises(SettingError) as e:
        fill.make_handle(spec)
    assert "offload to none" in e.value.fix


@pytest.mark.parametrize("offload,compile_", [("none", False), ("none", True), ("auto", False)])
def test_tiny_flux_fill_in_fp8(tiny_dir, offload, compile_):
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:48, 24:72] = 1
    spec = FluxFillSpec(files=FluxFillFiles("diffusers", str(tiny_dir)), quantization="fp8", offload=offload,
                        device="cuda", compile=compile_)
    model = stage.get(fill.STAGE, fill.make_handle(spec))
    fp8 = [n for n, m in model.pipe.transformer.named_modules()
           if isinstance(m, torch.nn.Linear) and "float8" in str(getattr(m.weight, "qdata", m.weight).dtype)]
    assert fp8, "no transformer Linear was quantized to float8"
    out = fill.inpaint(model, image, mask, "a lamp", steps=2, seed=1)
    assert torch.isfinite(out).all()
    keep = mask.unsqueeze(-1).expand_as(out) == 0
    assert torch.equal(out[keep], image[keep])
    REGISTRY.release_all()
    bf16 = stage.get(fill.STAGE, fill.make_handle(FluxFillSpec(files=FluxFillFiles("diffusers", str(tiny_dir)),
                                                               device="cuda", offload="none")))
    ref = fill.inpaint(bf16, image, mask, "a lamp", steps=2, seed=1)
    log.info(f"tiny FLUX Fill fp8 ({offload}, compile {compile_}) vs bf16: max abs {float((out - ref).abs().max()):.4f}")
    assert float((out - ref).abs().mean()) < 0.05
