"""What every Atelier diffusers stage shares: building a pipeline with the chosen memory settings, and releasing it.

A stage (:mod:`atelier.fill`, :mod:`atelier.layers`) describes its model with a frozen spec carrying the loader's
inputs (``quantization``, ``offload``, ``dtype``, ``device``, ``vae_slicing``, ``vae_tiling``,
``first_block_cache`` and optionally ``attention_slicing``, ``compile``) and gets here:

* :func:`resolve`: offload mode, dtype and size estimate decided without loading anything;
* :func:`load_diffusers`: a diffusers folder with its big parts quantized (bitsandbytes);
* :class:`LoadedPipeline`: the built pipeline + what was decided, with ``resident_bytes`` / ``device`` /
  ``close()`` for the registry and ComfyUI's model management;
* :func:`apply_settings`: the toggles and the offload mode applied to the pipeline, the same way for every stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SettingError
from .memory import (
    Footprint,
    check_quantization,
    diffusers_quant_config,
    dtype_name,
    footprint,
    plan_offload,
    resident_vram,
    resolve_dtype,
    transformers_quant_config,
)

log = logging.getLogger("atelier")


# ------------------------------------------------------------------------------------------------ sizes


def bytes16(files: list[Path]) -> int:
    """Bytes of the tensors in these safetensors files if stored in 16 bit (headers only, nothing is loaded)."""
    from .weights import read_safetensors_header

    total = 0
    for f in files:
        for meta in read_safetensors_header(f).values():
            n = 1
            for d in meta["shape"]:
                n *= d
            total += 2 * n
    return total


def folder_bytes16(root: str | Path, *subfolders: str) -> int:
    """:func:`bytes16` of every ``*.safetensors`` in the given subfolders of a diffusers folder."""
    files: list[Path] = []
    for sub in subfolders:
        files += sorted((Path(root) / sub).glob("*.safetensors"))
    return bytes16(files)


# ------------------------------------------------------------------------------------------- decisions


def resolve(spec: Any, sizes: dict[str, int], free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    """Offload mode, dtype and why, plus the size estimate, for ``spec`` and the 16-bit ``sizes`` of its parts."""
    check_quantization(spec.quantization, spec.device)
    dtype = resolve_dtype(spec.dtype, spec.device)
    fp = footprint(sizes, spec.quantization, dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram)
    if not 0.0 <= spec.first_block_cache < 1.0:
        raise SettingError("first_block_cache between 0 (off) and 1", str(spec.first_block_cache), "Try 0.05–0.12.")
    return mode, dtype, why, fp


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class LoadedPipeline:
    """A built diffusers pipeline and what was decided while building it (a registry entry)."""

    pipe: Any
    spec: Any
    offload: str
    dtype: torch.dtype
    device: torch.device
    footprint: Footprint
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def resident_bytes(self) -> int:
        return resident_vram(self.offload, self.footprint)

    def close(self) -> None:
        """Remove offload hooks and drop every module so their memory can go."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        try:
            pipe.remove_all_hooks()
        except Exception:  # noqa: BLE001 - best effort: hooks may be half-installed after an error
            log.debug("Atelier: removing hooks failed", exc_info=True)
        for name in list(pipe.components):
            setattr(pipe, name, None)


# ---------------------------------------------------------------------------------------------- building


def load_diffusers(pipeline_cls: type, root: str, dtype: torch.dtype, quantization: str,
                   diffusers_parts: dict[str, type] | None = None,
                   transformers_parts: dict[str, type] | None = None):
    """``pipeline_cls.from_pretrained(root)`` offline, the named parts loaded first with bitsandbytes settings.

    ``diffusers_parts`` (e.g. the transformer) get diffusers' quantization config, ``transformers_parts`` (text
    encoders) transformers'; with quantization ``none`` they load plainly in ``dtype``.
    """
    qd = diffusers_quant_config(quantization, dtype)
    qt = transformers_quant_config(quantization, dtype)
    parts = {}
    for name, cls in (diffusers_parts or {}).items():
        parts[name] = cls.from_pretrained(root, subfolder=name, torch_dtype=dtype, quantization_config=qd,
                                          local_files_only=True)
    for name, cls in (transformers_parts or {}).items():
        parts[name] = cls.from_pretrained(root, subfolder=name, torch_dtype=dtype, quantization_config=qt,
                                          local_files_only=True)
    return pipeline_cls.from_pretrained(root, **parts, torch_dtype=dtype, local_files_only=True)


