"""SDXL files as users keep them: recognise them and give diffusers the configs they do not carry.

* checkpoints (``models/checkpoints/*.safetensors``, LDM/SGM key names): an SDXL base or inpainting (9-channel)
  checkpoint is loaded with diffusers' ``from_single_file`` on a config folder written here; an SD1.5/SD2/other
  checkpoint is a clear error;
* ControlNets (``models/controlnet``): a diffusers folder, or one file with diffusers key names or LDM names;
* CLIP vision encoders (``models/clip_vision``, cubiq's naming): Hugging Face CLIPVisionModelWithProjection keys.

Configs start from SDXL's own (``atelier/configs/sdxl/*.json``, facts) and every value the tensor shapes tell
(channels, depths, widths, embedding sizes) is read from the file header, so smaller or larger variants load too.
Nothing here touches the network or loads a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import ModelFileError
from .flux_files import read_safetensors_header

CONFIGS = Path(__file__).parent / "configs" / "sdxl"
UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

# diffusers pipeline classes whose folders the try-on loader accepts (model_index.json _class_name)
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline",
                  "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetInpaintPipeline")


@lru_cache(maxsize=None)
def template(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def heads(channels: int) -> int:
    """SDXL's attention heads have 64 channels (tiny test models: at least one head)."""
    return max(1, channels // 64)


# ------------------------------------------------------------------------------------------- checkpoints


def describe_checkpoint(header: dict) -> str:
    """What a checkpoint is, from its key layout: sdxl / sdxl_inpaint / sd15 / sd2 / sdxl_refiner / unknown."""
    conv_in = header.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in header):
            return "flux"
        return "unknown"
    if any(k.startswith(TE2_PREFIX) for k in header):
        if not any(k.startswith(TE1_PREFIX) for k in header):
            return "sdxl_refiner"
        return "sdxl_inpaint" if conv_in["shape"][1] == 9 else "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in header):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in header):
        return "sd15"
    return "unknown"


KIND_NAMES = {"sd15": "a Stable Diffusion 1.5 checkpoint", "sd2": "a Stable Diffusion 2.x checkpoint",
              "sdxl_refiner": "an SDXL refiner (no CLIP-L text encoder)", "flux": "a FLUX model",
              "unknown": "a file without SDXL's key layout (model.diffusion_model.*, conditioner.embedders.*)"}


def check_checkpoint(path: str | os.PathLike) -> str:
    """'sdxl' or 'sdxl_inpaint' for an SDXL checkpoint; a ModelFileError naming what the file is otherwise."""
    kind = describe_checkpoint(read_safetensors_header(path))
    if kind not in ("sdxl", "sdxl_inpaint"):
        raise ModelFileError("an SDXL checkpoint (base or inpainting, UNet + both text encoders + VAE in one file)",
                             f"'{Path(path).name}': {KIND_NAMES[kind]}",
                             "The try-on loader runs SDXL only: pick an SDXL checkpoint (e.g. "
                             "sd_xl_base_1.0.safetensors or an SDXL inpainting checkpoint) or a diffusers SDXL folder.")
    return kind


def _shape(header: dict, key: str, path) -> list[int]:
    if key not in header:
        raise ModelFileError("a complete SDXL checkpoint", f"'{Path(path).name}' without '{key}'",
                             "The file is incomplete or of another model; re-download it.")
    return header[key]["shape"]


