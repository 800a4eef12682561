"""Typed values that travel between nodes: specs (what the user chose) and handles (what was built).

Handles never hold a loaded model: the model lives in :mod:`atelier.registry`, keyed by its spec, so that
ComfyUI's Unload button can drop it even while ComfyUI's output cache still holds the handle. A handle whose
model was released rebuilds it on the next use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Offload = Literal["auto", "none", "model", "sequential"]
DType = Literal["auto", "bf16", "fp16", "fp32"]

OFFLOADS: tuple[str, ...] = ("auto", "none", "model", "sequential")
DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class FluxFillFiles:
    """Where a FLUX.1 Fill model's parts are on disk.

    ``layout == "diffusers"``: ``path`` is a folder with model_index.json (FluxFillPipeline).
    ``layout == "single_file"``: ``path`` is the transformer file (BFL/ComfyUI key names) and the other parts are
    single files too; tokenizers come from folders (ComfyUI ships CLIP-L's and T5's).
    """

    layout: Literal["diffusers", "single_file"]
    path: str
    clip_l: str | None = None
    t5xxl: str | None = None
    vae: str | None = None
    clip_tokenizer: str | None = None
    t5_tokenizer: str | None = None


@dataclass(frozen=True)
class FluxFillSpec:
    """Everything that decides how a FLUX Fill pipeline is built; equal specs share one loaded pipeline."""

    files: FluxFillFiles
    quantization: str = "none"
    offload: str = "auto"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    first_block_cache: float = 0.0
    dtype: str = "auto"
    device: str = "cpu"
    compile: bool = False


@dataclass(frozen=True)
class FluxFillHandle:
    """What the loader node outputs (ATELIER_FLUX_FILL): the spec, and what the loader resolved."""

    spec: FluxFillSpec
    offload: str  # resolved mode: none / model / sequential / budget
    dtype: str  # resolved: bf16 / fp16 / fp32
    loras: tuple = ()  # atelier.lora.LoraRef chained by LoRA nodes; the base pipeline is cached without them
    vram_budget: int | None = None  # offload "budget": the free VRAM (bytes) the plan was made for
