"""A tiny random-weight FastComposer checkpoint in the official on-disk layout, plus the same weights as a plain
diffusers StableDiffusionPipeline folder (the parity reference) and the image encoder as a transformers folder.

``build(dst)`` writes:

* ``fastcomposer-tiny.bin``: one ``torch.save`` state dict with the prefixes of the released ``pytorch_model.bin``:
  ``unet.`` (diffusers names), ``vae.`` (diffusers < 0.15 names: the mid-block attention's ``query`` / ``key`` /
  ``value`` / ``proj_attn``), ``text_encoder.`` (FastComposer's text encoder: ``embeddings`` / ``encoder`` /
  ``final_layer_norm`` with no ``text_model.`` level, and the ``position_ids`` buffer transformers 4.25 saved),
  ``image_encoder.`` (``vision_model.*`` + ``visual_projection.weight`` + ``position_ids``) and ``postfuse_module.``
  (``mlp1`` / ``mlp2`` with ``layernorm``, ``fc1``, ``fc2``, then ``layer_norm``), every fusion weight random;
* ``fastcomposer-tiny.config.json``: the part sizes (the sidecar Atelier reads for non-SD1.5 sizes);
* ``reference-sd/``: the same UNet, VAE and text encoder as a diffusers StableDiffusionPipeline folder
  (save_pretrained) with ComfyUI's CLIP tokenizer (model_max_length 77) and SD1.5's PNDM scheduler;
* ``reference-image-encoder/``: the image encoder as a CLIPVisionModelWithProjection folder.

Sizes: UNet 2 blocks (8, 16 channels), VAE 2× downsampling, CLIP text and vision width 32 (vision 32-px input,
8-px patches). A 64×64 picture in 2 steps takes well under a second on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .comfy_server import comfy_root

NAME = "fastcomposer-tiny.bin"
WIDTH = 32  # text hidden size = image projection size = fusion width

CONFIGS = {
    "unet": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                 cross_attention_dim=WIDTH, sample_size=16, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    "vae": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=32,
                down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"]),
    "text_encoder": dict(hidden_size=WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         projection_dim=WIDTH),
    "image_encoder": dict(hidden_size=WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          image_size=32, patch_size=8, projection_dim=WIDTH),
}
SD15_UNET = dict(act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 in_channels=4, mid_block_scale_factor=1, norm_eps=1e-05, out_channels=4)
SD15_VAE = dict(act_fn="silu", in_channels=3, latent_channels=4, out_channels=3, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_act="quick_gelu", layer_norm_eps=1e-05, max_position_embeddings=77, vocab_size=49408,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_VISION = dict(hidden_act="quick_gelu", layer_norm_eps=1e-05, num_channels=3)
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def tokenizer_dir() -> Path:
    return comfy_root() / "comfy" / "sd1_tokenizer"


def modules(seed: int = 0) -> dict[str, torch.nn.Module]:
    """The random parts as plain diffusers / transformers modules (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**SD15_UNET, **CONFIGS["unet"]).eval(),
        "vae": AutoencoderKL(**SD15_VAE, **CONFIGS["vae"]).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **CONFIGS["text_encoder"])).eval(),
        "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**SD15_VISION,
                                                                        **CONFIGS["image_encoder"])).eval(),
    }


def postfuse_weights(seed: int = 1, dim: int = WIDTH) -> dict[str, torch.Tensor]:
    """Random fusion MLP weights under the released names (layer norms random too, so a test sees them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for mlp, d_in in (("mlp1", 2 * dim), ("mlp2", dim)):
        shapes.update({f"{mlp}.layernorm.weight": (d_in,), f"{mlp}.layernorm.bias": (d_in,),
                       f"{mlp}.fc1.weight": (dim, d_in), f"{mlp}.fc1.bias": (dim,),
                       f"{mlp}.fc2.weight": (dim, dim), f"{mlp}.fc2.bias": (dim,)})
    shapes.update({"layer_norm.weight": (dim,), "layer_norm.bias": (dim,)})
    out = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * (0.3 if k.endswith("weight") and len(shape) == 2 else 0.2)
        out[k] = t + 1.0 if "norm" in k and k.endswith("weight") else t
    return out


def _old_vae_name(key: str) -> str:
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
        if ".attentions." in key and new in key:
            return key.replace(new, old)
    return key


def official_state_dict(parts: dict[str, torch.nn.Module], postfuse: dict[str, torch.Tensor],
                        include: tuple[str, ...] = ("unet", "vae", "text_encoder", "image_encoder", "postfuse_module")
                        ) -> dict[str, torch.Tensor]:
    """The keys of FastComposer's released pytorch_model.bin (see the module docstring)."""
    sd: dict[str, torch.Tensor] = {}
    if "unet" in include:
        sd.update({f"unet.{k}": v for k, v in parts["unet"].state_dict().items()})
    if "vae" in include:
        sd.update({f"vae.{_old_vae_name(k)}": v for k, v in parts["vae"].state_dict().items()})
    if "text_encoder" in include:
        for k, v in parts["text_encoder"].state_dict().items():
            sd["text_encoder." + k.removeprefix("text_model.")] = v
        sd["text_encoder.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    if "image_encoder" in include:
        sd.update({f"image_encoder.{k}": v for k, v in parts["image_encoder"].state_dict().items()})
        cfg = parts["image_encoder"].config
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        sd["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    if "postfuse_module" in include:
        sd.update({f"postfuse_module.{k}": v for k, v in postfuse.items()})
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def config_sidecar_of(path: Path) -> Path:
    """Where Atelier looks for a checkpoint's part sizes: ``<stem>.config.json`` beside it."""
    return path.with_name(path.name[: -len(path.suffix)] + ".config.json")


def write_sidecar(path: Path) -> Path:
    side = config_sidecar_of(path)
    side.write_text(json.dumps(CONFIGS, indent=1), encoding="utf-8")
    return side


def build(dst: str | Path, fmt: str = "bin", seed: int = 0) -> dict[str, Path]:
    """Write the tiny checkpoint (``fmt`` bin or safetensors), its sidecar and the reference folders (idempotent)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    ckpt = dst / (NAME if fmt == "bin" else NAME.replace(".bin", ".safetensors"))
    ref_sd, ref_img = dst / "reference-sd", dst / "reference-image-encoder"
    out = {"checkpoint": ckpt, "reference_sd": ref_sd, "reference_image_encoder": ref_img}
    if ckpt.exists() and (ref_sd / "model_index.json").exists() and (ref_img / "config.json").exists():
        return out
    parts = modules(seed)
    sd = official_state_dict(parts, postfuse_weights(seed + 1))
    if fmt == "bin":
        torch.save(sd, ckpt)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(ckpt))
    write_sidecar(ckpt)
    _save_reference(parts, ref_sd)
    parts["image_encoder"].save_pretrained(ref_img)
    return out


def _save_reference(parts: dict[str, torch.nn.Module], folder: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir()), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tok,
                                   unet=parts["unet"], scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def write_other_model(path: str | Path) -> Path:
    """A checkpoint of another model (an SD1.5 in the original LDM layout, a few keys): the loader must refuse it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
          "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(16, 4, 3, 3),
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32)}
    torch.save(sd, path)
    return path


def shared_folder(base: str | Path) -> dict[str, Path]:
    """The tiny model under ``base`` (a session's pytest temp root): built once, reused by every tier."""
    return build(Path(base) / "tiny-fastcomposer-cache")


def reference_pipeline(folder: str | Path):
    """Plain diffusers StableDiffusionPipeline on the reference folder (fp32, CPU), no Atelier code."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
