"""Tiny random-weight SDXL try-on models in the on-disk layouts users keep them.

* ``build_folder(dst, inpaint=True)``: a StableDiffusionXL(Inpaint)Pipeline folder written by ``save_pretrained``
  (the real CLIP tokenizer ComfyUI ships, twice: SDXL's second tokenizer pads with "!").
* ``export_checkpoint(folder, dst)``: the same weights as one ComfyUI/A1111 checkpoint (LDM/SGM key names, written
  with ComfyUI's own converters: an independent check of Atelier's single-file loader).
* ``build_controlnet(dst)`` (diffusers folder) and ``export_controlnet_file(folder, dst)`` (one file, same keys).
* ``build_clip_vision(dst_file, folder)``: a CLIPVisionModelWithProjection, as cubiq's single file and as the
  folder diffusers' ``load_ip_adapter`` reads (``image_encoder_folder``).
* ``ip_adapter_state(unet, clip, plus=False)`` + ``save_ip_adapter(state, path)``: a random IP-Adapter in h94's layout
  (``image_proj.*`` / ``ip_adapter.{1,3,5…}.to_k_ip``), .safetensors or .bin.
* ``kohya_lora(unet, text_encoder, path)``: a random LoRA in kohya/ComfyUI key names (``lora_unet_input_blocks_…``).
* ``sd15_checkpoint(path)``: a tiny file with SD1.5's key layout (for the "wrong model" error).

Everything is random and a few MB: outputs are noise, which is all parity tests need. Images: multiples of 64 px.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .comfy_server import comfy_root, import_comfy

TE_HIDDEN = 32
TE2_HIDDEN = 40  # unlike CLIP-L's width (diffusers' single-file loader tells the two encoders apart by width)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 1), transformer_layers_per_block=(1, 2), cross_attention_dim=TE_HIDDEN + TE2_HIDDEN,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TE2_HIDDEN, use_linear_projection=True, norm_num_groups=32)
# four levels like SDXL's VAE (ComfyUI's LDM converter assumes four): downscale 8
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
           latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025, force_upcast=False)
CLIP_TEXT = dict(vocab_size=49408, hidden_size=TE_HIDDEN, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=1, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                 eos_token_id=2, pad_token_id=1)
CONTROLNET = dict(in_channels=4, conditioning_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(1, 1),
                  transformer_layers_per_block=(1, 2), cross_attention_dim=TE_HIDDEN + TE2_HIDDEN,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + TE2_HIDDEN, use_linear_projection=True,
                  norm_num_groups=32, conditioning_embedding_out_channels=(16, 32, 96, 256))
CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, image_size=32,
                   patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
# SDXL's scheduler (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json)
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
                 num_train_timesteps=1000, prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None,
                 use_karras_sigmas=False, clip_sample=False)


def _comfy():
    """ComfyUI's own key converters (comfy.utils, comfy.diffusers_convert), imported without sys.path edits."""
    return import_comfy("comfy.utils"), import_comfy("comfy.diffusers_convert")


def tokenizers():
    from transformers import CLIPTokenizer

    path = comfy_root() / "comfy" / "sd1_tokenizer"
    return (CLIPTokenizer.from_pretrained(path, model_max_length=77),
            CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token="!"))


def build_pipeline(seed: int = 0, inpaint: bool = True):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(UNET, in_channels=9 if inpaint else 4))
    vae = AutoencoderKL(**VAE)
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, hidden_act="quick_gelu", projection_dim=TE_HIDDEN))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(CLIP_TEXT, hidden_size=TE2_HIDDEN), hidden_act="gelu",
                                                     projection_dim=TE2_HIDDEN))
    tok1, tok2 = tokenizers()
    return StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                            tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
                                            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)


def build_folder(dst: Path, seed: int = 0, inpaint: bool = True) -> Path:
    build_pipeline(seed, inpaint).save_pretrained(dst, safe_serialization=True)
    return dst


def _unet_ldm_config(unet) -> dict:
    c = unet.config
    n = c.layers_per_block
    depth = [0 if t == "DownBlock2D" else d for t, d in zip(c.down_block_types, c.transformer_layers_per_block)]
    return {"num_res_blocks": [n] * len(depth), "channel_mult": list(range(len(depth))),
            "transformer_depth": [d for d in depth for _ in range(n)],
            "transformer_depth_output": [d for d in depth for _ in range(n + 1)],
            "transformer_depth_middle": depth[-1]}


def unet_key_map(unet) -> dict:
    """diffusers UNet key -> LDM/SGM key (ComfyUI's own map)."""
    cu, _ = _comfy()
    return cu.unet_to_diffusers(_unet_ldm_config(unet))


