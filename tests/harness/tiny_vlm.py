"""Tiny random-weight Qwen2-VL / Qwen2.5-VL (/ Qwen3-VL) folders in the real Hugging Face layout.

``build(kind, dst)`` writes what a user downloads from the hub, at toy size: ``config.json``,
``model.safetensors``, ``generation_config.json`` (``save_pretrained``), the tokenizer files (from the Qwen2.5-VL
tokenizer ComfyUI ships in its tree, with the vision special tokens), ``preprocessor_config.json`` and the
multimodal chat template (``chat_template.json``). Outputs are noise, which is all parity tests need.

Sizes: text hidden 32, 1 layer; vision tower 1–2 blocks; images resized to 56²–112² pixels (4–16 visual tokens).
The vocabulary stays the real one (151,936 ids: the special tokens sit at 151,643+), tied to the LM head: ~5 M
parameters, ~20 MB per folder in fp32.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from .comfy_server import comfy_root

VOCAB = 151936
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112

# the chat template Qwen2-VL / Qwen2.5-VL ship in chat_template.json (images as <|vision_start|><|image_pad|>...)
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
             rope_theta=1000000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=1,
             attention_dropout=0.0, initializer_range=0.2, use_cache=True, tie_word_embeddings=True,
             bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
             vision_token_id=151654, image_token_id=151655, video_token_id=151656,
             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # head_dim 16 → 8 = 2 + 3 + 3

# config.json as the hub ships it (flat text settings + vision_config); loaded by the installed transformers,
# then written back by save_pretrained in that version's own layout
CONFIGS = {
    "qwen2_vl": dict(_TEXT, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
                     vision_config=dict(depth=1, embed_dim=32, mlp_ratio=2, num_heads=2, in_chans=3, in_channels=3,
                                        hidden_size=32, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                                        temporal_patch_size=2, hidden_act="quick_gelu", initializer_range=0.2)),
    "qwen2_5_vl": dict(_TEXT, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                       vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3,
                                          in_channels=3, out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                          spatial_patch_size=14, window_size=56, fullatt_block_indexes=[1],
                                          tokens_per_second=2, temporal_patch_size=2, hidden_act="silu",
                                          initializer_range=0.2)),
}

# what Qwen's Instruct repos ship: sampling settings the captioner must override for greedy runs
GENERATION_CONFIG = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=True,
                         temperature=0.01, top_k=1, top_p=0.001, repetition_penalty=1.05)

PREPROCESSOR = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                    merge_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])

CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}

KINDS = ("qwen2_vl", "qwen2_5_vl")


def tokenizer_dir() -> Path:
    """ComfyUI's Qwen2.5-VL tokenizer; $ATELIER_QWEN_TOKENIZER names a copy (the GPU machine has no ComfyUI)."""
    env = os.environ.get("ATELIER_QWEN_TOKENIZER")
    return Path(env) if env else comfy_root() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def _qwen3_config() -> dict:
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_theta=5000000.0, attention_bias=False, attention_dropout=0.0,
                initializer_range=0.2, use_cache=True, tie_word_embeddings=True, bos_token_id=151643,
                eos_token_id=151645,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=32,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh", initializer_range=0.2)
    return dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", text_config=text,
                vision_config=vision, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653, tie_word_embeddings=True)


def available(kind: str) -> bool:
    """Whether the installed transformers has this family's model and processor classes."""
    import transformers

    for name in CLASSES[kind]:
        try:
            getattr(transformers, name)
        except (AttributeError, ImportError):
            return False
    return True


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(), local_files_only=True)


def build(kind: str, dst: Path, seed: int = 0) -> Path:
    """Write a tiny random ``kind`` (qwen2_vl, qwen2_5_vl, qwen3_vl) model folder at ``dst``; returns ``dst``.

    An existing ``dst`` is reused (folders are built under a temporary name and renamed when complete).
    """
    import transformers
    from transformers import AutoConfig, GenerationConfig

    final = Path(dst)
    if final.is_dir():
        return final
    dst = final.with_name(final.name + ".partial")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    model_cls = getattr(transformers, CLASSES[kind][0])
    raw = _qwen3_config() if kind == "qwen3_vl" else CONFIGS[kind]
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    config = AutoConfig.from_pretrained(dst, local_files_only=True)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(dst, safe_serialization=True)  # config.json in this version's layout, weights

    write_processor_files(dst, kind)
    dst.rename(final)
    return final


def write_processor_files(dst: Path, kind: str, **preprocessor) -> None:
    """Tokenizer, preprocessor_config.json and chat_template.json beside a model's weights, as the hub ships them.

    ``preprocessor`` overrides PREPROCESSOR (e.g. the real min_pixels / max_pixels for full-size benchmarks).
    """
    dst = Path(dst)
    # the tokenizer files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json) from ComfyUI's copy
    _tokenizer().save_pretrained(dst)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir() / name, dst / name)
    # preprocessor_config.json and chat_template.json written the way the hub repos ship them (old and new
    # transformers read this layout; recent save_pretrained would write processor_config.json instead)
    pre = dict(PREPROCESSOR, image_processor_type="Qwen2VLImageProcessor", processor_class=CLASSES[kind][1])
    if kind == "qwen3_vl":
        pre.update(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128, image_mean=[0.5, 0.5, 0.5],
                   image_std=[0.5, 0.5, 0.5])
    pre.update(preprocessor)
    pre["size"] = {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]}
    (dst / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}, indent=2))
    tok_cfg = dst / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg.pop("chat_template", None)  # a text-only template there would shadow the processor's
    cfg["processor_class"] = CLASSES[kind][1]
    tok_cfg.write_text(json.dumps(cfg, indent=2))
    (dst / "chat_template.jinja").unlink(missing_ok=True)


def strip_weights(folder: Path) -> Path:
    """The same folder without its weights (what a half-finished download looks like)."""
    for f in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        f.unlink()
    return folder
