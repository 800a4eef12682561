"""SDXL virtual try-on: inpainting + depth ControlNet + IP-Adapter (the garment picture) + LoRAs, on diffusers'
``StableDiffusionXLControlNetInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline``.

Files as users keep them: an SDXL checkpoint (base or 9-channel inpainting) in models/checkpoints or a diffusers
folder in models/diffusers; a ControlNet folder or file; an h94 IP-Adapter with its CLIP vision file. The stage
follows :mod:`atelier.stage`: :class:`TryOnSpec` (registry key: the base model without LoRAs), :class:`TryOnHandle`
(+ resolved settings and the LoRA list), ``STAGE``. :func:`run` reproduces the plain diffusers pipeline: same
weights, inputs and seed, same pixels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import ip_adapter, lora, pipelines, sdxl_files
from .errors import InputError, ModelFileError
from .flux_files import read_safetensors_header
from .folders import diffusers_pipeline_class
from .images import check_image, check_mask, composite, match_mask_to_images, pad_to_multiple, to_bchw, to_bhwc
from .memory import Footprint, diffusers_quant_config, dtype_name, resident_vram
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

BASE = "SDXL"


# ------------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class TryOnFiles:
    """Where the parts are. ``layout`` "single_file": ``path`` is an SDXL checkpoint and ``tokenizer`` ComfyUI's CLIP
    tokenizer folder (both SDXL tokenizers use its vocabulary); "diffusers": ``path`` is a pipeline folder."""

    layout: str
    path: str
    controlnet: str | None = None
    ip_adapter: str | None = None
    clip_vision: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class TryOnSpec:
    """What the loader's inputs chose; equal specs share one loaded pipeline (LoRAs are not part of it)."""

    files: TryOnFiles
    quantization: str = "none"
    offload: str = "auto"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    first_block_cache: float = 0.0  # not offered for UNets; read by pipelines.resolve


@dataclass(frozen=True)
class TryOnHandle:
    """ATELIER_TRYON: the spec, what the loader resolved, and the LoRAs chained after it."""

    spec: TryOnSpec
    offload: str
    dtype: str
    kind: str  # sdxl / sdxl_inpaint
    loras: tuple[lora.LoraRef, ...] = ()


# ------------------------------------------------------------------------------------------------ files


def _unet_header(files: TryOnFiles) -> tuple[dict, str]:
    if files.layout == "single_file":
        return read_safetensors_header(files.path), sdxl_files.UNET_PREFIX
    weights = sorted((Path(files.path) / "unet").glob("*.safetensors"))
    return (read_safetensors_header(weights[0]) if weights else {}), ""


def check_files(files: TryOnFiles) -> str:
    """Check every file; returns the kind of the base model (sdxl / sdxl_inpaint)."""
    if files.layout == "single_file":
        if not os.path.isfile(files.path):
            raise ModelFileError("an SDXL checkpoint file", f"'{files.path}'", "Put it in models/checkpoints and refresh (R).")
        kind = sdxl_files.check_checkpoint(files.path)
        if not files.tokenizer or not os.path.isdir(files.tokenizer):
            raise ModelFileError("ComfyUI's CLIP tokenizer folder", f"'{files.tokenizer}'", "Reinstall ComfyUI.")
    else:
        cls = diffusers_pipeline_class(files.path)
        if cls not in sdxl_files.SDXL_PIPELINES:
            raise ModelFileError("a diffusers SDXL folder (model_index.json naming a StableDiffusionXL pipeline)",
                                 f"'{Path(files.path).name}' ({cls or 'no model_index.json'})",
                                 "Put an SDXL (inpainting) folder in models/diffusers, or an SDXL checkpoint in "
                                 "models/checkpoints.")
        missing = [p for p in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
                   if not (Path(files.path) / p).is_dir()]
        if missing:
            raise ModelFileError("a complete SDXL folder", f"'{Path(files.path).name}' without {', '.join(missing)}",
                                 "Copy the whole folder (every subfolder) from the model page.")
        cfg = Path(files.path) / "unet" / "config.json"
        import json

        kind = "sdxl_inpaint" if json.loads(cfg.read_text()).get("in_channels") == 9 else "sdxl"
    if files.controlnet:
        sdxl_files.controlnet_layout(files.controlnet)
    if files.ip_adapter:
        if not files.clip_vision:
            raise ModelFileError(f"a CLIP vision file that fits '{Path(files.ip_adapter).name}' in models/clip_vision",
                                 "none", "Put CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (for the _vit-h adapters) "
                                         "in models/clip_vision, or pick it in clip_vision.")
        ip_adapter.check_pair(files.ip_adapter, ip_adapter.read(files.ip_adapter), files.clip_vision, _cross_dim(files))
    return kind