def export_checkpoint(folder: Path, dst: Path) -> Path:
    """The folder's weights as one SDXL checkpoint (model.diffusion_model / first_stage_model / conditioner)."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from safetensors.torch import save_file

    cu, dc = _comfy()
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    out = {}
    key_map = unet_key_map(pipe.unet)
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + key_map[k]] = v
    for k, v in dc.convert_vae_state_dict(pipe.vae.state_dict()).items():
        out["first_stage_model." + k] = v
    clip = {}
    for k, v in pipe.text_encoder.state_dict().items():
        clip["clip_l.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    for k, v in pipe.text_encoder_2.state_dict().items():
        name = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
        clip["clip_g.transformer." + name] = v
    # what ComfyUI's SDXL checkpoint saver does (supported_models.SDXL.process_clip_state_dict_for_saving; that
    # module cannot be imported without a GPU): bigG to OpenCLIP names with ComfyUI's converter, CLIP-L as is
    g = dc.convert_text_enc_state_dict_v20(clip, "clip_g")
    for k, v in g.items():
        out["conditioner.embedders.1.model" + k[len("clip_g"):]] = v
    for k, v in clip.items():
        if k.startswith("clip_l") and not k.endswith(("text_projection.weight", "logit_scale")):
            out["conditioner.embedders.0" + k[len("clip_l"):]] = v
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77).expand((1, -1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, dst)
    return dst


def build_controlnet(dst: Path, seed: int = 1) -> Path:
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    ControlNetModel(**CONTROLNET).save_pretrained(dst, safe_serialization=True)
    return dst


def export_controlnet_file(folder: Path, dst: Path) -> Path:
    """The diffusers weights file alone, renamed (how SDXL depth ControlNets are usually downloaded)."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", dst)
    return dst


def build_clip_vision(dst_file: Path, folder: Path, seed: int = 2, **overrides):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(CLIP_VISION, **overrides)))
    model.save_pretrained(folder, safe_serialization=True)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dst_file)
    return model


def ip_adapter_state(unet, clip_config, plus: bool = False, tokens: int = 4, seed: int = 3,
                     resampler: tuple[int, int, int, int] = (32, 1, 64, 4)) -> dict:
    """A random IP-Adapter for ``unet`` in h94's layout: {"image_proj": {...}, "ip_adapter": {...}}.
    ``resampler`` (plus only): width, heads, head width, depth (diffusers assumes 64 and 4; h94's SDXL Plus: 1280, 20,
    64, 4; 16 tokens)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    cross = unet.config.cross_attention_dim
    if plus:  # Resampler (ip-adapter-plus): image hidden states -> 'tokens' queries
        (dim, heads, dim_head, depth), emb = resampler, clip_config.hidden_size
        proj = {"latents": r(1, tokens, dim), "proj_in.weight": r(dim, emb), "proj_in.bias": r(dim),
                "proj_out.weight": r(cross, dim), "proj_out.bias": r(cross),
                "norm_out.weight": 1 + r(cross), "norm_out.bias": r(cross)}
        for i in range(depth):
            p = f"layers.{i}"
            proj.update({f"{p}.0.norm1.weight": 1 + r(dim), f"{p}.0.norm1.bias": r(dim),
                         f"{p}.0.norm2.weight": 1 + r(dim), f"{p}.0.norm2.bias": r(dim),
                         f"{p}.0.to_q.weight": r(heads * dim_head, dim), f"{p}.0.to_kv.weight": r(2 * heads * dim_head, dim),
                         f"{p}.0.to_out.weight": r(dim, heads * dim_head),
                         f"{p}.1.0.weight": 1 + r(dim), f"{p}.1.0.bias": r(dim),
                         f"{p}.1.1.weight": r(4 * dim, dim), f"{p}.1.3.weight": r(dim, 4 * dim)})
    else:
        proj = {"proj.weight": r(tokens * cross, clip_config.projection_dim), "proj.bias": r(tokens * cross),
                "norm.weight": 1 + r(cross), "norm.bias": r(cross)}
    ip = {}
    key = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            hidden = module.to_k.weight.shape[0]
            ip[f"{key}.to_k_ip.weight"] = r(hidden, cross)
            ip[f"{key}.to_v_ip.weight"] = r(hidden, cross)
            key += 2
    return {"image_proj": proj, "ip_adapter": ip}


def save_ip_adapter(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}
        save_file(flat, path)
    else:
        torch.save(state, path)
    return path


def kohya_lora(unet, text_encoder, path: Path, rank: int = 4, seed: int = 4, alpha: float = 2.0) -> Path:
    """A random LoRA on the UNet's attention projections and the first text encoder, kohya/ComfyUI key names."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    key_map = unet_key_map(unet)
    out = {}

    def add(name: str, linear: torch.nn.Linear) -> None:
        out[f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(alpha)

    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
                                                    and ".attn" in name):
            ldm = key_map[f"{name}.weight"][: -len(".weight")]
            add("lora_unet_" + ldm.replace(".", "_"), module)
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            full = name if name.startswith("text_model.") else "text_model." + name
            add("lora_te1_" + full.replace(".", "_"), module)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, path)
    return path


