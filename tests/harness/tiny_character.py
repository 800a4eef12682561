"""Tiny random-weight models for the realtime character, in the layouts users have on disk.

* ``build(root)`` → {name: path}: an SD1.5 diffusers folder (``sd15``), an OpenPose-style ControlNet folder
  (``controlnet``) and the same ControlNet as one diffusers-format file (``controlnet_file``), an SDXL-style
  ControlNet (``controlnet_sdxl``), an h94-layout IP-Adapter (``ip_adapter``), a Hugging Face CLIP vision file
  (``clip_vision``), an LCM LoRA (``lcm_lora``) and madebyollin-layout TAESD files (``taesd_decoder`` /
  ``taesd_encoder``, built from :class:`TaesdReference`, an independent description of TAESD's published layout).

Shapes keep SD1.5's proportions at toy size: 8× VAE, 8 heads per attention, 4 IP-Adapter tokens, 32 norm groups
(16 in the 16-wide VAE), one CLIP head: what a single file cannot say is what the loader assumes for unknown sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONTEXT = 32
CLIP_VISION_HIDDEN = 64
CLIP_VISION_PROJ = 48
IP_TOKENS = 4
CLIP_VISION_CONFIG = dict(hidden_size=CLIP_VISION_HIDDEN, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=1, image_size=32, patch_size=8, projection_dim=CLIP_VISION_PROJ,
                          hidden_act="gelu")


def _tokenizer_dir() -> Path:
    from tests.harness.comfy_server import comfy_root

    return Path(comfy_root()) / "comfy" / "sd1_tokenizer"


def _unet_kwargs() -> dict:
    return dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT,
                attention_head_dim=8, norm_num_groups=32)


def _randomize(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Every weight random (norm scales near 1), so nothing is a zero-initialised no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            one = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if one else 0.0))
    return module


class _TaesdBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class TaesdReference:
    """TAESD as madebyollin publishes it (taesd.py): an encoder and a decoder, each one ``nn.Sequential`` whose
    state-dict keys are the files' keys. ``decode(z)`` / ``encode(x)`` work in [-1, 1] images and SD latents."""

    def __init__(self, seed: int = 0, c: int = 64, latent: int = 4):
        def conv(i, o, **kw):
            return nn.Conv2d(i, o, 3, padding=1, **kw)

        blocks = lambda n: [_TaesdBlock(c) for _ in range(n)]  # noqa: E731
        self.encoder = nn.Sequential(conv(3, c), *blocks(1), conv(c, c, stride=2, bias=False), *blocks(3),
                                     conv(c, c, stride=2, bias=False), *blocks(3), conv(c, c, stride=2, bias=False),
                                     *blocks(3), conv(c, latent))
        up = lambda: [nn.Upsample(scale_factor=2), conv(c, c, bias=False)]  # noqa: E731
        self.decoder = nn.Sequential(_Clamp(), conv(latent, c), nn.ReLU(), *blocks(3), *up(), *blocks(3), *up(),
                                     *blocks(3), *up(), *blocks(1), conv(c, 3))
        _randomize(self.encoder, seed)
        _randomize(self.decoder, seed + 1)

    def decode(self, z):
        return self.decoder(z).mul(2).sub(1)

    def encode(self, x):
        return self.encoder(x.add(1).div(2))


