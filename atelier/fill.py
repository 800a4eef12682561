"""FLUX.1 Fill: build a pipeline from either on-disk layout with the chosen memory settings, and inpaint with it.

``load(handle)`` builds a :class:`FluxFillModel`; ``inpaint(model, image, mask, ...)`` runs it. Both are plain
functions over torch tensors in ComfyUI's conventions (IMAGE BHWC, MASK BHW, 1 = repaint) so they are tested
without ComfyUI and reproduce plain diffusers: the same weights, inputs and seed give the same pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import flux_files, lora, pipelines
from .errors import InputError, ModelFileError
from .guards import check_inputs
from .images import check_image, check_mask, composite, match_mask_to_images, pad_to_multiple, to_bchw, to_bhwc
from .memory import (
    ACTIVATION_RESERVE,
    BudgetPlan,
    Footprint,
    PartBlocks,
    diffusers_quant_config,
    dtype_name,
    free_cuda_bytes,
    is_cuda,
    plan_budget,
    quant_mode,
    resident_vram,
    resolve_dtype,
    transformers_quant_config,
)
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes
from .types import FluxFillFiles, FluxFillHandle, FluxFillSpec
from .weights import read_safetensors_header

log = logging.getLogger("atelier")

T5_MAX_LENGTH = 512
LORA_BASE = "FLUX.1 (dev / Fill)"


# ------------------------------------------------------------------------------------------------ sizes


def part_sizes(files: FluxFillFiles) -> dict[str, int]:
    """Bytes of each part in 16-bit, read from safetensors headers (no tensor is loaded)."""
    if files.layout == "diffusers":
        root = Path(files.path)
        return {
            "transformer": pipelines.bytes16(sorted((root / "transformer").glob("*.safetensors"))),
            "text_encoders": pipelines.bytes16(sorted((root / "text_encoder").glob("*.safetensors"))
                                      + sorted((root / "text_encoder_2").glob("*.safetensors"))),
            "vae": pipelines.bytes16(sorted((root / "vae").glob("*.safetensors"))),
        }
    return {
        "transformer": pipelines.bytes16([Path(files.path)]),
        "text_encoders": pipelines.bytes16([Path(p) for p in (files.clip_l, files.t5xxl) if p]),
        "vae": pipelines.bytes16([Path(files.vae)] if files.vae else []),
    }


# block lists of each part: key prefix in the files → module path, in execution order
_DIFFUSERS_LISTS = {"transformer_blocks": "transformer_blocks", "single_transformer_blocks": "single_transformer_blocks"}
_BFL_LISTS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_T5_LISTS = {"encoder.block": "encoder.block"}
_CLIP_LISTS = {"text_model.encoder.layers": "encoder.layers",  # ComfyUI's clip_l files
               "encoder.layers": "encoder.layers"}  # transformers 5 (4.x nests it in text_model: see submodule)


def part_blocks(files: FluxFillFiles, quantization: str, dtype: torch.dtype) -> list[PartBlocks]:
    """The parts' blocks in run bytes for the budget planner, denoiser first (it runs every step), from headers.
    Quantized: the transformer and T5 (see :func:`_build_pipeline`); CLIP and the VAE keep the run dtype."""
    scale = 2.0 if dtype == torch.float32 else 1.0
    q = quant_mode(quantization).bytes_factor
    qf = q if q < 1 else scale
    if files.layout == "diffusers":
        root = Path(files.path)
        sub = lambda name: sorted((root / name).glob("*.safetensors"))  # noqa: E731
        t, t5, clip, vae = sub("transformer"), sub("text_encoder_2"), sub("text_encoder"), sub("vae")
        tl = _DIFFUSERS_LISTS
    else:
        t, tl = [Path(files.path)], _BFL_LISTS
        t5, clip, vae = ([Path(p)] if p else [] for p in (files.t5xxl, files.clip_l, files.vae))
    return [pipelines.part_blocks("transformer", t, tl, qf), pipelines.part_blocks("text_encoder_2", t5, _T5_LISTS, qf),
            pipelines.part_blocks("text_encoder", clip, _CLIP_LISTS, scale),
            pipelines.part_blocks("vae", vae, {}, scale)]


def check_files(files: FluxFillFiles) -> None:
    """Everything the loader needs is on disk and of the right kind, or a ModelFileError that lists it."""
    if files.layout == "diffusers":
        flux_files.check_diffusers_folder(files.path)
        return
    if not os.path.isfile(files.path):
        raise ModelFileError("a FLUX.1 Fill transformer file", f"'{files.path}'", "Put flux1-fill-dev.safetensors in models/diffusion_models.")
    read_safetensors_header(files.path)  # a partial download or a lying header: say so, not "another model"
    if not flux_files.is_flux_fill_transformer_file(files.path):
        raise ModelFileError("a FLUX.1 Fill transformer (image + mask input channels)", f"'{Path(files.path).name}'",
                             "This looks like another FLUX model; pick flux1-fill-dev.safetensors.")
    flux_files.require_file(files.clip_l, "clip_l", "text_encoders")
    flux_files.require_file(files.t5xxl, "t5xxl", "text_encoders")
    flux_files.require_file(files.vae, "vae", "vae")
    for part in (files.clip_l, files.t5xxl, files.vae):
        read_safetensors_header(part)  # a damaged part is named now, not by the library mid-load
    for tok, name in ((files.clip_tokenizer, "CLIP tokenizer"), (files.t5_tokenizer, "T5 tokenizer")):
        if not tok or not os.path.isdir(tok):
            raise ModelFileError(f"the {name} folder", f"'{tok}'", "ComfyUI ships both tokenizers; reinstall ComfyUI if they are missing.")


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class FluxFillModel(pipelines.LoadedPipeline):
    """A built FluxFillPipeline and what was decided while building it (see :class:`pipelines.LoadedPipeline`)."""

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE downscale × 2×2 latent packing)."""
        return self.pipe.vae_scale_factor * 2


