"""FLUX.1 Fill: build a pipeline from either on-disk layout with the chosen memory settings, and inpaint with it.

``load(spec)`` builds a :class:`FluxFillModel`; ``inpaint(model, image, mask, ...)`` runs it. Both are plain
functions over torch tensors in ComfyUI's conventions (IMAGE BHWC, MASK BHW, 1 = repaint) so they are tested
without ComfyUI and reproduce plain diffusers: the same weights, inputs and seed give the same pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import flux_files
from .errors import InputError, ModelFileError, SettingError
from .images import check_image, check_mask, composite, match_mask_to_images, pad_to_multiple, to_bchw, to_bhwc
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
from .progress import NullProgress, Progress
from .registry import REGISTRY
from .types import FluxFillFiles, FluxFillHandle, FluxFillSpec

log = logging.getLogger("atelier")

T5_MAX_LENGTH = 512


# ------------------------------------------------------------------------------------------------ sizes


def _bytes16(files: list[Path]) -> int:
    total = 0
    for f in files:
        for meta in flux_files.read_safetensors_header(f).values():
            n = 1
            for d in meta["shape"]:
                n *= d
            total += 2 * n
    return total


def part_sizes(files: FluxFillFiles) -> dict[str, int]:
    """Bytes of each part in 16-bit, read from safetensors headers (no tensor is loaded)."""
    if files.layout == "diffusers":
        root = Path(files.path)
        return {
            "transformer": _bytes16(sorted((root / "transformer").glob("*.safetensors"))),
            "text_encoders": _bytes16(sorted((root / "text_encoder").glob("*.safetensors"))
                                      + sorted((root / "text_encoder_2").glob("*.safetensors"))),
            "vae": _bytes16(sorted((root / "vae").glob("*.safetensors"))),
        }
    return {
        "transformer": _bytes16([Path(files.path)]),
        "text_encoders": _bytes16([Path(p) for p in (files.clip_l, files.t5xxl) if p]),
        "vae": _bytes16([Path(files.vae)] if files.vae else []),
    }


def check_files(files: FluxFillFiles) -> None:
    """Everything the loader needs is on disk and of the right kind, or a ModelFileError that lists it."""
    if files.layout == "diffusers":
        flux_files.check_diffusers_folder(files.path)
        return
    if not os.path.isfile(files.path):
        raise ModelFileError("a FLUX.1 Fill transformer file", f"'{files.path}'", "Put flux1-fill-dev.safetensors in models/diffusion_models.")
    if not flux_files.is_flux_fill_transformer_file(files.path):
        raise ModelFileError("a FLUX.1 Fill transformer (image + mask input channels)", f"'{Path(files.path).name}'",
                             "This looks like another FLUX model; pick flux1-fill-dev.safetensors.")
    flux_files.require_file(files.clip_l, "clip_l", "text_encoders")
    flux_files.require_file(files.t5xxl, "t5xxl", "text_encoders")
    flux_files.require_file(files.vae, "vae", "vae")
    for tok, name in ((files.clip_tokenizer, "CLIP tokenizer"), (files.t5_tokenizer, "T5 tokenizer")):
        if not tok or not os.path.isdir(tok):
            raise ModelFileError(f"the {name} folder", f"'{tok}'", "ComfyUI ships both tokenizers; reinstall ComfyUI if they are missing.")


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class FluxFillModel:
    """A built FluxFillPipeline and what was decided while building it."""

    pipe: Any
    spec: FluxFillSpec
    offload: str
    dtype: torch.dtype
    device: torch.device
    footprint: Footprint
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE downscale × 2×2 latent packing)."""
        return self.pipe.vae_scale_factor * 2

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


def resolve(spec: FluxFillSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    """Offload mode, dtype and why, plus the size estimate, without loading anything."""
    check_quantization(spec.quantization, spec.device)
    dtype = resolve_dtype(spec.dtype, spec.device)
    fp = footprint(part_sizes(spec.files), spec.quantization, dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram)
    if not 0.0 <= spec.first_block_cache < 1.0:
        raise SettingError("first_block_cache between 0 (off) and 1", str(spec.first_block_cache), "Try 0.05–0.12.")
    return mode, dtype, why, fp


def make_handle(spec: FluxFillSpec, free_vram: int | None = None) -> FluxFillHandle:
    check_files(spec.files)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return FluxFillHandle(spec=spec, offload=mode, dtype=dtype_name(dtype))


def get_model(handle: FluxFillHandle) -> FluxFillModel:
    """The loaded pipeline for ``handle`` (built now if it was never loaded or was released)."""
    return REGISTRY.get_or_build(handle.spec, lambda: load(handle.spec, offload=handle.offload), group="flux_fill")


def load(spec: FluxFillSpec, offload: str | None = None) -> FluxFillModel:
    check_files(spec.files)
    mode, dtype, why, fp = resolve(spec)
    if offload is not None:
        mode = offload
    device = torch.device(spec.device)
    t0 = time.perf_counter()
    log.info("Atelier: loading FLUX.1 Fill from %s (%s, quantization %s, offload %s: %s)",
             spec.files.path, dtype_name(dtype), spec.quantization, mode, why)
    pipe = _build_pipeline(spec.files, dtype, spec.quantization)
    model = FluxFillModel(pipe=pipe, spec=spec, offload=mode, dtype=dtype, device=device, footprint=fp)
    try:
        _apply_settings(model)
    except Exception:
        model.close()
        raise
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: FLUX.1 Fill ready in %.1f s%s", model.load_seconds,
             "".join(f"; {n}" for n in model.notes))
    return model