def _ip_adapter_state(unet, image_embed: int, seed: int) -> dict[str, torch.Tensor]:
    """h94's layout: image_proj.{proj,norm} and ip_adapter.{1,3,5…}.to_{k,v}_ip (one pair per cross-attention)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    state = {"image_proj.proj.weight": rnd(CONTEXT * IP_TOKENS, image_embed),
             "image_proj.proj.bias": rnd(CONTEXT * IP_TOKENS),
             "image_proj.norm.weight": 1 + rnd(CONTEXT), "image_proj.norm.bias": rnd(CONTEXT)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            if name.startswith("mid_block"):
                hidden = unet.config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
            else:
                hidden = unet.config.block_out_channels[int(name.split(".")[1])]
            state[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, CONTEXT)
            state[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, CONTEXT)
            key += 2  # h94 numbers the processors attn1, attn2, …: cross-attentions are the odd ones
    return state


def build(root: str | Path) -> dict[str, Path]:
    """Every tiny model, under ``root`` (idempotent: reused when ``root/done.json`` exists)."""
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = Path(root)
    paths = {
        "sd15": root / "sd15-tiny", "controlnet": root / "controlnet" / "tiny-openpose",
        "controlnet_file": root / "controlnet" / "tiny_openpose_diffusers.safetensors",
        "controlnet_sdxl": root / "controlnet" / "tiny-sdxl-openpose",
        "ip_adapter": root / "ipadapter" / "ip-adapter_sd15_tiny.safetensors",
        "clip_vision": root / "clip_vision" / "CLIP-ViT-H-14-tiny.safetensors",
        "lcm_lora": root / "loras" / "tiny-lcm-lora-sdv1-5.safetensors",
        "taesd_decoder": root / "vae_approx" / "taesd_decoder.safetensors",
        "taesd_encoder": root / "vae_approx" / "taesd_encoder.safetensors",
    }
    if (root / "done.json").is_file():
        return paths
    torch.manual_seed(0)
    folder = paths["sd15"]
    unet = _randomize(UNet2DConditionModel(**_unet_kwargs()), 1)
    unet.save_pretrained(folder / "unet")
    vae = _randomize(AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=16, layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=64), 2)
    vae.save_pretrained(folder / "vae")
    text = CLIPTextModel(CLIPTextConfig(hidden_size=CONTEXT, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=1, vocab_size=49408, max_position_embeddings=77))
    _randomize(text, 3, 0.02).save_pretrained(folder / "text_encoder")
    sched = json.loads((Path(__file__).parents[2] / "atelier" / "configs" / "sd15" / "scheduler.json").read_text())
    PNDMScheduler.from_config(sched).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None]}), encoding="utf-8")

    cn_kwargs = {k: v for k, v in _unet_kwargs().items() if k not in ("up_block_types", "out_channels", "sample_size")}
    cn = _randomize(ControlNetModel(conditioning_embedding_out_channels=(8, 8, 8, 16), **cn_kwargs), 4)
    cn.save_pretrained(paths["controlnet"])
    paths["controlnet_file"].parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(paths["controlnet_file"]))
    xl = ControlNetModel(conditioning_embedding_out_channels=(8, 8, 8, 16), addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=CONTEXT + 6 * 8,
                         **{**cn_kwargs, "cross_attention_dim": 2048 // 32})
    xl.save_pretrained(paths["controlnet_sdxl"])

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG))
    _randomize(vision, 5, 0.05)
    paths["clip_vision"].parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(paths["clip_vision"]))
    paths["ip_adapter"].parent.mkdir(parents=True, exist_ok=True)
    save_file(_ip_adapter_state(unet, CLIP_VISION_PROJ, 6), str(paths["ip_adapter"]))

    _lora(unet, paths["lcm_lora"])
    taesd = TaesdReference(seed=7)
    paths["taesd_decoder"].parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in taesd.decoder.state_dict().items()}, str(paths["taesd_decoder"]))
    save_file({k: v.contiguous() for k, v in taesd.encoder.state_dict().items()}, str(paths["taesd_encoder"]))
    (root / "done.json").write_text("{}", encoding="utf-8")
    return paths


def _lora(unet, path: Path) -> None:
    """A diffusers-format LoRA on the UNet's attention projections, with non-zero up weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import copy

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in u.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = get_peft_model_state_dict(u)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=state, weight_name=path.name,
                                              safe_serialization=True)


def tokenizer_dir() -> str:
    return str(_tokenizer_dir())