def resolve(spec: FluxFillSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    """Offload mode, dtype and why, plus the size estimate, without loading anything."""
    return pipelines.resolve(spec, part_sizes(spec.files), free_vram,
                             blocks=lambda dtype: part_blocks(spec.files, spec.quantization, dtype))


def make_handle(spec: FluxFillSpec, free_vram: int | None = None) -> FluxFillHandle:
    check_files(spec.files)
    if free_vram is None and spec.offload == "auto" and is_cuda(spec.device):
        free_vram = free_cuda_bytes(spec.device)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return FluxFillHandle(spec=spec, offload=mode, dtype=dtype_name(dtype),
                          vram_budget=free_vram if mode == "budget" else None)


def budget_plan(handle: FluxFillHandle) -> BudgetPlan | None:
    """The blocks kept on the GPU under offload ``budget`` (the plan ``auto`` made for the handle's free VRAM)."""
    if handle.offload != "budget":
        return None
    dtype = resolve_dtype(handle.spec.dtype, handle.spec.device)
    return plan_budget(part_blocks(handle.spec.files, handle.spec.quantization, dtype), handle.vram_budget or 0,
                       ACTIVATION_RESERVE)


def need_bytes(handle: FluxFillHandle, free_vram: int | None = None) -> int:
    """VRAM to make room for before loading: the weights that stay on the GPU in the resolved offload mode."""
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp, budget_plan(handle))


def load(handle: FluxFillHandle) -> FluxFillModel:
    """Build the pipeline ``handle`` describes, in its resolved offload mode."""
    spec = handle.spec
    check_files(spec.files)
    _, dtype, why, fp = resolve(spec, handle.vram_budget)
    return pipelines.build(FluxFillModel, spec, "FLUX.1 Fill", spec.files.path, handle.offload, dtype, why, fp,
                           lambda: _build_pipeline(spec.files, dtype, spec.quantization,
                                                   spec.device if handle.offload == "none" and is_cuda(spec.device)
                                                   else None),
                           plan=budget_plan(handle))