def sd15_checkpoint(path: Path) -> Path:
    """A few tensors with SD1.5's key layout (4-channel UNet, CLIP-L under cond_stage_model)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 768),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, path)
    return path


IP_ADAPTER = "ip-adapter_sdxl_vit-h-tiny"
# Not a ViT-H name: the tiny SD1.5 character world (tests/harness/tiny_character.py) puts its own ViT-H-named
# encoders, of another width, in the same models/clip_vision of the shared test server. The character loader's
# `auto` picks an encoder by name (ViT-H), the try-on loader's by fit (the first whose width the adapter reads):
# with this name each world's `auto` lands on its own encoder, whatever order the server lists the files in.
CLIP_VISION_FILE = "tryon-sdxl-image-encoder-tiny.safetensors"


def build_world(root: Path) -> dict[str, Path]:
    """Every try-on file under ``root`` laid out like a ComfyUI models/ tree (idempotent); returns their paths.

    checkpoints/ (SDXL inpainting + base + an SD1.5-layout file), diffusers/ (the inpainting folder), controlnet/
    (folder + single file), clip_vision/ (the fitting encoder + one of another width), ipadapter/ (plain .safetensors
    and .bin, plus .safetensors; h94's folder layout with models/image_encoder for plain diffusers), loras/ (kohya)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(root)
    paths = {
        "folder": root / "diffusers" / "sdxl-inpaint-tiny",
        "base_folder": root / "work" / "sdxl-base-tiny",
        "checkpoint": root / "checkpoints" / "sdxl_inpaint_tiny.safetensors",
        "base_checkpoint": root / "checkpoints" / "sdxl_base_tiny.safetensors",
        "sd15": root / "checkpoints" / "sd15_tiny.safetensors",
        "controlnet_folder": root / "controlnet" / "controlnet-depth-sdxl-tiny",
        "controlnet_file": root / "controlnet" / "controlnet-depth-sdxl-tiny.safetensors",
        "clip_vision": root / "clip_vision" / CLIP_VISION_FILE,
        "clip_vision_other": root / "clip_vision" / "CLIP-ViT-bigG-14-laion2B-39B-b160k-tiny.safetensors",
        "h94": root / "work" / "h94",
        "ip_safetensors": root / "ipadapter" / f"{IP_ADAPTER}.safetensors",
        "ip_bin": root / "ipadapter" / f"{IP_ADAPTER}.bin",
        "ip_plus": root / "ipadapter" / "ip-adapter-plus_sdxl_vit-h-tiny.safetensors",
        "lora": root / "loras" / "tryon_kohya_tiny.safetensors",
    }
    done = root / ".tiny-sdxl-done"
    if done.exists():
        return paths
    build_folder(paths["folder"], inpaint=True)
    build_folder(paths["base_folder"], seed=5, inpaint=False)
    export_checkpoint(paths["folder"], paths["checkpoint"])
    export_checkpoint(paths["base_folder"], paths["base_checkpoint"])
    sd15_checkpoint(paths["sd15"])
    build_controlnet(paths["controlnet_folder"])
    export_controlnet_file(paths["controlnet_folder"], paths["controlnet_file"])
    h94 = paths["h94"]
    clip = build_clip_vision(paths["clip_vision"], h94 / "models" / "image_encoder")
    # other widths on both features (projection for plain adapters, hidden for Plus): `auto` never takes it
    build_clip_vision(paths["clip_vision_other"], root / "work" / "other_encoder", seed=6, projection_dim=20,
                      hidden_size=40)
    unet = UNet2DConditionModel.from_pretrained(paths["folder"], subfolder="unet")
    plain = ip_adapter_state(unet, clip.config)
    for key in ("ip_safetensors", "ip_bin"):
        save_ip_adapter(plain, paths[key])
        save_ip_adapter(plain, h94 / "sdxl_models" / paths[key].name)
    plus = ip_adapter_state(unet, clip.config, plus=True)
    save_ip_adapter(plus, paths["ip_plus"])
    save_ip_adapter(plus, h94 / "sdxl_models" / paths["ip_plus"].name)
    te = CLIPTextModel.from_pretrained(paths["folder"], subfolder="text_encoder")
    kohya_lora(unet, te, paths["lora"])
    done.write_text("ok")
    return paths