def _build_pipeline(files: FluxFillFiles, dtype: torch.dtype, quantization: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    qd = diffusers_quant_config(quantization, dtype)
    qt = transformers_quant_config(quantization, dtype)
    if files.layout == "diffusers":
        root = files.path
        transformer = FluxTransformer2DModel.from_pretrained(
            root, subfolder="transformer", torch_dtype=dtype, quantization_config=qd, local_files_only=True)
        t5 = T5EncoderModel.from_pretrained(
            root, subfolder="text_encoder_2", torch_dtype=dtype, quantization_config=qt, local_files_only=True)
        return FluxFillPipeline.from_pretrained(
            root, transformer=transformer, text_encoder_2=t5, torch_dtype=dtype, local_files_only=True)

    from safetensors.torch import load_file

    cfg = flux_files.flux_transformer_config(files.path)
    state = flux_files.bfl_to_diffusers(load_file(files.path))
    transformer = FluxTransformer2DModel.from_single_file(
        state, config=str(flux_files.config_dir("flux-transformer", files.path, cfg)),
        torch_dtype=dtype, quantization_config=qd, local_files_only=True)
    del state
    vae = AutoencoderKL.from_single_file(
        files.vae, config=str(flux_files.config_dir("flux-vae", files.vae, flux_files.flux_vae_config(files.vae))),
        torch_dtype=dtype, local_files_only=True)
    clip = CLIPTextModel.from_pretrained(
        flux_files.config_dir("clip-l", files.clip_l, flux_files.clip_text_config(files.clip_l), weights=files.clip_l),
        torch_dtype=dtype, local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(
        flux_files.config_dir("t5", files.t5xxl, flux_files.t5_config(files.t5xxl), weights=files.t5xxl),
        torch_dtype=dtype, quantization_config=qt, local_files_only=True)
    # ComfyUI's CLIP tokenizer config says 8192 tokens; CLIP-L reads 77
    tokenizer = CLIPTokenizer.from_pretrained(files.clip_tokenizer, model_max_length=77, local_files_only=True)
    tokenizer_2 = T5TokenizerFast.from_pretrained(files.t5_tokenizer, model_max_length=T5_MAX_LENGTH, local_files_only=True)
    for module, name, path in ((transformer, "transformer", files.path), (vae, "vae", files.vae),
                               (clip, "clip_l", files.clip_l), (t5, "t5xxl", files.t5xxl)):
        _check_loaded(module, name, path)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flux_files.FLUX_SCHEDULER_CONFIG)
    return FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                            text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)


def _check_loaded(module: torch.nn.Module, name: str, path: str) -> None:
    """A single file whose key names did not match leaves weights unloaded (on the meta device): say so."""
    missing = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if missing:
        raise ModelFileError(f"a {name} file with every weight of its architecture",
                             f"'{Path(path).name}' without {len(missing)} of them (e.g. {missing[0]})",
                             f"The file is incomplete or of another model; pick the original {name} file.")


def _is_quantized(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_loaded_in_8bit", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "hf_quantizer", None) is not None or getattr(module, "is_quantized", False))


def _apply_settings(model: FluxFillModel) -> None:
    pipe, spec, device = model.pipe, model.spec, model.device
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    if spec.attention_slicing:
        from .attention import enable_sliced_attention

        enable_sliced_attention(pipe.transformer)
    if spec.first_block_cache > 0:
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=spec.first_block_cache))
    _apply_offload(model)
    if spec.compile:
        pipe.transformer.compile(fullgraph=False, dynamic=False)
    del pipe, device