def _cross_dim(files: TryOnFiles) -> int | None:
    header, prefix = _unet_header(files)
    return next((v["shape"][1] for k, v in header.items()
                 if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)


def part_sizes(files: TryOnFiles) -> dict[str, int]:
    """16-bit bytes of the UNet (+ControlNet, IP-Adapter), the text/image encoders and the VAE, from headers."""
    extra_unet, extra_enc = 0, 0
    if files.controlnet:
        cn = Path(files.controlnet)
        extra_unet += pipelines.bytes16(sorted(cn.glob("*.safetensors")) if cn.is_dir() else [cn])
    if files.clip_vision:
        extra_enc += pipelines.bytes16([Path(files.clip_vision)])
    if files.layout == "diffusers":
        root = files.path
        return {"transformer": pipelines.folder_bytes16(root, "unet") + extra_unet,
                "text_encoders": pipelines.folder_bytes16(root, "text_encoder", "text_encoder_2") + extra_enc,
                "vae": pipelines.folder_bytes16(root, "vae")}
    sizes = {"transformer": extra_unet, "text_encoders": extra_enc, "vae": 0}
    for key, meta in read_safetensors_header(files.path).items():
        n = 2
        for d in meta["shape"]:
            n *= d
        part = ("transformer" if key.startswith(sdxl_files.UNET_PREFIX) else
                "vae" if key.startswith(sdxl_files.VAE_PREFIX) else "text_encoders")
        sizes[part] += n
    return sizes


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class TryOnModel(pipelines.LoadedPipeline):
    """The built pipeline (see :class:`pipelines.LoadedPipeline`)."""

    # under offload "model" the ControlNet runs every step beside the UNet: it stays on the GPU
    resident_in_model_offload: ClassVar[tuple[str, ...]] = ("controlnet",)

    @property
    def multiple(self) -> int:
        """Picture sides: multiples of the VAE downscale × every UNet downsampling."""
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def slice_attention(self) -> None:
        """diffusers' sliced attention for UNets; its processors would replace the IP-Adapter's, so not with one."""
        if getattr(self.pipe.unet, "encoder_hid_proj", None) is not None:
            self.notes.append("attention slicing skipped: it would replace the IP-Adapter's attention processors")
            return
        self.pipe.enable_attention_slicing()


def resolve(spec: TryOnSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    return pipelines.resolve(spec, part_sizes(spec.files), free_vram)


def make_handle(spec: TryOnSpec, free_vram: int | None = None) -> TryOnHandle:
    kind = check_files(spec.files)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return TryOnHandle(spec=spec, offload=mode, dtype=dtype_name(dtype), kind=kind)


def need_bytes(handle: TryOnHandle, free_vram: int | None = None) -> int:
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp)


def load(handle: TryOnHandle) -> TryOnModel:
    spec = handle.spec
    check_files(spec.files)
    _, dtype, why, fp = resolve(spec)
    return pipelines.build(TryOnModel, spec, "SDXL try-on", spec.files.path, handle.offload, dtype, why, fp,
                           lambda: build_pipeline(spec.files, dtype, spec.quantization))


def _tokenizers(folder: str):
    from transformers import CLIPTokenizer

    # ComfyUI's CLIP config says 8192 tokens; CLIP reads 77. SDXL's OpenCLIP tokenizer pads with "!"
    return (CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True),
            CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!", local_files_only=True))


def build_pipeline(files: TryOnFiles, dtype: torch.dtype, quantization: str):
    """The diffusers pipeline for ``files`` (ControlNet variant when a ControlNet is given), IP-Adapter loaded."""
    from diffusers import StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    qd = diffusers_quant_config(quantization, dtype)
    if files.layout == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(files.path, subfolder="unet", torch_dtype=dtype,
                                                    quantization_config=qd, local_files_only=True)
        base = StableDiffusionXLInpaintPipeline.from_pretrained(files.path, unet=unet, torch_dtype=dtype,
                                                                add_watermarker=False, local_files_only=True)
    else:
        config = sdxl_files.checkpoint_config_dir(files.path, "StableDiffusionXLInpaintPipeline")
        tok1, tok2 = _tokenizers(files.tokenizer)
        parts = {}
        if qd is not None:
            parts["unet"] = UNet2DConditionModel.from_single_file(files.path, config=str(config), subfolder="unet",
                                                                  torch_dtype=dtype, quantization_config=qd,
                                                                  local_files_only=True)
        base = StableDiffusionXLInpaintPipeline.from_single_file(
            files.path, config=str(config), tokenizer=tok1, tokenizer_2=tok2, torch_dtype=dtype,
            add_watermarker=False, local_files_only=True, **parts)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            _check_loaded(getattr(base, name), name, files.path)
    pipe = base
    if files.controlnet:
        controlnet = load_controlnet(files.controlnet, dtype, base.unet.config.addition_time_embed_dim)
        pipe = StableDiffusionXLControlNetInpaintPipeline.from_pipe(base, controlnet=controlnet)
    if files.ip_adapter:
        ip_adapter.load_into(pipe, ip_adapter.read(files.ip_adapter), files.clip_vision, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_controlnet(path: str, dtype: torch.dtype, addition_time_embed_dim: int):
    from diffusers import ControlNetModel

    layout = sdxl_files.controlnet_layout(path)
    if layout == "folder":
        model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    elif layout == "diffusers":
        cfg = sdxl_files.controlnet_config(path)
        cfg["addition_time_embed_dim"] = addition_time_embed_dim
        folder = sdxl_files.write_config_folder("controlnet", path, {"config.json": cfg},
                                                {"diffusion_pytorch_model.safetensors": path})
        model = ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    else:
        folder = sdxl_files.controlnet_ldm_config_dir(path, addition_time_embed_dim)
        model = ControlNetModel.from_single_file(path, config=str(folder), torch_dtype=dtype, local_files_only=True)
    _check_loaded(model, "controlnet", path)
    return model


def _check_loaded(module: torch.nn.Module, name: str, path: str) -> None:
    missing = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if missing:
        raise ModelFileError(f"a {name} with every weight of its architecture",
                             f"'{Path(path).name}' without {len(missing)} of them (e.g. {missing[0]})",
                             "The file is incomplete or of another model; pick the original file.")


# ------------------------------------------------------------------------------------------------ running


def flatten_alpha(garment: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """A garment picture with transparency (RGBA IMAGE, or LoadImage's MASK = 1 − alpha) flattened on white: the
    IP-Adapter sees a product shot instead of whatever colour the transparent pixels hold."""
    if garment.ndim == 3:
        garment = garment.unsqueeze(0)
    a = None
    if garment.shape[-1] == 4:
        a = garment[..., 3:4].float()
    elif alpha is not None:
        m = check_mask(alpha, "garment_alpha")
        if m.shape[1:] != garment.shape[1:3]:
            raise InputError(f"garment_alpha of the garment's size ({garment.shape[2]}×{garment.shape[1]})",
                             f"{m.shape[2]}×{m.shape[1]}", "Connect the MASK of the same LoadImage as the garment.")
        a = (1.0 - m).unsqueeze(-1)
    rgb = check_image(garment, "garment")
    return rgb if a is None else rgb * a + (1.0 - a)


def _pil(image: torch.Tensor):
    import numpy as np
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8))


def run(model: TryOnModel, person: torch.Tensor, garment: torch.Tensor, mask: torch.Tensor, *,
        depth: torch.Tensor | None = None, prompt: str = "", negative_prompt: str = "", ip_adapter_scale: float = 0.8,
        controlnet_scale: float = 0.6, strength: float = 0.99, steps: int = 30, guidance: float = 7.0, seed: int = 0,
        composite_back: bool = True, loras: tuple = (), garment_alpha: torch.Tensor | None = None,
        progress: Progress | None = None) -> torch.Tensor:
    """Dress each person (IMAGE BHWC) in the garment inside ``mask`` (MASK BHW, 1 = repaint). Image ``i`` of a
    batch uses ``seed + i``; ``composite_back`` keeps every pixel outside the mask exact."""
    progress = progress or NullProgress()
    if model.pipe is None:
        raise released("SDXL try-on pipeline")
    person = check_image(person, "person")
    mask = match_mask_to_images(person, check_mask(mask))
    garment = flatten_alpha(garment, garment_alpha)
    if garment.shape[0] not in (1, person.shape[0]):
        raise InputError(f"one garment picture or one per person ({person.shape[0]})", f"{garment.shape[0]}",
                         "Connect a single garment picture.")
    if depth is not None:
        depth = check_image(depth, "depth")
        if depth.shape[0] not in (1, person.shape[0]):
            raise InputError(f"one depth map or one per person ({person.shape[0]})", f"{depth.shape[0]}",
                             "Connect the depth of the person picture.")
    if steps < 1:
        raise InputError("steps of at least 1", str(steps), "Set steps to 30.")
    if not 0.0 < strength <= 1.0:
        raise InputError("strength in (0, 1]", f"{strength:g}", "Use 0.99 to repaint the masked area fully.")
    if int(steps * strength) < 1:
        raise InputError("steps × strength of at least 1 (the steps actually run)", f"{steps} × {strength:g}",
                         "Raise steps or strength.")
    for i in range(mask.shape[0]):
        if not bool((mask[i] > 0).any()):
            raise InputError("a mask that marks where the garment goes (1 = repaint)", f"an empty mask (image {i})",
                             "Connect Garment Mask's output, or paint the clothes' area in the mask editor.")
    lora.sync(model, tuple(loras), BASE)
    pipe = model.pipe
    if depth is not None and not hasattr(pipe, "controlnet"):
        log.warning("Atelier: a depth map is connected but the loader has no ControlNet: depth ignored")
    if getattr(pipe.unet, "encoder_hid_proj", None) is None and ip_adapter_scale:
        log.info("Atelier: no IP-Adapter loaded: the garment picture is not used (prompt only)")
    results = []
    for i in range(person.shape[0]):
        out = _run_one(model, person[i:i + 1], garment[min(i, garment.shape[0] - 1)], mask[i:i + 1],
                       None if depth is None else depth[min(i, depth.shape[0] - 1)][None], prompt, negative_prompt,
                       ip_adapter_scale, controlnet_scale, strength, steps, guidance, seed + i, progress)
        results.append(composite(person[i:i + 1], out, mask[i:i + 1]) if composite_back else out)
    return torch.cat(results, dim=0)


def pipe_kwargs(pipe, image: torch.Tensor, garment: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor | None,
                ip_adapter_scale: float, controlnet_scale: float) -> dict:
    """The diffusers call arguments for one padded picture (BHWC image, HWC garment, BHW mask, BHWC depth)."""
    h, w = image.shape[1], image.shape[2]
    kw = {"image": to_bchw(image), "mask_image": mask.unsqueeze(1), "height": h, "width": w}
    if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        from diffusers.image_processor import IPAdapterMaskProcessor

        pipe.set_ip_adapter_scale(float(ip_adapter_scale))
        ip_mask = IPAdapterMaskProcessor().preprocess(mask.unsqueeze(1), height=h, width=w)
        kw["ip_adapter_image"] = _pil(garment)
        kw["cross_attention_kwargs"] = {"ip_adapter_masks": [ip_mask.reshape(1, 1, h, w)]}
    if hasattr(pipe, "controlnet"):
        if depth is None:  # the ControlNet contributes nothing (×0): the same result as the plain inpaint pipeline
            depth, controlnet_scale = torch.zeros_like(image), 0.0
        elif depth.shape[1:3] != (h, w):
            depth = torch.nn.functional.interpolate(to_bchw(depth), size=(h, w), mode="bilinear", align_corners=False)
            depth = to_bhwc(depth)
        kw["control_image"] = to_bchw(depth)
        kw["controlnet_conditioning_scale"] = float(controlnet_scale)
    return kw


def _run_one(model: TryOnModel, person, garment, mask, depth, prompt, negative_prompt, ip_adapter_scale,
             controlnet_scale, strength, steps, guidance, seed, progress) -> torch.Tensor:
    pipe = model.pipe
    img, msk, pad = pad_to_multiple(person, mask, model.multiple)
    if depth is not None and pad.pad_bottom + pad.pad_right:
        depth = torch.nn.functional.interpolate(to_bchw(depth), size=person.shape[1:3], mode="bilinear")
        depth = to_bhwc(torch.nn.functional.pad(depth, (0, pad.pad_right, 0, pad.pad_bottom), mode="replicate"))
    done = [0]

    def on_step(_pipe, _i, _t, kwargs):
        done[0] += 1
        progress.step(1)  # ComfyUI's hook raises here when the user pressed Stop
        return kwargs

    kw = pipe_kwargs(pipe, img, garment, msk, depth, ip_adapter_scale, controlnet_scale)
    try:
        with torch.inference_mode():
            out = pipe(prompt=prompt, negative_prompt=negative_prompt or None, strength=strength,
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator("cpu").manual_seed(int(seed) % (2**64)), output_type="pt",
                       callback_on_step_end=on_step, **kw).images
    finally:
        pipe.maybe_free_model_hooks()  # after Stop or an error too: offload hooks back to rest
    if steps > done[0]:
        progress.step(steps - done[0])  # strength < 1 runs fewer steps than the bar counts
    return pad.crop(to_bhwc(out.float().cpu()))


# ------------------------------------------------------------------------------------------------- helpers


def summary(handle: TryOnHandle, model: TryOnModel | None = None) -> str:
    s, f = handle.spec, handle.spec.files
    parts = [f"{Path(f.path).name} ({'inpainting' if handle.kind == 'sdxl_inpaint' else 'base'} SDXL)"]
    if f.controlnet:
        parts.append(f"ControlNet {Path(f.controlnet).stem}")
    if f.ip_adapter:
        parts.append(f"IP-Adapter {Path(f.ip_adapter).stem} + {Path(f.clip_vision).stem}")
    if handle.loras:
        parts.append(f"LoRA {lora.describe(handle.loras)}")
    line = (", ".join(parts) + f": {handle.dtype}, quantization {s.quantization}, offload {handle.offload}"
            f"{', attention slicing' if s.attention_slicing else ''}{', VAE slicing' if s.vae_slicing else ''}"
            f"{', VAE tiling' if s.vae_tiling else ''}")
    return with_notes(line, model)


STAGE = Stage(group="tryon", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)
