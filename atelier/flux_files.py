"""FLUX.1 Fill files on disk: recognise them, read their configs from the weights, load them offline.

Two layouts are supported:

* a diffusers folder (``model_index.json`` naming ``FluxFillPipeline``), loaded with ``from_pretrained``;
* ComfyUI's single files: the transformer in BFL key names (``models/diffusion_models/flux1-fill-dev.safetensors``),
  CLIP-L and T5-XXL in Hugging Face key names (``models/text_encoders``) and the VAE in LDM key names
  (``models/vae/ae.safetensors``).

Single files carry no config, so every config is read off the tensor shapes in the file header; the few numbers
that shapes cannot tell (rope axes, CLIP head count, VAE scaling) follow FLUX's own values. Nothing here touches
the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from .errors import ModelFileError
from .folders import check_diffusers_folder as check_folder
from .folders import diffusers_pipeline_class  # noqa: F401 - part of this module's API
from .weights import file_stamp, read_safetensors_header

log = logging.getLogger("atelier")

FLUX_FILL_PIPELINE = "FluxFillPipeline"

# parts of a diffusers FluxFillPipeline folder and the files each needs
DIFFUSERS_PARTS = {
    "transformer": ("config.json", "*.safetensors"),
    "vae": ("config.json", "*.safetensors"),
    "text_encoder": ("config.json", "*.safetensors"),
    "text_encoder_2": ("config.json", "*.safetensors"),
    "tokenizer": ("vocab.json|tokenizer.json",),
    "tokenizer_2": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}

# FLUX's scheduler (black-forest-labs/FLUX.1-Fill-dev scheduler_config.json), shipped for the single-file layout
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# FLUX's autoencoder latent statistics (not stored in ae.safetensors)
FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


# -------------------------------------------------------------------------------------------------- key names


# BFL's files name FLUX's q/k RMSNorm weights `…_norm.scale`; ComfyUI 0.30 names them `…_norm.weight` (its loader
# takes both, so a checkpoint saved from 0.30 has `.weight`): read both under BFL's name.
_QK_NORM_WEIGHT = re.compile(r"((?:query|key)_norm)\.weight$")


def _strip_prefix(keys, prefixes=("model.diffusion_model.", "diffusion_model.")) -> tuple[str, dict[str, str]]:
    """(prefix, {BFL name: key in the file}) for a FLUX transformer's keys."""
    keys = list(keys)
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), "")
    return prefix, {_QK_NORM_WEIGHT.sub(r"\1.scale", k[len(prefix):]): k for k in keys if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- recognising


def is_flux_fill_transformer_file(path: str | os.PathLike) -> bool:
    """A FLUX transformer in BFL keys whose input takes image + masked image + mask (in > 2 × out channels)."""
    try:
        header = read_safetensors_header(path)
    except ModelFileError:
        return False
    _, keys = _strip_prefix(header)
    if "img_in.weight" not in keys or "final_layer.linear.weight" not in keys:
        return False
    in_ch = header[keys["img_in.weight"]]["shape"][1]
    out_ch = header[keys["final_layer.linear.weight"]]["shape"][0]
    return in_ch > 2 * out_ch


def check_diffusers_folder(folder: str | os.PathLike) -> None:
    """Raise a ModelFileError listing what is missing or wrong in a FluxFillPipeline folder."""
    check_folder(folder, FLUX_FILL_PIPELINE, DIFFUSERS_PARTS, "FLUX.1 Fill", "black-forest-labs/FLUX.1-Fill-dev")


# ------------------------------------------------------------------------------------- configs from shapes


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def rope_axes(head_dim: int) -> list[int]:
    """FLUX splits each head's rope dims as (16, 56, 56) for 128; the same proportions for other head sizes."""
    k = int(head_dim * 7 / 16) // 2 * 2
    return [head_dim - 2 * k, k, k]


def flux_transformer_config(path: str | os.PathLike) -> dict:
    header = read_safetensors_header(path)
    _, keys = _strip_prefix(header)

    def shape(k: str) -> list[int]:
        if k not in keys:
            raise ModelFileError("a FLUX transformer in BFL key names (img_in, double_blocks, single_blocks ...)",
                                 f"'{Path(path).name}' without '{k}'",
                                 "Use flux1-fill-dev.safetensors from black-forest-labs, or a diffusers folder.")
        return header[keys[k]]["shape"]

    hidden, in_ch = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": shape("final_layer.linear.weight")[0],
        "num_layers": _count(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": _count(keys, r"single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in keys,
        "axes_dims_rope": rope_axes(head_dim),
    }


def flux_vae_config(path: str | os.PathLike) -> dict:
    header = read_safetensors_header(path)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in header) else ""
    keys = {k[len(prefix):]: k for k in header if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in keys:
        raise ModelFileError("a VAE in LDM key names (encoder.conv_in, decoder.up ...)", f"'{Path(path).name}'",
                             "Use FLUX's ae.safetensors in models/vae.")
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    block_out = [header[keys[f"encoder.down.{i}.block.0.conv2.weight"]]["shape"][0] for i in range(levels)]
    latent = header[keys["encoder.conv_out.weight"]]["shape"][0] // 2
    groups = 32 if all(c % 32 == 0 for c in block_out) else 1
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": header[keys["encoder.conv_in.weight"]]["shape"][1],
        "out_channels": header[keys["decoder.conv_out.weight"]]["shape"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": block_out,
        "layers_per_block": _count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": latent,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "use_quant_conv": "quant_conv.weight" in keys,
        "use_post_quant_conv": "post_quant_conv.weight" in keys,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in keys,
        **FLUX_VAE_SCALING,
    }


def t5_config(path: str | os.PathLike) -> dict:
    header = read_safetensors_header(path)
    if "shared.weight" not in header and "encoder.embed_tokens.weight" not in header:
        raise ModelFileError("a T5 encoder in Hugging Face key names (shared, encoder.block ...)",
                             f"'{Path(path).name}'", "Use t5xxl_fp16.safetensors in models/text_encoders.")
    emb = header.get("shared.weight") or header["encoder.embed_tokens.weight"]
    vocab, d_model = emb["shape"]
    bias = header["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]["shape"]
    heads = bias[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in header
    wi = "wi_0" if gated else "wi"
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": vocab,
        "d_model": d_model,
        "num_heads": heads,
        "d_kv": header["encoder.block.0.layer.0.SelfAttention.q.weight"]["shape"][0] // heads,
        "d_ff": header[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"]["shape"][0],
        "num_layers": _count(header, r"encoder\.block\.(\d+)\."),
        "relative_attention_num_buckets": bias[0],
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "dense_act_fn": "gelu_new" if gated else "relu",
        "is_gated_act": gated,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def clip_text_config(path: str | os.PathLike) -> dict:
    header = read_safetensors_header(path)
    if "text_model.embeddings.token_embedding.weight" not in header:
        raise ModelFileError("a CLIP text encoder in Hugging Face key names (text_model.embeddings ...)",
                             f"'{Path(path).name}'", "Use clip_l.safetensors in models/text_encoders.")
    vocab, hidden = header["text_model.embeddings.token_embedding.weight"]["shape"]
    proj = header.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": header["text_model.encoder.layers.0.mlp.fc1.weight"]["shape"][0],
        "num_hidden_layers": _count(header, r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": header["text_model.embeddings.position_embedding.weight"]["shape"][0],
        "projection_dim": proj["shape"][0] if proj else 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


# ------------------------------------------------------------------------------ BFL -> diffusers key names


def _split(t, sizes):
    import torch

    return torch.split(t, sizes, dim=0)


def bfl_to_diffusers(sd: dict) -> dict:
    """Rename a FLUX transformer state dict from BFL/ComfyUI names to diffusers' FluxTransformer2DModel names."""
    import torch

    prefix, names = _strip_prefix(sd)
    src = {k: sd[full] for k, full in names.items()}
    out: dict = {}

    def take(a: str, b: str) -> None:
        for end in ("weight", "bias"):
            if f"{a}.{end}" in src:
                out[f"{b}.{end}"] = src.pop(f"{a}.{end}")

    take("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    take("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    take("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    take("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    take("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    take("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    take("txt_in", "context_embedder")
    take("img_in", "x_embedder")
    take("final_layer.linear", "proj_out")
    for end in ("weight", "bias"):  # BFL stores (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)
        k = f"final_layer.adaLN_modulation.1.{end}"
        if k in src:
            shift, scale = src.pop(k).chunk(2, dim=0)
            out[f"norm_out.linear.{end}"] = torch.cat([scale, shift], dim=0)

    hidden = out["x_embedder.weight"].shape[0]
    for i in range(_count(src, r"double_blocks\.(\d+)\.")):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        take(f"{s}.img_mod.lin", f"{d}.norm1.linear")
        take(f"{s}.txt_mod.lin", f"{d}.norm1_context.linear")
        for end in ("weight", "bias"):
            q, k, v = _split(src.pop(f"{s}.img_attn.qkv.{end}"), [hidden] * 3)
            out[f"{d}.attn.to_q.{end}"], out[f"{d}.attn.to_k.{end}"], out[f"{d}.attn.to_v.{end}"] = q, k, v
            q, k, v = _split(src.pop(f"{s}.txt_attn.qkv.{end}"), [hidden] * 3)
            out[f"{d}.attn.add_q_proj.{end}"], out[f"{d}.attn.add_k_proj.{end}"], out[f"{d}.attn.add_v_proj.{end}"] = q, k, v
        out[f"{d}.attn.norm_q.weight"] = src.pop(f"{s}.img_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = src.pop(f"{s}.img_attn.norm.key_norm.scale")
        out[f"{d}.attn.norm_added_q.weight"] = src.pop(f"{s}.txt_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_added_k.weight"] = src.pop(f"{s}.txt_attn.norm.key_norm.scale")
        take(f"{s}.img_attn.proj", f"{d}.attn.to_out.0")
        take(f"{s}.txt_attn.proj", f"{d}.attn.to_add_out")
        take(f"{s}.img_mlp.0", f"{d}.ff.net.0.proj")
        take(f"{s}.img_mlp.2", f"{d}.ff.net.2")
        take(f"{s}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        take(f"{s}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(_count(src, r"single_blocks\.(\d+)\.")):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        take(f"{s}.modulation.lin", f"{d}.norm.linear")
        take(f"{s}.linear2", f"{d}.proj_out")
        for end in ("weight", "bias"):
            w = src.pop(f"{s}.linear1.{end}")
            q, k, v, mlp = _split(w, [hidden, hidden, hidden, w.shape[0] - 3 * hidden])
            out[f"{d}.attn.to_q.{end}"], out[f"{d}.attn.to_k.{end}"], out[f"{d}.attn.to_v.{end}"] = q, k, v
            out[f"{d}.proj_mlp.{end}"] = mlp
        out[f"{d}.attn.norm_q.weight"] = src.pop(f"{s}.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = src.pop(f"{s}.norm.key_norm.scale")
    if src:
        log.warning("Atelier: %d tensors of the FLUX file were not used (e.g. %s)", len(src), next(iter(src)))
    return out


# ---------------------------------------------------------------------------------- config folders on disk


def config_dir(kind: str, source: str | os.PathLike, config: dict, weights: str | os.PathLike | None = None) -> Path:
    """A folder holding ``config.json`` (and a link to ``weights`` as model.safetensors) for from_pretrained.

    Lives in the temp dir, keyed by the source file's path, size and mtime, so it is written once per file.
    """
    size, mtime = file_stamp(source)
    tag = hashlib.sha1(f"{kind}|{os.path.abspath(source)}|{size}|{mtime}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "atelier-configs" / f"{kind}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    if weights is not None:
        link = folder / "model.safetensors"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.abspath(weights))
    return folder


def require_file(path: str | None, what: str, folder: str) -> str:
    if not path or not os.path.isfile(path):
        raise ModelFileError(f"the {what} file", f"'{path or 'nothing'}'",
                             f"Put it in models/{folder} and pick it in the loader's '{what}' input.")
    return path