def _apply_offload(model: FluxFillModel) -> None:
    pipe, mode, device = model.pipe, model.offload, model.device
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    quantized = [n for n, m in modules.items() if _is_quantized(m)]
    if device.type != "cuda" or mode == "none":
        for name, m in modules.items():
            if name not in quantized:  # bitsandbytes modules are placed on the GPU when loaded
                m.to(device)
        return
    if mode == "model":
        # 8-bit bitsandbytes layers cannot move with .to(): keep them resident, offload the rest part by part
        keep = [n for n in quantized if getattr(modules[n], "is_loaded_in_8bit", False)
                or _has_8bit(modules[n])]
        if keep:
            pipe._exclude_from_cpu_offload = list(keep)
            model.notes.append(f"int8 parts stay on the GPU under model offload ({', '.join(keep)})")
        pipe.enable_model_cpu_offload(device=device)
        return
    if mode == "sequential":
        from diffusers.hooks import apply_group_offloading

        for name, m in modules.items():
            if name in quantized:
                # bitsandbytes layers cannot be streamed by group offloading: keep quantized parts resident
                model.notes.append(f"{name} ({model.spec.quantization}) stays on the GPU; other parts stream")
                continue
            apply_group_offloading(m, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True)
        return
    raise SettingError("offload none, model or sequential", repr(mode), "Pick one of the listed values.")


def _has_8bit(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


# ------------------------------------------------------------------------------------------------ inpaint


def inpaint(model: FluxFillModel, image: torch.Tensor, mask: torch.Tensor, prompt: str, *, steps: int = 28,
            guidance: float = 30.0, seed: int = 0, composite_back: bool = True,
            progress: Progress | None = None) -> torch.Tensor:
    """Repaint the masked part of each image. IMAGE BHWC in, IMAGE BHWC out (same size as the input).

    Image ``i`` of a batch uses the seed ``seed + i``; an image whose mask is empty is returned untouched without
    sampling. With ``composite_back`` the pixels where the mask is 0 are exactly the input's.
    """
    progress = progress or NullProgress()
    image = check_image(image)
    mask = match_mask_to_images(image, check_mask(mask))
    if steps < 1:
        raise InputError("steps of at least 1", str(steps), "Set steps to 28 (FLUX Fill's usual value).")
    if not prompt or not prompt.strip():
        log.info("Atelier: FLUX Fill runs with an empty prompt")
    results = []
    for i in range(image.shape[0]):
        img, msk = image[i : i + 1], mask[i : i + 1]
        if not bool((msk > 0).any()):
            log.info("Atelier: mask %d is empty: image returned untouched, no sampling", i)
            progress.step(steps)
            results.append(img)
            continue
        out = _run_one(model, img, msk, prompt, steps, guidance, seed + i, progress)
        results.append(composite(img, out, msk) if composite_back else out)
    return torch.cat(results, dim=0)


def _run_one(model: FluxFillModel, image: torch.Tensor, mask: torch.Tensor, prompt: str, steps: int,
             guidance: float, seed: int, progress: Progress) -> torch.Tensor:
    pipe = model.pipe
    if pipe is None:
        raise SettingError("a loaded FLUX Fill pipeline", "one that was released", "Queue the prompt again.")
    img, msk, pad = pad_to_multiple(image, mask, model.multiple)
    h, w = img.shape[1], img.shape[2]

    def on_step(_pipe, _i, _t, kwargs):
        progress.step(1)  # ComfyUI's hook raises here when the user pressed Stop
        return kwargs

    generator = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    # FluxFillPipeline (unlike FluxPipeline) opens no cache context; FirstBlockCache's hooks need one
    cache = (pipe.transformer.cache_context("cond") if getattr(pipe.transformer, "is_cache_enabled", False)
             else contextlib.nullcontext())
    try:
        with torch.inference_mode(), cache:
            out = pipe(
                prompt=prompt, image=to_bchw(img), mask_image=msk.unsqueeze(1), height=h, width=w,
                guidance_scale=guidance, num_inference_steps=steps, generator=generator,
                max_sequence_length=T5_MAX_LENGTH, output_type="pt", callback_on_step_end=on_step,
            ).images
    finally:
        # after Stop or an error too: offload hooks back to their resting state, FirstBlockCache state cleared
        pipe.maybe_free_model_hooks()
    return pad.crop(to_bhwc(out.float().cpu()))


# ------------------------------------------------------------------------------------------------- helpers


def handle_summary(handle: FluxFillHandle) -> str:
    s = handle.spec
    return (f"{Path(s.files.path).name}: {handle.dtype}, quantization {s.quantization}, offload {handle.offload}"
            f"{', attention slicing' if s.attention_slicing else ''}{', VAE slicing' if s.vae_slicing else ''}"
            f"{', VAE tiling' if s.vae_tiling else ''}"
            f"{f', FirstBlockCache {s.first_block_cache:g}' if s.first_block_cache else ''}")
