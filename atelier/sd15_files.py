"""Stable Diffusion 1.5 files on disk for the realtime character: recognise them and load them offline.

Supported layouts:

* the checkpoint: a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``;
  ``tokenizer/`` optional, ComfyUI's CLIP tokenizer is used when it is missing) or an original single file
  (``models/checkpoints/*.safetensors``, LDM key names ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*``);
* the OpenPose ControlNet: a diffusers folder (``config.json`` + weights), a diffusers-format single file
  (``controlnet_cond_embedding.*`` keys) or an original ``control_*.safetensors`` / ``.pth``;
* TAESD: madebyollin's ``taesd_decoder`` / ``taesd_encoder`` single files (``models/vae_approx``), mapped onto
  diffusers' ``AutoencoderTiny``;
* the CLIP vision encoder of IP-Adapter: a Hugging Face ``CLIPVisionModelWithProjection`` single file
  (``models/clip_vision``, cubiq's names such as ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``).

Single files carry no config: SD1.5's own configs ship in ``atelier/configs/sd15`` (facts of the published models)
and the sizes that vary (channels, depth, cross-attention width) are read off the tensor shapes. Nothing here touches
the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import ModelFileError, describe_error
from .flux_files import config_dir, read_safetensors_header

log = logging.getLogger("atelier")

CONFIGS = Path(__file__).parent / "configs" / "sd15"
SD15_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_CONTEXT = 2048  # SDXL's cross-attention width (SD1.5: 768, SD2: 1024)
SD15_CONTEXT = 768
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def facts(name: str) -> dict:
    """One of SD1.5's shipped configs (unet, controlnet, vae, text_encoder, scheduler, taesd)."""
    return json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.ckpt``/``.bin`` read with ``weights_only=True``."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors/pickle errors are many: any of them is a file problem
        name = os.path.basename(path)
        raise ModelFileError(f"a readable checkpoint in '{name}'", f"'{name}' that cannot be read "
                             f"({describe_error(e)})", "The file is damaged or incomplete; download it again.") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state  # nested groups kept (h94's IP-Adapter .bin: {"image_proj": {...}, "ip_adapter": {...}})


def shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Key → shape, from a safetensors header (nothing loaded) or, for pickles, from the loaded tensors."""
    if str(path).endswith(".safetensors"):
        return {k: v["shape"] for k, v in read_safetensors_header(path).items()}
    return {k: list(v.shape) for k, v in load_state(path).items() if hasattr(v, "shape")}


# --------------------------------------------------------------------------------------- UNet-like configs


def _blocks_config(keys: dict[str, list[int]], prefix: str, base: dict) -> dict:
    """An original (LDM) UNet/ControlNet's diffusers config: ``base`` with the sizes read from the tensor shapes.

    Heads stay SD1.5's (8 per attention block: shapes cannot tell them)."""
    def has(k):
        return prefix + k in keys

    cfg = dict(base)
    cfg["in_channels"] = keys[prefix + "input_blocks.0.0.weight"][1]
    channels, attention, layers = [], [], 0
    level_ch, level_attn, level_layers, i = None, False, 0, 1
    while has(f"input_blocks.{i}.0.op.weight") or has(f"input_blocks.{i}.0.in_layers.0.weight"):
        if has(f"input_blocks.{i}.0.op.weight"):  # a downsample ends the level
            channels.append(level_ch)
            attention.append(level_attn)
            layers = layers or level_layers
            level_ch, level_attn, level_layers = None, False, 0
        else:
            level_ch = keys[prefix + f"input_blocks.{i}.0.out_layers.3.weight"][0]
            level_attn = level_attn or has(f"input_blocks.{i}.1.proj_in.weight")
            level_layers += 1
        i += 1
    if level_ch is not None:
        channels.append(level_ch)
        attention.append(level_attn)
        layers = layers or level_layers
    if not channels:
        raise ModelFileError("a Stable Diffusion UNet in original (LDM) key names", "no input_blocks",
                             "Pick an SD1.5 checkpoint / ControlNet file.")
    cfg["block_out_channels"] = channels
    cfg["layers_per_block"] = layers
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    if "up_block_types" in base:  # a UNet (ControlNets have no up blocks)
        cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    to_k = [k for k in keys if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    if to_k:
        cfg["cross_attention_dim"] = keys[to_k[0]][1]
    proj = [k for k in keys if k.startswith(prefix) and k.endswith(".proj_in.weight")]
    cfg["use_linear_projection"] = bool(proj) and len(keys[proj[0]]) == 2
    depth = {int(m.group(1)) for k in keys
             if (m := re.match(re.escape(prefix) + r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.", k))}
    cfg["transformer_layers_per_block"] = max(depth) + 1 if depth else 1
    groups = base.get("norm_num_groups", 32)
    if any(c % groups for c in channels):  # tiny models: the largest group count that divides every width
        cfg["norm_num_groups"] = max(g for g in range(1, min(channels) + 1) if all(c % g == 0 for c in channels))
    return cfg


def is_sdxl(keys: dict[str, list[int]], config: dict | None = None) -> bool:
    """An SDXL UNet/ControlNet: text-time embedding or SDXL's 2048-wide cross-attention."""
    if config is not None:
        return (config.get("addition_embed_type") == "text_time"
                or int(config.get("cross_attention_dim") or 0) == SDXL_CONTEXT)
    if any(k.startswith(("add_embedding.", "label_emb.")) or ".label_emb." in k or k.startswith(
            ("control_model.label_emb", UNET_PREFIX + "label_emb")) for k in keys):
        return True
    return any(k.endswith("attn2.to_k.weight") and v[-1] == SDXL_CONTEXT for k, v in keys.items())


def sdxl_controlnet_error(name: str) -> ModelFileError:
    return ModelFileError("an SD1.5 OpenPose ControlNet (768-wide cross-attention)",
                          f"'{name}', a ControlNet made for SDXL", "Pick an SD1.5 ControlNet such as "
                          "control_v11p_sd15_openpose (models/controlnet); SDXL ControlNets need an SDXL model.")


# ----------------------------------------------------------------------------------------------- checkpoint


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``diffusers`` (a folder) or ``single_file`` (an original checkpoint), or a ModelFileError saying why not."""
    p = Path(path)
    if p.is_dir():
        from .folders import diffusers_pipeline_class

        cls = diffusers_pipeline_class(p)
        missing = [f"{sub}/config.json" for sub in ("unet", "vae", "text_encoder") if not (p / sub / "config.json").is_file()]
        if cls is None or missing:
            raise ModelFileError("an SD1.5 diffusers folder (model_index.json, unet/, vae/, text_encoder/)",
                                 f"'{p.name}' without {', '.join(missing) or 'model_index.json'}",
                                 "Put the whole folder as save_pretrained writes it under models/diffusers.")
        unet = json.loads((p / "unet" / "config.json").read_text(encoding="utf-8"))
        if is_sdxl({}, unet):
            raise ModelFileError("an SD1.5 model", f"'{p.name}', an SDXL model", "Pick an SD1.5 checkpoint.")
        return "diffusers"
    if not p.is_file():
        raise ModelFileError("an SD1.5 checkpoint file or diffusers folder", f"'{path}' (missing)",
                             "Put it in models/checkpoints (or models/diffusers) and refresh (R).")
    keys = shapes(p)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelFileError("an SD1.5 checkpoint (original key names: model.diffusion_model.*)",
                             f"'{p.name}' without a UNet", "Pick a full SD1.5 checkpoint (UNet + VAE + CLIP).")
    if is_sdxl(keys) or any(k.startswith("conditioner.") for k in keys):
        raise ModelFileError("an SD1.5 model", f"'{p.name}', an SDXL checkpoint", "Pick an SD1.5 checkpoint.")
    for prefix, what in ((VAE_PREFIX, "VAE"), (CLIP_PREFIX, "CLIP text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise ModelFileError(f"an SD1.5 checkpoint with its {what}", f"'{p.name}' without it ({prefix}*)",
                                 "Pick a full SD1.5 checkpoint (UNet + VAE + CLIP), or its diffusers folder.")
    return "single_file"


def _vae_config(keys: dict[str, list[int]]) -> dict:
    cfg = facts("vae")
    chans, i = [], 0
    while f"{VAE_PREFIX}encoder.down.{i}.block.0.conv1.weight" in keys:
        chans.append(keys[f"{VAE_PREFIX}encoder.down.{i}.block.0.conv1.weight"][0])
        i += 1
    if chans:
        cfg["block_out_channels"] = chans
        n = len(chans)
        cfg["down_block_types"], cfg["up_block_types"] = ["DownEncoderBlock2D"] * n, ["UpDecoderBlock2D"] * n
        cfg["layers_per_block"] = sum(1 for k in keys if re.match(re.escape(VAE_PREFIX) + r"encoder\.down\.0\.block\.\d+\.conv1\.weight$", k))
        cfg["latent_channels"] = keys[VAE_PREFIX + "quant_conv.weight"][0] // 2
        if any(c % 32 for c in chans):
            cfg["norm_num_groups"] = max(g for g in range(1, min(chans) + 1) if all(c % g == 0 for c in chans))
    return cfg


def _clip_prefix(keys) -> str:
    """Where the CLIP text tensors start: SD1.5 files say ``cond_stage_model.transformer.text_model.``."""
    inner = CLIP_PREFIX + "text_model."
    return inner if any(k.startswith(inner) for k in keys) else CLIP_PREFIX


def _clip_config(keys: dict[str, list[int]]) -> dict:
    cfg = facts("text_encoder")
    pre = _clip_prefix(keys)
    emb = keys[pre + "embeddings.token_embedding.weight"]
    cfg["vocab_size"], cfg["hidden_size"] = emb
    cfg["max_position_embeddings"] = keys[pre + "embeddings.position_embedding.weight"][0]
    cfg["intermediate_size"] = keys[pre + "encoder.layers.0.mlp.fc1.weight"][0]
    cfg["num_hidden_layers"] = sum(1 for k in keys if re.match(re.escape(pre) + r"encoder\.layers\.\d+\.mlp\.fc1\.weight$", k))
    if cfg["hidden_size"] != 768:  # CLIP-L has 12 heads of 64; smaller models keep 64-wide heads where they can
        cfg["num_attention_heads"] = max(1, cfg["hidden_size"] // 64) if cfg["hidden_size"] % 64 == 0 else 1
    return cfg


def load_single_checkpoint(path: str, dtype: torch.dtype, tokenizer_dir: str):
    """UNet, VAE, CLIP text model and tokenizer of an original SD1.5 checkpoint file, offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    keys = shapes(path)
    state = load_state(path)
    unet_cfg = _blocks_config(keys, UNET_PREFIX, facts("unet"))
    unet = UNet2DConditionModel.from_single_file(state, config=str(config_dir("sd15-unet", path, unet_cfg)),
                                                 torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_single_file(state, config=str(config_dir("sd15-vae", path, _vae_config(keys))),
                                         torch_dtype=dtype, local_files_only=True)
    text_cfg = CLIPTextConfig(**{k: v for k, v in _clip_config(keys).items() if k != "architectures"})
    with torch.device("meta"):
        text = CLIPTextModel(text_cfg)
    pre = _clip_prefix(keys)
    # transformers 4 names the tensors text_model.*, transformers 5 without that level: follow the model's names
    inner = "text_model." if any(k.startswith("text_model.") for k in text.state_dict()) else ""
    clip_state = {inner + k[len(pre):]: v.to(dtype) for k, v in state.items()
                  if k.startswith(pre) and not k.endswith("position_ids")}
    missing, _ = text.load_state_dict(clip_state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise ModelFileError("an SD1.5 checkpoint whose CLIP text encoder is complete", f"'{Path(path).name}' "
                             f"without {len(missing)} of its tensors (e.g. {missing[0]})", "Pick another file.")
    for name, buf in list(text.named_buffers()):
        if name.endswith("position_ids") and buf.is_meta:
            owner = text.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(text_cfg.max_position_embeddings).unsqueeze(0),
                                  persistent=False)
    text.eval()
    tokenizer = clip_tokenizer(tokenizer_dir)
    return unet, vae, text, tokenizer


def clip_tokenizer(folder: str):
    """ComfyUI's CLIP-L tokenizer (its config says 8192 tokens; SD1.5's CLIP reads 77)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)


# ------------------------------------------------------------------------------------------------ ControlNet


def controlnet_kind(path: str | os.PathLike) -> tuple[str, dict | None]:
    """(``folder`` | ``diffusers_file`` | ``original_file``, the diffusers config when it can be read) of an SD1.5
    ControlNet, or a ModelFileError (missing, not a ControlNet, made for SDXL)."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        cfg_path = p / "config.json"
        weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
        if not cfg_path.is_file() or not weights:
            raise ModelFileError("a ControlNet folder with config.json and diffusion_pytorch_model.safetensors",
                                 f"'{name}'", "Put the whole ControlNet folder in models/controlnet.")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            raise ModelFileError("a ControlNetModel folder", f"'{name}' ({cfg.get('_class_name')})",
                                 "Pick an SD1.5 OpenPose ControlNet.")
        if is_sdxl({}, cfg):
            raise sdxl_controlnet_error(name)
        return "folder", cfg
    if not p.is_file():
        raise ModelFileError("an SD1.5 OpenPose ControlNet in models/controlnet", f"'{path}' (missing)",
                             "Put control_v11p_sd15_openpose (file or folder) in models/controlnet and refresh (R).")
    keys = shapes(p)
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        cfg = diffusers_controlnet_config(keys)
        if is_sdxl(keys, cfg) or is_sdxl(keys):
            raise sdxl_controlnet_error(name)
        return "diffusers_file", cfg
    prefix = "control_model." if any(k.startswith("control_model.") for k in keys) else ""
    if prefix + "input_hint_block.0.weight" not in keys:
        raise ModelFileError("a ControlNet (input_hint_block / controlnet_cond_embedding tensors)",
                             f"'{name}', which has neither", "Pick an SD1.5 OpenPose ControlNet file.")
    if is_sdxl(keys):
        raise sdxl_controlnet_error(name)
    cfg = _blocks_config(keys, prefix, facts("controlnet"))
    hint = sorted(int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"input_hint_block\.(\d+)\.weight$", k)))
    outs = [keys[f"{prefix}input_hint_block.{i}.weight"][0] for i in hint[:-1]]
    # convs: conv_in (c0), then per level a pair (c_i → c_i, c_i → c_i+1 with stride 2), then conv_out
    cfg["conditioning_embedding_out_channels"] = outs[:1] + outs[2::2]
    return "original_file", cfg


def diffusers_controlnet_config(keys: dict[str, list[int]]) -> dict:
    """The config of a diffusers-format ControlNet single file, read off its shapes (SD1.5's facts otherwise)."""
    cfg = facts("controlnet")
    chans, attn, i = [], [], 0
    while f"down_blocks.{i}.resnets.0.conv1.weight" in keys:
        chans.append(keys[f"down_blocks.{i}.resnets.0.conv1.weight"][0])
        attn.append(f"down_blocks.{i}.attentions.0.proj_in.weight" in keys)
        i += 1
    cfg["block_out_channels"] = chans
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg["layers_per_block"] = sum(1 for k in keys if re.match(r"down_blocks\.0\.resnets\.\d+\.conv1\.weight$", k))
    cfg["in_channels"] = keys["conv_in.weight"][1]
    to_k = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if to_k:
        cfg["cross_attention_dim"] = keys[to_k[0]][1]
    proj = [k for k in keys if k.endswith(".proj_in.weight")]
    cfg["use_linear_projection"] = bool(proj) and len(keys[proj[0]]) == 2
    emb = sorted(int(m.group(1)) for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$", k)))
    cfg["conditioning_embedding_out_channels"] = (
        [keys["controlnet_cond_embedding.conv_in.weight"][0]] + [keys[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in emb[1::2]])
    if "add_embedding.linear_1.weight" in keys:
        cfg["addition_embed_type"] = "text_time"
    if any(c % 32 for c in chans):
        cfg["norm_num_groups"] = max(g for g in range(1, min(chans) + 1) if all(c % g == 0 for c in chans))
    return cfg


def load_controlnet(path: str, dtype: torch.dtype):
    from diffusers import ControlNetModel

    kind, cfg = controlnet_kind(path)
    if kind == "folder":
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    if kind == "diffusers_file":
        model = ControlNetModel.from_config(cfg)
        missing, unexpected = model.load_state_dict(load_state(path), strict=False)
        if missing:
            raise ModelFileError("a complete ControlNet file", f"'{Path(path).name}' without {len(missing)} tensors "
                                 f"(e.g. {missing[0]})", "Pick the original file.")
        return model.to(dtype).eval()
    return ControlNetModel.from_single_file(path, config=str(config_dir("sd15-controlnet", path, cfg)),
                                            torch_dtype=dtype, local_files_only=True)


# ---------------------------------------------------------------------------------------------------- TAESD


def taesd_to_diffusers(decoder: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor] | None) -> dict:
    """madebyollin's TAESD files → diffusers ``AutoencoderTiny`` keys.

    TAESD's decoder is one ``nn.Sequential`` whose item 0 is a parameterless clamp (tanh(x/3)·3), which
    AutoencoderTiny applies inside ``DecoderTiny.forward``: decoder item *i* is ``decoder.layers.{i-1}``. The
    encoder's items keep their numbers (``encoder.layers.{i}``). The ``vae_scale`` / ``vae_shift`` some ComfyUI
    files carry are 1 / 0 for SD1.5 and not part of AutoencoderTiny: dropped."""
    out = {}
    for k, v in decoder.items():
        head, _, rest = k.partition(".")
        if head.isdigit():
            out[f"decoder.layers.{int(head) - 1}.{rest}"] = v
    for k, v in (encoder or {}).items():
        head, _, rest = k.partition(".")
        if head.isdigit():
            out[f"encoder.layers.{head}.{rest}"] = v
    return out


def taesd_pair(path: str) -> tuple[str, str | None]:
    """(decoder file, encoder file or None) for a chosen taesd file (either half; the other found beside it)."""
    p = Path(path)
    name = p.name
    if "encoder" in name:
        dec = p.with_name(name.replace("encoder", "decoder"))
        return (str(dec) if dec.is_file() else ""), str(p)
    enc = p.with_name(name.replace("decoder", "encoder"))
    return str(p), (str(enc) if "decoder" in name and enc.is_file() else None)


def load_taesd(path: str, dtype: torch.dtype):
    """diffusers ``AutoencoderTiny`` from the taesd_decoder (+ taesd_encoder when it is beside it) single files."""
    from diffusers import AutoencoderTiny

    dec, enc = taesd_pair(path)
    if not dec:
        raise ModelFileError("taesd_decoder.safetensors beside the chosen taesd file", f"'{Path(path).name}' alone",
                             "Put taesd_decoder.safetensors (madebyollin/taesd) in models/vae_approx.")
    cfg = facts("taesd")
    cfg.pop("_class_name", None)
    model = AutoencoderTiny(**cfg)
    state = taesd_to_diffusers(load_state(dec), load_state(enc) if enc else None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing_dec = [m for m in missing if m.startswith("decoder.")]
    if missing_dec or unexpected:
        raise ModelFileError("an SD1.5 TAESD decoder (madebyollin/taesd taesd_decoder)",
                             f"'{Path(dec).name}' with {len(missing_dec)} missing / {len(unexpected)} unknown tensors",
                             "Pick taesd_decoder.safetensors (not taesdxl / taesd3 / taef1: other latent spaces).")
    return model.to(dtype).eval(), enc is not None


# --------------------------------------------------------------------------------------------- CLIP vision

# hidden size → heads of the published CLIP vision towers (ViT-B/16: 12, ViT-L/14, ViT-H/14, ViT-bigG/14: 16)
CLIP_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def clip_vision_config(keys: dict[str, list[int]]) -> dict:
    """CLIPVisionModelWithProjection config of a Hugging Face-format single file, read off its shapes."""
    pre = "vision_model."
    if pre + "embeddings.patch_embedding.weight" not in keys:
        raise ModelFileError("a CLIP vision encoder in Hugging Face key names (vision_model.*)",
                             "a file without vision_model.embeddings", "Use the h94/IP-Adapter image_encoder "
                             "model.safetensors (cubiq's CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors).")
    hidden, _, patch, _ = keys[pre + "embeddings.patch_embedding.weight"]
    positions = keys[pre + "embeddings.position_embedding.weight"][0]
    side = int(round((positions - 1) ** 0.5))
    layers = sum(1 for k in keys if re.match(r"vision_model\.encoder\.layers\.\d+\.mlp\.fc1\.weight$", k))
    heads = CLIP_VISION_HEADS.get(hidden, max(1, hidden // 64) if hidden % 64 == 0 else 1)
    return {"hidden_size": hidden, "patch_size": patch, "image_size": side * patch, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": keys[pre + "encoder.layers.0.mlp.fc1.weight"][0],
            "projection_dim": keys["visual_projection.weight"][0] if "visual_projection.weight" in keys else hidden,
            "hidden_act": "quick_gelu" if hidden == 1024 else "gelu", "layer_norm_eps": 1e-5}


def load_clip_vision(path: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if Path(path).is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    cfg = CLIPVisionConfig(**clip_vision_config(shapes(path)))
    model = CLIPVisionModelWithProjection(cfg)
    state = {k: v for k, v in load_state(path).items() if not k.endswith("position_ids")}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise ModelFileError("a complete CLIP vision encoder", f"'{Path(path).name}' without {len(missing)} tensors "
                             f"(e.g. {missing[0]})", "Pick the h94/IP-Adapter image encoder file.")
    return model.to(dtype).eval()

