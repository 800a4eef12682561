"""Tiny random-weight FLUX.1 Fill models in both on-disk layouts the loader reads.

* ``build_diffusers(dst)``: a FluxFillPipeline folder written by ``save_pretrained`` (model_index.json,
  transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), with the real CLIP-L
  and T5 tokenizers that ComfyUI ships in its tree.
* ``export_single_files(pipeline_dir, models_dir)``: the same weights as ComfyUI users keep them:
  ``diffusion_models/`` (BFL key names, written with ComfyUI's own diffusers->BFL key map),
  ``text_encoders/`` (clip_l, t5xxl in Hugging Face names), ``vae/`` (LDM names, ComfyUI's converter).

Everything is random and small (a few MB): outputs are noise, which is all parity tests need.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .comfy_server import comfy_root, import_comfy

# shapes chosen so that every config the loader reads off a single file matches the diffusers config
TRANSFORMER = dict(patch_size=1, in_channels=288, out_channels=16, num_layers=1, num_single_layers=1,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                   pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
# four levels like FLUX's ae (ComfyUI's LDM converter assumes four): downscale 8, so sides are multiples of 16
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
           latent_channels=4, norm_num_groups=32, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
           scaling_factor=0.3611, shift_factor=0.1159)
CLIP = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5 = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
          layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
          use_cache=False, pad_token_id=0, eos_token_id=1)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

SINGLE_FILES = {
    "transformer": "diffusion_models/flux1-fill-tiny.safetensors",
    "clip_l": "text_encoders/clip_l_tiny.safetensors",
    "t5xxl": "text_encoders/t5xxl_tiny.safetensors",
    "vae": "vae/ae_tiny.safetensors",
}


def tokenizer_dirs() -> tuple[Path, Path]:
    root = comfy_root()
    return root / "comfy" / "sd1_tokenizer", root / "comfy" / "text_encoders" / "t5_tokenizer"


def build_pipeline(seed: int = 0, scale: int = 1):
    """A random FluxFillPipeline in memory (fp32, CPU). ``scale`` widens it (demo weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    tcfg = dict(TRANSFORMER, num_attention_heads=TRANSFORMER["num_attention_heads"] * scale)
    transformer = FluxTransformer2DModel(**tcfg)
    vae = AutoencoderKL(**VAE)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP))
    t5 = T5EncoderModel(T5Config(**T5))
    clip_tok, t5_tok = tokenizer_dirs()
    tokenizer = CLIPTokenizer.from_pretrained(clip_tok, model_max_length=77)
    tokenizer_2 = T5TokenizerFast.from_pretrained(t5_tok, model_max_length=512)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return FluxFillPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                            text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer).to(torch.float32)


def build_diffusers(dst: Path, seed: int = 0, scale: int = 1) -> Path:
    pipe = build_pipeline(seed, scale)
    pipe.save_pretrained(dst, safe_serialization=True)
    return dst


def _comfy_key_maps():
    # ComfyUI's own converters: an independent check of our loader
    dc, cu = import_comfy("comfy.diffusers_convert"), import_comfy("comfy.utils")

    return cu.flux_to_diffusers, dc.convert_vae_state_dict


def transformer_to_bfl(state: dict, hidden: int, depth: int, depth_single: int) -> dict:
    flux_to_diffusers, _ = _comfy_key_maps()
    key_map = flux_to_diffusers({"depth": depth, "depth_single_blocks": depth_single, "hidden_size": hidden})
    out: dict = {}
    pieces: dict = {}
    for dkey, w in state.items():
        target = key_map[dkey]
        if isinstance(target, str):
            out[target] = w
        elif target[1] is None:  # (name, None, fn): a function applied (swap_scale_shift is its own inverse)
            out[target[0]] = target[2](w)
        else:
            name, (_dim, offset, _size) = target
            pieces.setdefault(name, []).append((offset, w))
    for name, parts in pieces.items():
        out[name] = torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def export_single_files(pipeline_dir: Path, models_dir: Path) -> dict[str, Path]:
    """Write the pipeline's weights as ComfyUI-style single files under ``models_dir``; returns their paths."""
    from diffusers import FluxFillPipeline
    from safetensors.torch import save_file

    _, convert_vae = _comfy_key_maps()
    pipe = FluxFillPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32)
    cfg = pipe.transformer.config
    paths = {k: models_dir / v for k, v in SINGLE_FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    save_file(transformer_to_bfl(pipe.transformer.state_dict(), hidden, cfg.num_layers, cfg.num_single_layers),
              paths["transformer"])
    # real clip_l files use transformers 4's names ("text_model." prefix), whatever the installed version says
    clip = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.contiguous()
            for k, v in pipe.text_encoder.state_dict().items()}
    save_file(clip, paths["clip_l"])
    t5 = {k: v.clone().contiguous() for k, v in pipe.text_encoder_2.state_dict().items()}
    save_file(t5, paths["t5xxl"])
    save_file({k: v.contiguous() for k, v in convert_vae(pipe.vae.state_dict()).items()}, paths["vae"])
    return paths


def random_lora(transformer, path: Path, rank: int = 4, seed: int = 7) -> Path:
    """A random LoRA on the attention projections of ``transformer``, in diffusers/PEFT key names."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v")):
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path)
    return path


REDUX_FILES = {"redux": "style_models/flux1-redux-tiny.safetensors",
               "siglip": "clip_vision/sigclip_vision_patch14_384-tiny.safetensors"}


def build_redux(models_dir: Path, folder: Path | None = None, seed: int = 9) -> dict[str, Path]:
    """A tiny random FLUX Redux (SigLIP vision encoder + ReduxImageEncoder) as ComfyUI's single files under
    ``models_dir`` (style_models/, clip_vision/); with ``folder`` also a FluxPriorReduxPipeline folder (no text
    encoders) for plain diffusers."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=1, image_size=32, patch_size=8))
    embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=T5["d_model"])
    paths = {k: models_dir / v for k, v in REDUX_FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    # the files ComfyUI users have carry transformers 4's names ("vision_model." prefix)
    save_file({(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.contiguous()
               for k, v in encoder.state_dict().items()}, paths["siglip"])
    save_file({k: v.contiguous() for k, v in embedder.state_dict().items()}, paths["redux"])
    if folder is not None:
        FluxPriorReduxPipeline(image_encoder=encoder, image_embedder=embedder,
                               feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32})
                               ).save_pretrained(folder, safe_serialization=True)
    return paths
