"""A tiny random-weight Qwen-Image-Layered (diffusers ``QwenImageLayeredPipeline``) in the real on-disk layout.

``build_diffusers(dst)`` writes what the hub repository Qwen/Qwen-Image-Layered holds, at toy size:
model_index.json, ``transformer/`` (QwenImageTransformer2DModel with the Layered flags ``use_layer3d_rope`` and
``use_additional_t_cond``), ``vae/`` (AutoencoderKLQwenImage with 4 image channels: RGBA in, RGBA out),
``text_encoder/`` (a tiny Qwen2.5-VL, vision tower included, with a generation_config like Qwen's), ``tokenizer/``
(the Qwen2.5-VL tokenizer ComfyUI ships in its tree), ``processor/`` (that tokenizer + a Qwen2VLImageProcessor
config written here, the way the hub ships preprocessor_config.json) and ``scheduler/``.

Captions: the random language model is set to answer <|im_end|> at once (an empty caption) so the pipeline's
own captioning takes a second, not the minute 512 random tokens would take on CPU.

Sizes: the VAE downsamples 16× (the real one 8×) so a 640-pixel bucket is 20×20 packed tokens per layer; the
transformer has 2 blocks of width 32; the text model hidden 32, 1 layer; captions see 4–16 vision tokens.
Everything is random: outputs are noise, which is all parity tests need. ~25 MB on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .comfy_server import comfy_root

VOCAB = 151936

TRANSFORMER = dict(patch_size=2, in_channels=32, out_channels=8, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=[8, 4, 4],
                   zero_cond_t=False, use_additional_t_cond=True, use_layer3d_rope=True)
# z_dim 8 → transformer in_channels 32 (2×2 packing); 4 downsamplings → vae_scale_factor 16. z_dim must not be 4:
# the pipeline takes a 4-channel (RGBA) tensor of latent_channels channels for ready-made latents
VAE = dict(base_dim=8, z_dim=8, dim_mult=[1, 1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True, True], dropout=0.0, input_channels=4,
           latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                 max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)

TEXT_ENCODER = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", vocab_size=VOCAB, hidden_size=32,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_act="silu",
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
    sliding_window=8192, max_window_layers=1, attention_dropout=0.0, initializer_range=0.02, use_cache=True,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
    vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655, video_token_id=151656,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16 → 8 rotary pairs = 2 + 3 + 3
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, in_channels=3,
                       out_hidden_size=32, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, temporal_patch_size=2,
                       hidden_act="silu"),
)
# what Qwen's repos ship: sampling settings that amount to greedy decoding (top_k 1)
GENERATION_CONFIG = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=True,
                         temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
PREPROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor",
                    do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3,
                    rescale_factor=1 / 255, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                    size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=14,
                    temporal_patch_size=2, merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_dir() -> Path:
    return comfy_root() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def _processor(dst: Path):
    """Write processor/ the way the hub ships it and load it back as a Qwen2VLProcessor."""
    from transformers import AutoTokenizer, Qwen2VLProcessor

    dst.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(tokenizer_dir(), local_files_only=True).save_pretrained(dst)
    (dst / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["processor_class"] = "Qwen2VLProcessor"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return Qwen2VLProcessor.from_pretrained(dst, local_files_only=True)


def _answer_eos_at_once(text_encoder) -> None:
    """Make the random language model end every caption at once (greedy: <|im_end|> wins the first step).

    The pipeline captions with ``max_new_tokens=512``; a random model would use all of them (a minute on CPU).
    Every token embedding gets a large first component and <|im_end|>'s a larger one: the last hidden state points
    along that component, so with the tied LM head <|im_end|> has the highest logit whatever the input.
    """
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, 0] = 5.0
        emb[GENERATION_CONFIG["eos_token_id"][0], 0] = 6.0


def build_pipeline(work: Path, seed: int = 0):
    """A random QwenImageLayeredPipeline in memory (fp32, CPU); ``work`` receives the processor files."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    work = Path(work)
    te_dir = work / "te_config"
    te_dir.mkdir(parents=True, exist_ok=True)
    (te_dir / "config.json").write_text(json.dumps(TEXT_ENCODER, indent=2))
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(**VAE)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(te_dir, local_files_only=True))
    text_encoder.generation_config = GenerationConfig(**GENERATION_CONFIG)
    _answer_eos_at_once(text_encoder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(), local_files_only=True)
    processor = _processor(work / "processor_src")
    pipe = QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                                    transformer=transformer)
    return pipe.to(torch.float32)


def build_diffusers(dst: Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder at ``dst`` (skipped when already complete); returns ``dst``."""
    dst = Path(dst)
    if (dst / "model_index.json").is_file() and (dst / "processor" / "preprocessor_config.json").is_file():
        return dst
    pipe = build_pipeline(dst.parent / f".{dst.name}-work", seed)
    pipe.save_pretrained(dst, safe_serialization=True)
    # the processor folder exactly as the hub has it (recent save_pretrained writes processor_config.json)
    _processor(dst / "processor")
    return dst


def shared_folder(base: Path) -> Path:
    """The tiny model under ``base`` (a session's pytest temp root): built once, reused by every tier."""
    return build_diffusers(Path(base) / "tiny-layered-cache" / "Qwen-Image-Layered-tiny")


def reference_pipeline(folder: Path):
    """Plain diffusers on the folder (fp32, CPU), no Atelier code."""
    from diffusers import QwenImageLayeredPipeline

    pipe = QwenImageLayeredPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_split(pipe, picture, *, prompt: str, layers: int, steps: int, cfg: float, seed: int,
                    resolution: int = 640, cfg_normalize: bool = True, use_en_prompt: bool = True):
    """The model card's call; returns (images: (layers, C, H, W) in [0, 1], final packed latents)."""
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    with torch.inference_mode():
        out = pipe(image=picture, prompt=prompt, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg,
                   layers=layers, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="pt", resolution=resolution, cfg_normalize=cfg_normalize,
                   use_en_prompt=use_en_prompt, callback_on_step_end=keep).images
    return out[0].float(), final["latents"]
