"""Memory/speed settings mapped onto torch, diffusers and bitsandbytes.

Pure decisions (which dtype, which offload mode fits, what quantization config) live here and are unit-tested;
applying them to a pipeline happens in the stage modules (:mod:`atelier.fill`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SettingError

log = logging.getLogger("atelier")

GiB = 1024**3


def transformers_dtype_kwarg() -> str:
    """from_pretrained's dtype argument: transformers 4.56 renamed ``torch_dtype`` to ``dtype``."""
    import re

    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _DTYPES.items()}


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def resolve_dtype(choice: str, device: str | torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """``auto`` = bf16 on GPUs that support it, fp16 on older GPUs (e.g. RTX 20xx), fp32 on CPU."""
    if choice in _DTYPES:
        return _DTYPES[choice]
    if choice != "auto":
        raise SettingError("dtype one of auto, bf16, fp16, fp32", repr(choice), "Pick one of the listed values.")
    if not is_cuda(device):
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def _bnb_config(module: str, bits: int, dtype: torch.dtype):
    """bitsandbytes settings as diffusers' or transformers' ``BitsAndBytesConfig`` (``module``: which library)."""
    cls = importlib.import_module(module).BitsAndBytesConfig
    if bits == 4:
        return cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return cls(load_in_8bit=True)


@dataclass(frozen=True)
class QuantMode:
    """One row of the quantization table: everything Atelier needs to know about a weight format.

    ``bytes_factor``: bytes per parameter relative to 16-bit storage (VRAM estimates). ``streams``: its layers can
    be streamed from RAM by offload ``sequential``/``model`` through accelerate's hooks (bitsandbytes' 4-bit
    layers cannot be dispatched by accelerate, see the captioner). ``needs_cuda``: only runs on NVIDIA GPUs.
    ``diffusers`` / ``transformers``: dtype → the library's quantization config for the big parts (None = plain).
    """

    name: str
    bytes_factor: float
    streams: bool
    needs_cuda: bool
    tooltip: str
    diffusers: Callable[[torch.dtype], Any] | None = None
    transformers: Callable[[torch.dtype], Any] | None = None


QUANT_MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("none", 1.0, True, False, "none = bf16/fp16 weights"),
    QuantMode("int8", 0.52, True, True, "int8 = LLM.int8 (bitsandbytes)",
              diffusers=lambda d: _bnb_config("diffusers", 8, d),
              transformers=lambda d: _bnb_config("transformers", 8, d)),
    QuantMode("nf4", 0.29, False, True, "nf4 = 4-bit NormalFloat (bitsandbytes)",
              diffusers=lambda d: _bnb_config("diffusers", 4, d),
              transformers=lambda d: _bnb_config("transformers", 4, d)),
)}
"""Adding a quantization mode is one row here plus whatever its configs need; combos and tooltips derive from it."""

QUANTIZATIONS: tuple[str, ...] = tuple(QUANT_MODES)


def quant_mode(quantization: str) -> QuantMode:
    mode = QUANT_MODES.get(quantization)
    if mode is None:
        raise SettingError(f"quantization one of {', '.join(QUANT_MODES)}", repr(quantization),
                           "Pick one of the listed values.")
    return mode


def quantization_tooltip(applies_to: str) -> str:
    """The loaders' quantization tooltip, from the table: ``applies_to`` says which parts are quantized."""
    gpu = [m.name for m in QUANT_MODES.values() if m.needs_cuda]
    return "; ".join(m.tooltip for m in QUANT_MODES.values()) + f": {applies_to}. {', '.join(gpu)} need an NVIDIA GPU."


def check_quantization(quantization: str, device: str | torch.device) -> None:
    mode = quant_mode(quantization)
    if mode.needs_cuda and not is_cuda(device):
        raise SettingError(
            f"a CUDA GPU for quantization '{quantization}' (bitsandbytes kernels through diffusers)",
            f"device '{device}'", "Choose quantization 'none' on this machine, or run ComfyUI on an NVIDIA GPU.")


def diffusers_quant_config(quantization: str, dtype: torch.dtype):
    """diffusers' quantization config for the transformer, or None."""
    make = quant_mode(quantization).diffusers
    return make(dtype) if make else None


def transformers_quant_config(quantization: str, dtype: torch.dtype):
    """transformers' quantization config for text encoders / VLMs, or None."""
    make = quant_mode(quantization).transformers
    return make(dtype) if make else None


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of each pipeline part once loaded in the run dtype / quantization."""

    transformer: int
    text_encoders: int
    vae: int

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoders + self.vae

    @property
    def largest(self) -> int:
        return max(self.transformer, self.text_encoders, self.vae)


def footprint(param_bytes_bf16: dict[str, int], quantization: str, dtype: torch.dtype) -> Footprint:
    """``param_bytes_bf16``: bytes of each part if stored in 16 bit (transformer, text_encoders, vae)."""
    scale = 2.0 if dtype == torch.float32 else 1.0
    q = quant_mode(quantization).bytes_factor
    return Footprint(
        transformer=int(param_bytes_bf16.get("transformer", 0) * (q if q < 1 else scale)),
        text_encoders=int(param_bytes_bf16.get("text_encoders", 0) * (q if q < 1 else scale)),
        vae=int(param_bytes_bf16.get("vae", 0) * scale),
    )


# activations of a 1024² FLUX step + VAE decode headroom
ACTIVATION_RESERVE = int(3.0 * GiB)


def plan_offload(choice: str, device: str | torch.device, fp: Footprint, free_vram: int | None) -> tuple[str, str]:
    """Resolve ``offload`` to none / model / sequential; returns (mode, reason)."""
    if choice not in ("auto", "none", "model", "sequential"):
        raise SettingError("offload one of auto, none, model, sequential", repr(choice), "Pick one of the listed values.")
    if not is_cuda(device):
        if choice not in ("auto", "none"):
            return "none", f"offload '{choice}' moves weights between CPU and GPU; on the CPU everything already lives in RAM"
        return "none", "CPU run"
    if choice != "auto":
        return choice, "chosen"
    if free_vram is None:
        free_vram, _ = torch.cuda.mem_get_info(torch.device(device))
    if fp.total + ACTIVATION_RESERVE <= free_vram:
        return "none", f"everything fits ({fp.total / GiB:.1f} GiB of {free_vram / GiB:.1f} GiB free)"
    if fp.largest + ACTIVATION_RESERVE <= free_vram:
        return "model", f"one part at a time fits ({fp.largest / GiB:.1f} GiB of {free_vram / GiB:.1f} GiB free)"
    return "sequential", f"only streaming fits ({free_vram / GiB:.1f} GiB free)"


def resident_vram(mode: str, fp: Footprint) -> int:
    """What ComfyUI should reserve for us in each mode (weights that stay on the GPU)."""
    if mode == "none":
        return fp.total
    if mode == "model":
        return fp.largest
    return int(0.7 * GiB)
