"""h94 IP-Adapter files (``models/ipadapter``) with their CLIP vision encoder (``models/clip_vision``), offline.

The files as downloaded: ``.safetensors`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys) or ``.bin`` (a dict of the
two parts, read with ``torch.load(weights_only=True)``). The encoder is a Hugging Face CLIPVisionModelWithProjection
file (cubiq's naming: ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``, ``CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors``).
The adapter goes into the pipeline with diffusers' ``load_ip_adapter`` (state dict in, our encoder registered first);
:func:`check_pair` tells before loading whether adapter, encoder and UNet fit together.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import sdxl_files
from .errors import ModelFileError
from .flux_files import config_dir, read_safetensors_header

log = logging.getLogger("atelier")

EXTENSIONS = (".safetensors", ".bin")


def read(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} from either file format."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            state: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, _, rest = key.partition(".")
                    if part in state:
                        state[part][rest] = f.get_tensor(key)
        elif p.suffix.lower() == ".bin":
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"unknown extension {p.suffix}")
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise several kinds for a bad file
        raise ModelFileError("an IP-Adapter file (.safetensors, or .bin holding plain tensors)",
                             f"'{p.name}' that cannot be read ({str(e)[:200]})",
                             "Use h94/IP-Adapter's sdxl_models files as downloaded.") from e
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ModelFileError("an IP-Adapter file with image_proj and ip_adapter weights", f"'{p.name}'",
                             "Use h94/IP-Adapter's sdxl_models files (ip-adapter_sdxl_vit-h, ip-adapter-plus_sdxl_vit-h …).")
    return state


def needs(state: dict) -> dict:
    """What an adapter needs: {"plus": bool, "clip_dim": width of the image features it reads,
    "clip_feature": "projection" | "hidden", "cross_dim": UNet cross-attention width}."""
    proj = state["image_proj"]
    k0 = next(k for k in state["ip_adapter"] if k.endswith("to_k_ip.weight"))
    cross = state["ip_adapter"][k0].shape[1]
    if "proj_in.weight" in proj:  # Resampler (plus): penultimate hidden states
        return {"plus": True, "clip_dim": proj["proj_in.weight"].shape[1], "clip_feature": "hidden", "cross_dim": cross}
    if "proj.weight" in proj:  # plain: projected image embedding
        return {"plus": False, "clip_dim": proj["proj.weight"].shape[1], "clip_feature": "projection", "cross_dim": cross}
    raise ModelFileError("an IP-Adapter (plain or plus) image projection", f"keys {sorted(proj)[:4]}",
                         "FaceID and other variants are not supported here; use ip-adapter(-plus)_sdxl_vit-h.")


def clip_dims(clip_path: str) -> dict:
    cfg = sdxl_files.clip_vision_config(clip_path)
    return {"projection": cfg["projection_dim"], "hidden": cfg["hidden_size"]}


def fits(state: dict, clip_path: str) -> bool:
    n = needs(state)
    return clip_dims(clip_path)[n["clip_feature"]] == n["clip_dim"]


def check_pair(adapter_path: str, state: dict, clip_path: str, unet_cross_dim: int | None) -> None:
    """A ModelFileError when the adapter does not fit the CLIP vision file or the UNet."""
    n = needs(state)
    have = clip_dims(clip_path)[n["clip_feature"]]
    kind = "IP-Adapter Plus" if n["plus"] else "IP-Adapter"
    if have != n["clip_dim"]:
        known = {("projection", 1024): "ViT-H", ("hidden", 1280): "ViT-H", ("projection", 1280): "ViT-bigG",
                 ("hidden", 1664): "ViT-bigG"}.get((n["clip_feature"], n["clip_dim"]))
        hint = {"ViT-H": "ViT-H (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
                "ViT-bigG": "ViT-bigG (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)"}.get(
            known, f"an encoder whose {n['clip_feature']} width is {n['clip_dim']}")
        raise ModelFileError(
            f"a CLIP vision encoder that fits the {kind} '{Path(adapter_path).name}' (image {n['clip_feature']} width "
            f"{n['clip_dim']})", f"'{Path(clip_path).name}' with width {have}",
            f"Pick {hint} in clip_vision (or 'auto'). _vit-h adapters read ViT-H; ip-adapter_sdxl.safetensors reads bigG.")
    if unet_cross_dim is not None and n["cross_dim"] != unet_cross_dim:
        raise ModelFileError(
            f"an IP-Adapter for this UNet (cross-attention width {unet_cross_dim}, SDXL: 2048)",
            f"'{Path(adapter_path).name}' made for width {n['cross_dim']} (768 = SD1.5)",
            "Pick an SDXL IP-Adapter (h94/IP-Adapter sdxl_models).")


def auto_clip(state: dict, candidates: list[str]) -> str | None:
    """The first CLIP vision file (readable, Hugging Face names) that fits the adapter, or None."""
    for path in candidates:
        try:
            if fits(state, path):
                return path
        except ModelFileError:
            continue
    return None


def load_into(pipe, state: dict, clip_path: str, dtype: torch.dtype) -> None:
    """Register the CLIP vision encoder + its image processor, then diffusers' ``load_ip_adapter`` with the state."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cfg = sdxl_files.clip_vision_config(clip_path)
    folder = config_dir("clip-vision", clip_path, cfg, weights=clip_path)
    encoder, info = CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                                  output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelFileError("a complete CLIP vision file", f"'{Path(clip_path).name}' without {len(missing)} "
                             f"weights (e.g. {missing[0]})", "Re-download the encoder.")
    size = encoder.config.image_size
    # what diffusers' load_ip_adapter creates when the pipeline has no feature extractor
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    unet = pipe.unet
    quantized = getattr(unet, "hf_quantizer", None) is not None or getattr(unet, "is_quantized", False)
    if quantized:
        # diffusers' _load_ip_adapter_weights ends with unet.to(dtype=unet.dtype), which a bitsandbytes-quantized
        # UNet refuses; the new adapter modules are cast below instead
        plain_to = unet.to
        unet.to = lambda *a, **kw: plain_to(*a, **{k: v for k, v in kw.items() if k != "dtype"})
    try:
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    finally:
        if quantized:
            del unet.to
    # the adapter's image projection (IP-Adapter Plus: a Resampler) and its attention processors in the run dtype:
    # diffusers leaves them in float32 next to a bf16/fp16 UNet ("mat1 and mat2 must have the same dtype", seen on
    # an H200 with IP-Adapter Plus)
    if getattr(unet, "encoder_hid_proj", None) is not None:
        unet.encoder_hid_proj.to(dtype=dtype)
    for proc in unet.attn_processors.values():
        if isinstance(proc, torch.nn.Module):
            proc.to(dtype=dtype)
