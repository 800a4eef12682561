"""Tiny random-weight depth estimators in the transformers folder layout (save_pretrained): Depth Anything (V2 has
the same architecture and config class) and DPT, each with its image processor, as users keep them in models/depth."""

from __future__ import annotations

from pathlib import Path

import torch

SIZE = 56  # the processors' input side (a multiple of the 14-pixel patch)


def build_depth_anything(folder: Path, seed: int = 0) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTImageProcessor, Dinov2Config

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    backbone = Dinov2Config(image_size=SIZE, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                              fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    model = DepthAnythingForDepthEstimation(cfg).eval()
    model.save_pretrained(folder)
    # Depth Anything V2's preprocessor_config.json: DPT processor, keep aspect, multiple of 14, ImageNet mean/std
    DPTImageProcessor(do_resize=True, size={"height": SIZE, "width": SIZE}, keep_aspect_ratio=True,
                      ensure_multiple_of=14, resample=3, do_pad=False, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def build_dpt(folder: Path, seed: int = 1) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    cfg = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, head_in_index=-1, is_hybrid=False, reassemble_factors=[4, 2, 1, 0.5])
    model = DPTForDepthEstimation(cfg).eval()
    model.save_pretrained(folder)
    DPTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, keep_aspect_ratio=False,
                      ensure_multiple_of=8).save_pretrained(folder)
    return folder
