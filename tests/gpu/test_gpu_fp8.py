"""fp8 quantization (torchao float8) on a GPU with float8 matmuls (compute capability 8.9+): parity of a Linear
against plain torch bf16, and the tiny FLUX Fill through every offload mode (and compile) in fp8."""

from __future__ import annotations

import pytest
import torch

from atelier import fill, stage
from atelier.memory import diffusers_quant_config, transformers_quant_config
from atelier.registry import REGISTRY
from atelier.types import FluxFillFiles, FluxFillSpec

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
    print(f"fp8 ({which}) relative error vs bf16: {err:.4f}")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert err < 0.06  # e4m3 keeps 3 mantissa bits: ~2-4 % on a random matmul


@pytest.mark.parametrize("offload,compile_", [("none", False), ("none", True), ("model", False),
                                               ("sequential", False), ("auto", False)])
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
    print(f"tiny FLUX Fill fp8 ({offload}, compile {compile_}) vs bf16: max abs {float((out - ref).abs().max()):.4f}")
    assert float((out - ref).abs().mean()) < 0.05
