"""SD1.5 IP-Adapter files (h94/IP-Adapter layout, ``models/ipadapter``): read, check and describe them.

A file holds two groups of tensors: ``image_proj.*`` (the image-embedding projection) and ``ip_adapter.*`` (the
extra key/value projections of every cross-attention). diffusers' ``load_ip_adapter`` takes them as a dict, so the
file is read here (safetensors, or a ``.bin`` with ``weights_only=True``) and nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelFileError
from .sd15_files import SDXL_CONTEXT, load_state, shapes


def read(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} of an IP-Adapter file."""
    state = load_state(path)
    if "image_proj" in state and "ip_adapter" in state:  # h94's .bin files are already grouped
        return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in state.items():
        group, _, rest = k.partition(".")
        if group in out:
            out[group][rest] = v
    return out


def describe(path: str) -> dict:
    """What the file needs, read off its shapes: ``context`` (cross-attention width), ``image_embed`` (width of the
    image embedding it projects), ``plus`` (Resampler: takes the encoder's penultimate hidden states)."""
    name = Path(path).name
    keys = shapes(path)
    if keys and not any(isinstance(v, list) for v in keys.values()):
        keys = {}
    if not keys:  # a grouped .bin: flatten
        keys = {f"{g}.{k}": list(v.shape) for g, d in read(path).items() for k, v in d.items()}
    to_k = sorted(k for k in keys if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight"))
    if not to_k or not any(k.startswith("image_proj.") for k in keys):
        raise ModelFileError("an IP-Adapter file (image_proj.* and ip_adapter.* tensors, h94/IP-Adapter)",
                             f"'{name}'", "Put ip-adapter_sd15.safetensors (or ip-adapter-plus_sd15) in models/ipadapter.")
    context = keys[to_k[0]][1]
    if "image_proj.proj.weight" in keys:  # ImageProjection: Linear(image_embed → tokens × context)
        image_embed, plus = keys["image_proj.proj.weight"][1], False
    elif "image_proj.proj_in.weight" in keys:  # Resampler (plus): hidden states of the encoder
        image_embed, plus = keys["image_proj.proj_in.weight"][1], True
    else:
        raise ModelFileError("an IP-Adapter of the plain or plus kind", f"'{name}' (FaceID or another variant)",
                             "Use ip-adapter_sd15 / ip-adapter-plus_sd15 from h94/IP-Adapter.")
    if context == SDXL_CONTEXT:
        raise ModelFileError("an SD1.5 IP-Adapter (768-wide cross-attention)", f"'{name}', an SDXL IP-Adapter",
                             "Pick ip-adapter_sd15*.safetensors.")
    return {"context": context, "image_embed": image_embed, "plus": plus}


def check_encoder(adapter: dict, encoder_cfg: dict, adapter_name: str, encoder_name: str) -> None:
    """The CLIP vision encoder gives what the adapter projects (projection width; hidden width for plus)."""
    want = adapter["image_embed"]
    have = encoder_cfg["hidden_size"] if adapter["plus"] else encoder_cfg["projection_dim"]
    if want != have:
        raise ModelFileError(f"a CLIP vision encoder giving {want}-wide embeddings for '{adapter_name}'",
                             f"'{encoder_name}' ({have}-wide)", "SD1.5 IP-Adapters use ViT-H-14 "
                             "(CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors), the vit-G ones ViT-bigG-14.")