def _comfy_unet_config(cfg) -> dict:
    """ComfyUI's description of a diffusers UNet/ControlNet config (what comfy.utils.unet_to_diffusers reads)."""
    levels = len(cfg.block_out_channels)
    attn = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    return {"num_res_blocks": [cfg.layers_per_block] * levels,
            "channel_mult": [c // cfg.block_out_channels[0] for c in cfg.block_out_channels],
            "transformer_depth": [int(a) for a in attn for _ in range(cfg.layers_per_block)],
            "transformer_depth_output": [int(a) for a in attn for _ in range(cfg.layers_per_block + 1)],
            "transformer_depth_middle": 1}


def export_ldm_controlnet(folder: Path, out: Path) -> Path:
    """The tiny ControlNet in lllyasviel's original layout (control_v11p_*.pth keys: input_blocks, zero_convs,
    input_hint_block, middle_block_out), as a safetensors file. The UNet part uses ComfyUI's key map; the
    ControlNet-only parts are numbered the way the original files number them (hint convs at even indices)."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    if out.is_file():
        return out
    from tests.harness.comfy_server import import_comfy

    unet_to_diffusers = import_comfy("comfy.utils").unet_to_diffusers

    cn = ControlNetModel.from_pretrained(folder)
    sd = cn.state_dict()
    mapping = {d: ldm for d, ldm in unet_to_diffusers(_comfy_unet_config(cn.config)).items() if d in sd}
    mapping.update({f"controlnet_mid_block.{w}": f"middle_block_out.0.{w}" for w in ("weight", "bias")})
    n_down = sum(1 for k in sd if k.startswith("controlnet_down_blocks.") and k.endswith(".weight"))
    n_blocks = sum(1 for k in sd if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    for w in ("weight", "bias"):
        mapping.update({f"controlnet_down_blocks.{i}.{w}": f"zero_convs.{i}.0.{w}" for i in range(n_down)})
        mapping[f"controlnet_cond_embedding.conv_in.{w}"] = f"input_hint_block.0.{w}"
        mapping.update({f"controlnet_cond_embedding.blocks.{i}.{w}": f"input_hint_block.{2 * (i + 1)}.{w}"
                        for i in range(n_blocks)})
        mapping[f"controlnet_cond_embedding.conv_out.{w}"] = f"input_hint_block.{2 * (n_blocks + 1)}.{w}"
    assert set(mapping) == set(sd), f"unmapped ControlNet keys: {sorted(set(sd) - set(mapping))[:5]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({mapping[k]: v.contiguous() for k, v in sd.items()}, str(out))
    return out


def export_ldm_checkpoint(sd15: Path, out: Path) -> Path:
    """The tiny SD1.5 folder as one original-layout checkpoint (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.*), written with ComfyUI's own diffusers → LDM key maps (comfy.utils,
    comfy.diffusers_convert): an independent description of the layout Atelier's loader reads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    if out.is_file():
        return out
    from tests.harness.comfy_server import import_comfy

    diffusers_convert = import_comfy("comfy.diffusers_convert")
    unet_to_diffusers = import_comfy("comfy.utils").unet_to_diffusers

    unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
    mapping = unet_to_diffusers(_comfy_unet_config(unet.config))
    usd = unet.state_dict()
    state = {f"model.diffusion_model.{ldm}": usd[d] for d, ldm in mapping.items() if d in usd}
    assert len(state) == len(usd), f"unmapped UNet keys: {sorted(set(usd) - set(mapping))[:5]}"
    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae").state_dict()
    state.update({f"first_stage_model.{k}": v for k, v in diffusers_convert.convert_vae_state_dict(vae).items()})
    text = CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder").state_dict()
    # SD1.5 files name them cond_stage_model.transformer.text_model.* (transformers 5 saves without text_model.)
    state.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}"): v
                  for k, v in text.items() if not k.endswith("position_ids")})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
