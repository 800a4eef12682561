"""The memory/speed inputs every Atelier loader shares (same names, options, defaults and meaning), so that the
FLUX Fill, Qwen-Image-Layered and VLM loaders cannot drift apart. Each node still lists its inputs in its own
order: saved workflows give widget values by position."""

from __future__ import annotations

from comfy_api.latest import io

from ..atelier.memory import QUANTIZATIONS, quantization_tooltip
from ..atelier.types import DTYPES, OFFLOADS


def quantization(quantized: str) -> io.Combo.Input:
    """``quantized``: what the choice applies to, for the tooltip ("transformer and T5 quantized")."""
    return io.Combo.Input("quantization", options=list(QUANTIZATIONS), default="none",
                          tooltip=quantization_tooltip(quantized))


def offload() -> io.Combo.Input:
    """The diffusers pipelines' offload modes."""
    return io.Combo.Input("offload", options=list(OFFLOADS), default="auto",
                          tooltip="auto = fastest mode that fits the free VRAM; none = all on the GPU; model = "
                                  "one part on the GPU at a time; sequential = stream layers from RAM "
                                  "(lowest VRAM, diffusers group offloading with CUDA streams).")


def vae_slicing(tooltip: str) -> io.Boolean.Input:
    return io.Boolean.Input("vae_slicing", default=False, tooltip=tooltip)


def vae_tiling(tooltip: str) -> io.Boolean.Input:
    return io.Boolean.Input("vae_tiling", default=False, tooltip=tooltip)


def first_block_cache() -> io.Float.Input:
    return io.Float.Input("first_block_cache", default=0.0, min=0.0, max=0.99, step=0.01,
                          tooltip="FirstBlockCache threshold (0 = off). 0.05–0.12 skips steps whose first "
                                  "block barely changes: faster, slightly different pixels.")


def dtype() -> io.Combo.Input:
    return io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                          tooltip="auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.")