def build(model_cls: type, spec: Any, what: str, where: str, mode: str, dtype: torch.dtype, why: str, fp: Footprint,
          make_pipe: Callable[[], Any]):
    """``make_pipe()`` wrapped in a ``model_cls`` (a :class:`LoadedPipeline`) with the settings applied, logged."""
    t0 = time.perf_counter()
    log.info("Atelier: loading %s from %s (%s, quantization %s, offload %s: %s)",
             what, where, dtype_name(dtype), spec.quantization, mode, why)
    pipe = make_pipe()
    model = model_cls(pipe=pipe, spec=spec, offload=mode, dtype=dtype, device=torch.device(spec.device), footprint=fp)
    try:
        apply_settings(model)
    except Exception:
        model.close()
        raise
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: %s ready in %.1f s%s", what, model.load_seconds, "".join(f"; {n}" for n in model.notes))
    return model


def is_quantized(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_loaded_in_8bit", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "hf_quantizer", None) is not None or getattr(module, "is_quantized", False))


def has_8bit(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


def apply_settings(model: LoadedPipeline) -> None:
    """The loader's toggles, then the offload mode, then compilation (in that order: hooks before compile)."""
    pipe, spec = model.pipe, model.spec
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.vae_tiling:
        enable_vae_tiling(pipe.vae)
    if getattr(spec, "attention_slicing", False):
        from .attention import enable_sliced_attention

        enable_sliced_attention(pipe.transformer)
    if spec.first_block_cache > 0:
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=spec.first_block_cache))
    apply_offload(model)
    if getattr(spec, "compile", False):
        compile_transformer(model)


VAE_TILE = 512  # pixels


def enable_vae_tiling(vae: torch.nn.Module, tile: int = VAE_TILE) -> None:
    """diffusers' VAE tiling, with tiles of at most ``tile`` pixels. AutoencoderKL's default tile is its
    ``sample_size`` (1024 for FLUX's VAE), so a 1024² picture would not be tiled at all and its decode would stay
    the peak of the streaming modes (3.3 GiB at 1024²)."""
    vae.enable_tiling()
    size = getattr(vae, "tile_sample_min_size", None)
    if isinstance(size, int) and size > tile:
        factor = size // vae.tile_latent_min_size  # the VAE's downscale (8 for FLUX)
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // factor


def compile_transformer(model: LoadedPipeline) -> None:
    """torch.compile the transformer's repeated blocks (regional compilation: each block type compiles once, so
    the first run pays seconds, not minutes). Layer streaming hooks (``sequential``) break graphs every layer,
    so compilation is skipped there and the node says so."""
    transformer = model.pipe.transformer
    if model.offload == "sequential":
        model.notes.append("compile skipped: sequential offload streams every layer (nothing to fuse)")
        return
    if model.device.type == "cuda":
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True  # a few % on the GEMM epilogues (diffusers' fast-FLUX recipe)
    if hasattr(transformer, "compile_repeated_blocks") and getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    else:
        transformer.compile(fullgraph=False, dynamic=False)
    model.notes.append("transformer compiled (torch.compile): the first run includes compilation")


def _pin_parameterless_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Group offloading streams layers with weights; buffers of weightless modules (rotary ``inv_freq``) would stay
    on the CPU and meet CUDA tensors (transformers' Qwen2.5-VL under generate). They are tiny: keep them on the GPU."""
    for sub in module.modules():
        if next(sub.parameters(recurse=False), None) is None:
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and buf.device != device:
                    sub._buffers[name] = buf.to(device)


def apply_offload(model: LoadedPipeline) -> None:
    pipe, mode, device = model.pipe, model.offload, model.device
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    quantized = [n for n, m in modules.items() if is_quantized(m)]
    if device.type != "cuda" or mode == "none":
        for name, m in modules.items():
            if name not in quantized:  # bitsandbytes modules are placed on the GPU when loaded
                m.to(device)
        return
    if mode == "model":
        # 8-bit bitsandbytes layers cannot move with .to(): keep them resident, offload the rest part by part
        keep = [n for n in quantized if getattr(modules[n], "is_loaded_in_8bit", False) or has_8bit(modules[n])]
        if keep:
            pipe._exclude_from_cpu_offload = list(keep)
            model.notes.append(f"int8 parts stay on the GPU under model offload ({', '.join(keep)})")
        pipe.enable_model_cpu_offload(device=device)
        return
    if mode == "sequential":
        from diffusers.hooks import apply_group_offloading

        for name, m in modules.items():
            if name in quantized and has_8bit(m):
                # LLM.int8 weights carry their row statistics outside the parameter: streaming the parameter
                # alone would keep a second copy resident. Keep 8-bit parts on the GPU.
                model.notes.append(f"{name} ({model.spec.quantization}) stays on the GPU; other parts stream")
                continue
            # nf4 layers stream like the others: their packed 4-bit weights are the parameters (the small
            # quantisation statistics stay on the GPU), so each step moves a quarter of the bf16 bytes
            apply_group_offloading(m, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True)
            _pin_parameterless_buffers(m, device)
        return
    raise SettingError("offload none, model or sequential", repr(mode), "Pick one of the listed values.")