def _build_pipeline(files: FluxFillFiles, dtype: torch.dtype, quantization: str, resident_on: str | None = None):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    if files.layout == "diffusers":
        return pipelines.load_diffusers(FluxFillPipeline, files.path, dtype, quantization,
                                        diffusers_parts={"transformer": FluxTransformer2DModel},
                                        transformers_parts={"text_encoder_2": T5EncoderModel},
                                        resident_on=resident_on)
    qd = diffusers_quant_config(quantization, dtype)
    qt = transformers_quant_config(quantization, dtype)

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


# ------------------------------------------------------------------------------------------------ inpaint


def inpaint(model: FluxFillModel, image: torch.Tensor, mask: torch.Tensor, prompt: str, *, steps: int = 28,
            guidance: float = 30.0, seed: int = 0, composite_back: bool = True,
            progress: Progress | None = None, loras: tuple = (), prompt_embeds: torch.Tensor | None = None,
            pooled_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Repaint the masked part of each image. IMAGE BHWC in, IMAGE BHWC out (same size as the input).

    Image ``i`` of a batch uses the seed ``seed + i``; an image whose mask is empty is returned untouched without
    sampling. With ``composite_back`` the pixels where the mask is 0 are exactly the input's. ``loras``: the pipe
    handle's LoRA list (:mod:`atelier.lora`), applied to the cached pipeline before sampling. ``prompt_embeds`` +
    ``pooled_prompt_embeds`` (e.g. FLUX Redux's) replace the prompt.
    """
    progress = progress or NullProgress()
    image = check_image(image)
    mask = match_mask_to_images(image, check_mask(mask))
    check_inputs({"guidance": float(guidance), "prompt": prompt or ""})  # NaN guidance would paint black
    if steps < 1:
        raise InputError("steps of at least 1", str(steps), "Set steps to 28 (FLUX Fill's usual value).")
    if not prompt or not prompt.strip():
        log.info("Atelier: FLUX Fill runs with an empty prompt")
    if model.pipe is not None:
        lora.sync(model, tuple(loras), LORA_BASE)
    results = []
    for i in range(image.shape[0]):
        img, msk = image[i : i + 1], mask[i : i + 1]
        if not bool((msk > 0).any()):
            log.info("Atelier: mask %d is empty: image returned untouched, no sampling", i)
            progress.step(steps)
            results.append(img)
            continue
        embeds = ({} if prompt_embeds is None else
                  {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds})
        out = _run_one(model, img, msk, prompt, steps, guidance, seed + i, progress, embeds)
        results.append(composite(img, out, msk) if composite_back else out)
    return torch.cat(results, dim=0)


def _run_one(model: FluxFillModel, image: torch.Tensor, mask: torch.Tensor, prompt: str, steps: int,
             guidance: float, seed: int, progress: Progress, embeds: dict | None = None) -> torch.Tensor:
    pipe = model.pipe
    if pipe is None:
        raise released("FLUX Fill pipeline")
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
                prompt=None if embeds else prompt, **(embeds or {}),
                image=to_bchw(img), mask_image=msk.unsqueeze(1), height=h, width=w,
                guidance_scale=guidance, num_inference_steps=steps, generator=generator,
                max_sequence_length=T5_MAX_LENGTH, output_type="pt", callback_on_step_end=on_step,
            ).images
    finally:
        # after Stop or an error too: offload hooks back to their resting state, FirstBlockCache state cleared
        pipe.maybe_free_model_hooks()
    return pad.crop(to_bhwc(out.float().cpu()))


# ------------------------------------------------------------------------------------------------- helpers


def summary(handle: FluxFillHandle, model: FluxFillModel | None = None) -> str:
    s = handle.spec
    return with_notes(
        f"{Path(s.files.path).name}: {handle.dtype}, quantization {s.quantization}, offload {handle.offload}"
        f"{', attention slicing' if s.attention_slicing else ''}{', VAE slicing' if s.vae_slicing else ''}"
        f"{', VAE tiling' if s.vae_tiling else ''}"
        f"{f', FirstBlockCache {s.first_block_cache:g}' if s.first_block_cache else ''}"
        f"{', compiled' if s.compile else ''}{f'; LoRA {lora.describe(handle.loras)}' if handle.loras else ''}", model)


STAGE = Stage(group="flux_fill", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)