def unet_config(header: dict, path, prefix: str = UNET_PREFIX) -> dict:
    """UNet2DConditionModel config of an LDM/SGM UNet (SDXL's values where shapes say nothing)."""
    keys = {k[len(prefix):]: k for k in header if k.startswith(prefix)}
    h = {k: header[full] for k, full in keys.items()}
    conv_in = _shape(h, "input_blocks.0.0.weight", path)
    # walk the input blocks: a downsampler (op) closes a level
    levels: list[dict] = [{"res": 0, "depth": 0, "ch": conv_in[0]}]
    for n in range(1, _count(keys, r"input_blocks\.(\d+)\.")):
        if f"input_blocks.{n}.0.op.weight" in h:
            levels.append({"res": 0, "depth": 0, "ch": levels[-1]["ch"]})
            continue
        lv = levels[-1]
        lv["res"] += 1
        lv["ch"] = _shape(h, f"input_blocks.{n}.0.out_layers.3.weight", path)[0]
        lv["depth"] = max(lv["depth"], _count(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
    cross = next((v["shape"][1] for k, v in h.items() if k.endswith("attn2.to_k.weight")), 2048)
    cfg = dict(template("unet"))
    cfg.update({
        "in_channels": conv_in[1],
        "out_channels": _shape(h, "out.2.weight", path)[0],
        "block_out_channels": [lv["ch"] for lv in levels],
        "layers_per_block": levels[0]["res"],
        "down_block_types": ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in reversed(levels)],
        "transformer_layers_per_block": [max(1, lv["depth"]) for lv in levels],
        "attention_head_dim": [heads(lv["ch"]) for lv in levels],
        "cross_attention_dim": cross,
        "projection_class_embeddings_input_dim": _shape(h, "label_emb.0.0.weight", path)[1],
    })
    mid = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    cfg["transformer_layers_per_block"][-1] = max(mid, 1)
    if cfg["transformer_layers_per_block"][-1] != max(levels[-1]["depth"], 1):
        raise ModelFileError("an SDXL UNet whose middle block is as deep as its last level",
                             f"'{Path(path).name}' ({mid} vs {levels[-1]['depth']})", "Use a standard SDXL checkpoint.")
    return cfg


def text_configs(header: dict, path) -> tuple[dict, dict]:
    """CLIP-L (Hugging Face names) and OpenCLIP bigG configs of an SDXL checkpoint."""
    t1 = TE1_PREFIX + "text_model."
    vocab, hidden = _shape(header, t1 + "embeddings.token_embedding.weight", path)
    c1 = dict(template("text_encoder"))
    c1.update(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads(hidden), projection_dim=hidden,
              intermediate_size=_shape(header, t1 + "encoder.layers.0.mlp.fc1.weight", path)[0],
              num_hidden_layers=_count(header, re.escape(t1) + r"encoder\.layers\.(\d+)\."),
              max_position_embeddings=_shape(header, t1 + "embeddings.position_embedding.weight", path)[0])
    vocab2, hidden2 = _shape(header, TE2_PREFIX + "token_embedding.weight", path)
    c2 = dict(template("text_encoder_2"))
    c2.update(vocab_size=vocab2, hidden_size=hidden2, num_attention_heads=heads(hidden2),
              projection_dim=_shape(header, TE2_PREFIX + "text_projection", path)[1],
              intermediate_size=_shape(header, TE2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight", path)[0],
              num_hidden_layers=_count(header, re.escape(TE2_PREFIX) + r"transformer\.resblocks\.(\d+)\."),
              max_position_embeddings=_shape(header, TE2_PREFIX + "positional_embedding", path)[0])
    return c1, c2


def vae_config(header: dict, path) -> dict:
    keys = {k[len(VAE_PREFIX):]: v for k, v in header.items() if k.startswith(VAE_PREFIX)}
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    block_out = [_shape(keys, f"encoder.down.{i}.block.0.conv2.weight", path)[0] for i in range(levels)]
    cfg = dict(template("vae"))
    cfg.update(in_channels=_shape(keys, "encoder.conv_in.weight", path)[1],
               out_channels=_shape(keys, "decoder.conv_out.weight", path)[0],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               block_out_channels=block_out, layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
               latent_channels=_shape(keys, "encoder.conv_out.weight", path)[0] // 2,
               norm_num_groups=32 if all(c % 32 == 0 for c in block_out) else 1)
    return cfg


def checkpoint_config_dir(path: str | os.PathLike, pipeline_class: str) -> Path:
    """A diffusers config folder (model_index.json + each part's config) for ``from_single_file(config=…)``."""
    header = read_safetensors_header(path)
    te1, te2 = text_configs(header, path)
    unet = unet_config(header, path)
    # the "text_time" embedding reads the pooled bigG embedding + 6 time ids of this width
    unet["addition_time_embed_dim"] = (unet["projection_class_embeddings_input_dim"] - te2["projection_dim"]) // 6
    files = {
        "model_index.json": {"_class_name": pipeline_class, "_diffusers_version": "0.36.0",
                             "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False,
                             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "tokenizer_2": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "unet/config.json": unet,
        "vae/config.json": vae_config(header, path),
        "text_encoder/config.json": te1,
        "text_encoder_2/config.json": te2,
        "scheduler/scheduler_config.json": template("scheduler"),
    }
    return write_config_folder(f"sdxl-{pipeline_class}", path, files)


def write_config_folder(kind: str, source: str | os.PathLike, files: dict[str, dict],
                        links: dict[str, str | os.PathLike] | None = None) -> Path:
    """A folder in the temp dir holding ``files`` (relative path -> JSON) and ``links`` (relative path -> file),
    keyed by the source file's path, size and mtime."""
    st = os.stat(source)
    tag = hashlib.sha1(f"{kind}|{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "atelier-configs" / f"{kind}-{tag}"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(data, indent=1), encoding="utf-8")
    for rel, target in (links or {}).items():
        link = folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.abspath(target))
    return folder


# ----------------------------------------------------------------------------------------------- ControlNet


def controlnet_layout(path: str | os.PathLike) -> str:
    """'folder' (diffusers), 'diffusers' (one file, diffusers names) or 'ldm' (one file, LDM names)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFileError("a ControlNet folder with config.json and diffusion_pytorch_model.safetensors",
                                 f"'{p.name}' without config.json", "Copy the whole folder from the model page.")
        return "folder"
    header = read_safetensors_header(p)
    if "controlnet_cond_embedding.conv_in.weight" in header:
        return "diffusers"
    if any(k.startswith(("input_hint_block.", "control_model.input_hint_block.")) for k in header):
        return "ldm"
    raise ModelFileError("an SDXL ControlNet (diffusers or LDM key names)", f"'{p.name}'",
                         "Pick a ControlNet file such as diffusers/controlnet-depth-sdxl-1.0's "
                         "diffusion_pytorch_model.safetensors (renamed as you like).")


def controlnet_config(path: str | os.PathLike) -> dict:
    """ControlNetModel config of a file in diffusers key names, read from its shapes."""
    h = read_safetensors_header(path)
    levels = _count(h, r"down_blocks\.(\d+)\.")
    chans = [_shape(h, f"down_blocks.{i}.resnets.0.conv2.weight", path)[0] for i in range(levels)]
    depth = [_count(h, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    emb = [_shape(h, "controlnet_cond_embedding.conv_in.weight", path)[0]]
    emb += [_shape(h, f"controlnet_cond_embedding.blocks.{j}.weight", path)[0]
            for j in range(1, _count(h, r"controlnet_cond_embedding\.blocks\.(\d+)\."), 2)]
    cross = next((v["shape"][1] for k, v in h.items() if k.endswith("attn2.to_k.weight")), 2048)
    cfg = dict(template("controlnet"))
    cfg.update(
        in_channels=_shape(h, "conv_in.weight", path)[1], block_out_channels=chans,
        conditioning_channels=_shape(h, "controlnet_cond_embedding.conv_in.weight", path)[1],
        conditioning_embedding_out_channels=emb,
        layers_per_block=_count(h, r"down_blocks\.0\.resnets\.(\d+)\."),
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        transformer_layers_per_block=[max(1, d) for d in depth], attention_head_dim=[heads(c) for c in chans],
        cross_attention_dim=cross,
        projection_class_embeddings_input_dim=_shape(h, "add_embedding.linear_1.weight", path)[1])
    mid = _count(h, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    cfg["transformer_layers_per_block"][-1] = max(mid, 1)
    return cfg


def controlnet_ldm_config_dir(path: str | os.PathLike, addition_time_embed_dim: int) -> Path:
    """Config folder for an LDM-named ControlNet file: its shapes read like a UNet's input half."""
    header = read_safetensors_header(path)
    prefix = "control_model." if any(k.startswith("control_model.") for k in header) else ""
    keys = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
    fake = {UNET_PREFIX + k: v for k, v in keys.items()}
    fake[UNET_PREFIX + "out.2.weight"] = {"shape": [4]}
    u = unet_config(fake, path)
    cfg = dict(template("controlnet"))
    for k in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
              "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
              "projection_class_embeddings_input_dim"):
        cfg[k] = u[k]
    cfg["addition_time_embed_dim"] = addition_time_embed_dim
    return write_config_folder("controlnet-ldm", path, {"config.json": cfg})


# ---------------------------------------------------------------------------------------------- CLIP vision

# attention heads of the known CLIP vision widths (ViT-L/14: 1024, ViT-H/14: 1280, ViT-bigG/14: 1664)
_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def clip_vision_config(path: str | os.PathLike) -> dict:
    """CLIPVisionModelWithProjection config of a Hugging Face-named CLIP vision file."""
    h = read_safetensors_header(path)
    p = "vision_model."
    if p + "embeddings.patch_embedding.weight" not in h or "visual_projection.weight" not in h:
        raise ModelFileError("a CLIP vision encoder with projection in Hugging Face key names "
                             "(vision_model.*, visual_projection.weight)", f"'{Path(path).name}'",
                             "Use CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (h94/IP-Adapter's "
                             "models/image_encoder/model.safetensors, renamed) in models/clip_vision.")
    hidden, _, patch, _ = h[p + "embeddings.patch_embedding.weight"]["shape"]
    positions = h[p + "embeddings.position_embedding.weight"]["shape"][0]
    side = int(round((positions - 1) ** 0.5))
    cfg = dict(template("clip_vision"))
    cfg.update(hidden_size=hidden, patch_size=patch, image_size=side * patch,
               num_attention_heads=_VISION_HEADS.get(hidden, heads(hidden)),
               intermediate_size=h[p + "encoder.layers.0.mlp.fc1.weight"]["shape"][0],
               num_hidden_layers=_count(h, re.escape(p) + r"encoder\.layers\.(\d+)\."),
               projection_dim=h["visual_projection.weight"]["shape"][0])
    return cfg
