"""Memory/speed settings mapped onto torch, diffusers and bitsandbytes.

Pure decisions (which dtype, which offload mode fits, what quantization config) live here and are unit-tested;
applying them to a pipeline happens in the stage modules (:mod:`atelier.fill`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import SettingError

log = logging.getLogger("atelier")

GiB = 1024**3

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


def check_quantization(quantization: str, device: str | torch.device) -> None:
    if quantization not in ("none", "int8", "nf4"):
        raise SettingError("quantization one of none, int8, nf4", repr(quantization), "Pick one of the listed values.")
    if quantization != "none" and not is_cuda(device):
        raise SettingError(
            f"a CUDA GPU for quantization '{quantization}' (bitsandbytes kernels through diffusers)",
            f"device '{device}'", "Choose quantization 'none' on this machine, or run ComfyUI on an NVIDIA GPU.")


def diffusers_quant_config(quantization: str, dtype: torch.dtype):
    """diffusers' BitsAndBytesConfig for the transformer, or None."""
    if quantization == "none":
        return None
    from diffusers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def transformers_quant_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the T5 text encoder (the second biggest part), or None."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


# bytes per parameter relative to bf16 storage, for the VRAM estimate of each quantization
_QUANT_FACTOR = {"none": 1.0, "int8": 0.52, "nf4": 0.29}


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
    q = _QUANT_FACTOR[quantization]
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
