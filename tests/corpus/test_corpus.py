"""A corpus of bad and extreme inputs for every Atelier node, through POST /prompt of one real server.

One table (CASES): a row is (node, case id, graph builder, expected outcome). Outcomes:
* REJECT: HTTP 400 with node_errors (core's validation: min/max, types, missing inputs; ComfyUI 0.3.75 does not
  check V3 combo values, so an unknown combo value reaches the node, which must refuse it: ERROR);
* ERROR: an execution_error raised as an Atelier error (InputError / ModelFileError / SettingError) whose message
  says expected / got / fix — never a bare KeyError / IndexError / TypeError / NoneType text;
* OK: the prompt succeeds (a sane result: the outputs the node promises).
After every node's group, the server still answers and the group's good prompt runs again (a HEALTH row). At the
end no file was written outside output/ (hostile filename_prefix, zip-slip).
Adding a case is one row.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.harness.comfy_server import ComfyClient, PromptRejected

REJECT, ERROR, OK = "reject", "error", "ok"
DROP = object()  # an override that removes the input (a required input missing)
ATELIER_ERRORS = ("InputError", "ModelFileError", "SettingError")
BARE = re.compile(r"^\s*(KeyError|IndexError|TypeError|AttributeError|ValueError|RuntimeError|AssertionError)\b|"
                  r"NoneType|object has no attribute|list index out of range")
NAN, INF, BIG = "NaN", "Infinity", 2**64
KOREAN = "창가에 놓인 작은 도자기 꽃병, 부드러운 햇살"
EMOJI = "a vase 🌻🏺✨ on a table 👍🏽"
HUGE = "a vase " * 15_000  # 105k characters
SURROGATE = "a vase \ud83c with flowers"
DEEP = "[" * 100_000 + "]" * 100_000


class G:
    """A small API-format graph under construction."""

    def __init__(self):
        self.nodes: dict = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": {k: v for k, v in inputs.items() if v is not DROP}}
        return nid

    def img(self, w=32, h=32, b=1, color=0x8060A0) -> list:
        return [self.add("EmptyImage", width=w, height=h, batch_size=b, color=color), 0]

    def mask(self, v=1.0, w=32, h=32, b=1) -> list:
        src = self.add("EmptyImage", width=w, height=h, batch_size=b, color=int(round(v * 255)) << 16)
        return [self.add("ImageToMask", image=[src, 0], channel="red"), 0]

    def file(self, name: str) -> list:
        return [self.add("LoadImage", image=name), 0]

    def preview(self, ref: list, kind: str = "IMAGE") -> None:
        if kind == "IMAGE":
            self.add("PreviewImage", images=ref)
        else:
            self.add("PreviewAny", source=ref)


def _source(g: G, spec, default_kind: str = "img") -> list:
    """An image/mask input: a tuple (w, h, b[, color/value]) built from core nodes, a file name, or a link."""
    if spec is DROP or isinstance(spec, list):
        return spec
    if isinstance(spec, str):
        return g.file(spec)
    return g.img(*spec) if default_kind == "img" else g.mask(*spec)


def merge(defaults: dict, over: dict) -> dict:
    return {**defaults, **over}


# ------------------------------------------------------------------------------------------- node builders
# Each takes the loaders' combo values `c` and overrides; `loader=` overrides the loader's inputs.

FLUX_LOADER = dict(quantization="none", offload="auto", attention_slicing=False, vae_slicing=False, vae_tiling=False,
                   first_block_cache=0.0, dtype="auto")


def flux(c, image=(32, 32, 1), mask=(1.0, 32, 32, 1), loader=None, **kw):
    g = G()
    pipe = g.add("AtelierFluxFillLoader", **merge({**FLUX_LOADER, "model": c["AtelierFluxFillLoader"]}, loader or {}))
    out = g.add("AtelierFluxFill", pipe=[pipe, 0], image=_source(g, image), mask=_source(g, mask, "mask"),
                **merge(dict(prompt="a vase", steps=1, guidance=30.0, seed=0, composite_back=True), kw))
    g.preview([out, 0])
    return g.nodes


def caption(c, image=(32, 32, 1), loader=None, **kw):
    g = G()
    vlm = g.add("AtelierVLMLoader", **merge(dict(model=c["AtelierVLMLoader"], quantization="none", offload="auto",
                                                 dtype="auto"), loader or {}))
    out = g.add("AtelierCaption", vlm=[vlm, 0], image=_source(g, image),
                **merge(dict(task="caption", instruction="", language="en", max_new_tokens=4, seed=0,
                             temperature=0.0), kw))
    g.preview([out, 0], "STRING")
    return g.nodes


def bg(c, image=(32, 32, 1), loader=None, **kw):
    g = G()
    rem = g.add("AtelierBackgroundRemoverLoader", **merge(dict(model=c["AtelierBackgroundRemoverLoader"],
                                                               dtype="auto", device="auto"), loader or {}))
    out = g.add("AtelierRemoveBackground", remover=[rem, 0], image=_source(g, image),
                **merge(dict(resolution=0, mask_threshold=0.0), kw))
    g.preview([out, 0])
    return g.nodes


def sam2(c, image=(64, 48, 1), loader=None, **kw):
    g = G()
    model = g.add("AtelierSAM2Loader", **merge(dict(model=c["AtelierSAM2Loader"], dtype="auto"), loader or {}))
    out = g.add("AtelierSAM2Segment", sam2=[model, 0], image=_source(g, image),
                **merge(dict(points="[[20, 20]]", negative_points="", boxes="", multimask=False), kw))
    g.preview([out, 0], "MASK")
    return g.nodes


def place(c, background=(64, 48, 1), obj=(24, 24, 1), obj_mask=(1.0, 24, 24, 1), **kw):
    g = G()
    out = g.add("AtelierPlacementMask", background=_source(g, background), object=_source(g, obj),
                object_mask=_source(g, obj_mask, "mask"),
                **merge(dict(x=0.5, y=0.8, scale=0.4, anchor="bottom", mode="harmonize", band=4, feather=2,
                             shadow=True), kw))
    g.preview([out, 0])
    return g.nodes


def split(c, image=(32, 32, 1), loader=None, **kw):
    g = G()
    pipe = g.add("AtelierLayeredLoader", **merge(dict(model=c["AtelierLayeredLoader"], quantization="none",
                                                      offload="auto", vae_slicing=False, vae_tiling=False,
                                                      first_block_cache=0.0, dtype="auto"), loader or {}))
    out = g.add("AtelierSplitLayers", pipe=[pipe, 0], image=_source(g, image),
                **merge(dict(layers=2, resolution="640", steps=2, cfg=4.0, seed=0, prompt="a box", language="en",
                             cfg_normalize=True), kw))
    g.preview([out, 0])
    return g.nodes


def load_layers(c, file="atelier_layers_example.psd"):
    g = G()
    out = g.add("AtelierLoadLayers", file=file)
    g.preview([out, 0])
    return g.nodes


def combine(c, layers=(16, 16, 3), alphas=(1.0, 16, 16, 3), **kw):
    g = G()
    out = g.add("AtelierCombineLayers", layers=_source(g, layers), alphas=_source(g, alphas, "mask"),
                **merge(dict(order=""), kw))
    g.preview([out, 0])
    return g.nodes


def export(c, layers=(16, 16, 2), alphas=(1.0, 16, 16, 2), **kw):
    g = G()
    g.add("AtelierExportLayers", layers=_source(g, layers), alphas=_source(g, alphas, "mask"),
          **merge(dict(format="zip", filename_prefix="corpus/export", layer_names=""), kw))
    return g.nodes


def pose(c, image=(48, 64, 1), **kw):
    g = G()
    out = g.add("AtelierPose", image=_source(g, image), **merge(dict(model=c["AtelierPose"], min_confidence=0.5,
                                                                     keypoints_in=""), kw))
    g.preview([out, 0])
    return g.nodes


def garment(c, image="atelier_person.png", person_mask=None, **kw):
    g = G()
    extra = {"person_mask": _source(g, person_mask, "mask")} if person_mask is not None else {}
    out = g.add("AtelierGarmentMask", image=_source(g, image), **extra,
                **merge(dict(garment="upper_body", expand=0.0, protect_face=True, protect_hands=True,
                             model=c["AtelierGarmentMask"]), kw))
    g.preview([out, 0], "MASK")
    return g.nodes


def depth(c, image=(32, 32, 1), **kw):
    g = G()
    out = g.add("AtelierDepth", image=_source(g, image), **merge(dict(model=c["AtelierDepth"], resolution=0), kw))
    g.preview([out, 0])
    return g.nodes


def compose(c, subjects=(32, 32, 1), masks=None, loader=None, **kw):
    g = G()
    comp = g.add("AtelierFastComposerLoader", **merge(dict(model=c["AtelierFastComposerLoader"], offload="auto",
                                                           attention_slicing=False, vae_slicing=False, dtype="auto",
                                                           base="none"), loader or {}))
    extra = {"subject_masks": _source(g, masks, "mask")} if masks is not None else {}
    out = g.add("AtelierFastComposer", composer=[comp, 0], subjects=_source(g, subjects), **extra,
                **merge(dict(prompt="a man <subject> in a park", negative_prompt="", alpha=0.2, steps=1,
                             guidance=5.0, seed=0, width=64, height=64), kw))
    g.preview([out, 0])
    return g.nodes


CHARACTER_LOADER = dict(controlnet=None, ip_adapter=None, clip_vision="auto", fast_lora=None, vae=None, offload="auto",
                        attention_slicing=False, vae_slicing=False, dtype="auto", compile=False)


def animate(c, pose_image=(64, 64, 1), reference=(48, 64, 1), loader=None, **kw):
    g = G()
    base = {**CHARACTER_LOADER, **c["character"], "model": c["AtelierCharacterLoader"]}
    ch = g.add("AtelierCharacterLoader", **merge(base, loader or {}))
    out = g.add("AtelierAnimateCharacter", character=[ch, 0], pose_image=_source(g, pose_image),
                reference=_source(g, reference),
                **merge(dict(prompt="a girl in a red coat", steps=1, guidance=1.0, controlnet_scale=1.0,
                             ip_adapter_scale=0.6, reuse=0.5, reset_every=0, batch=1, seed=0, keyframe_prompts=""),
                        kw))
    g.preview([out, 0])
    return g.nodes


TRYON_LORA = "tryon_kohya_tiny.safetensors"  # tests/harness/tiny_sdxl.py's kohya LoRA, placed with the try-on models
TRYON_LOADER = dict(controlnet="none", ip_adapter="none", clip_vision="auto", quantization="none", offload="auto",
                    attention_slicing=False, vae_slicing=False, vae_tiling=False, dtype="auto")


def tryon(c, person=(64, 64, 1), garment=(40, 48, 1), mask=(1.0, 64, 64, 1), depth=None, loader=None, lora=None,
          **kw):
    g = G()
    pipe = g.add("AtelierTryOnLoader", **merge({**TRYON_LOADER, "model": c["AtelierTryOnLoader"]}, loader or {}))
    if lora is not None:
        pipe = g.add("AtelierLoRA", pipe=[pipe, 0], **merge(dict(lora=TRYON_LORA, strength=1.0), lora))
    extra = {"depth": _source(g, depth)} if depth is not None else {}
    out = g.add("AtelierTryOn", pipe=[pipe, 0], person=_source(g, person), garment=_source(g, garment),
                mask=_source(g, mask, "mask"), **extra,
                **merge(dict(prompt="a red shirt", negative_prompt="", ip_adapter_scale=0.8, controlnet_scale=0.6,
                             strength=0.99, steps=2, guidance=7.0, seed=0, composite_back=True), kw))
    g.preview([out, 0])
    return g.nodes


def lora_sdxl(c, **kw):
    return tryon(c, lora=kw)


def flux_tryon(c, person=(32, 32, 1), garment=(24, 32, 1), mask=(1.0, 32, 32, 1), redux=None, **kw):
    g = G()
    pipe = g.add("AtelierFluxFillLoader", **merge({**FLUX_LOADER, "model": c["AtelierFluxFillLoader"]}, {}))
    extra = {}
    if redux is not None:
        extra["redux"] = [g.add("AtelierReduxLoader", **merge(dict(redux="none", siglip="auto", dtype="auto"), redux)), 0]
    out = g.add("AtelierFluxTryOn", pipe=[pipe, 0], person=_source(g, person), garment=_source(g, garment),
                mask=_source(g, mask, "mask"), **extra,
                **merge(dict(prompt="a red shirt", steps=1, guidance=30.0, seed=0, height=32, margin=0.15), kw))
    g.preview([out, 0])
    return g.nodes


def redux_loader(c, **kw):
    return flux_tryon(c, redux=kw)


# ------------------------------------------------------------------------------------------------ the table
# (node, case id, builder, overrides, expected, text the message must contain or None)

ROWS = [
    # --- FLUX Fill (loader + inpaint)
    ("AtelierFluxFill", "good", flux, {}, OK, None),
    ("AtelierFluxFill", "empty_mask", flux, dict(mask=(0.0, 32, 32, 1)), OK, None),
    ("AtelierFluxFill", "1x1", flux, dict(image=(1, 1, 1), mask=(1.0, 1, 1, 1)), OK, None),
    ("AtelierFluxFill", "8x8", flux, dict(image=(8, 8, 1), mask=(1.0, 8, 8, 1)), OK, None),
    ("AtelierFluxFill", "4096x16", flux, dict(image=(4096, 16, 1), mask=(1.0, 4096, 16, 1)), OK, None),
    ("AtelierFluxFill", "odd_33x17", flux, dict(image=(33, 17, 1), mask=(1.0, 33, 17, 1)), OK, None),
    ("AtelierFluxFill", "batch_mismatch", flux, dict(image=(32, 32, 2), mask=(1.0, 32, 32, 3)), ERROR, "mask"),
    ("AtelierFluxFill", "mask_size_mismatch", flux, dict(mask=(1.0, 16, 16, 1)), ERROR, "mask"),
    ("AtelierFluxFill", "gray_png", flux, dict(image="corpus/gray.png", mask=(1.0, 20, 24, 1)), OK, None),
    ("AtelierFluxFill", "rgba_png", flux, dict(image="corpus/rgba.png", mask=(1.0, 20, 24, 1)), OK, None),
    ("AtelierFluxFill", "16bit_png", flux, dict(image="corpus/deep16.png", mask=(1.0, 20, 24, 1)), OK, None),
    ("AtelierFluxFill", "guidance_nan", flux, dict(guidance=NAN), ERROR, "guidance"),
    ("AtelierFluxFill", "guidance_inf", flux, dict(guidance=INF), REJECT, None),
    ("AtelierFluxFill", "guidance_negative", flux, dict(guidance=-1.0), REJECT, None),
    ("AtelierFluxFill", "guidance_huge", flux, dict(guidance=1e300), REJECT, None),
    ("AtelierFluxFill", "steps_0", flux, dict(steps=0), REJECT, None),
    ("AtelierFluxFill", "steps_2p64", flux, dict(steps=BIG), REJECT, None),
    ("AtelierFluxFill", "steps_text", flux, dict(steps="abc"), REJECT, None),
    ("AtelierFluxFill", "seed_negative", flux, dict(seed=-1), REJECT, None),
    ("AtelierFluxFill", "seed_2p64", flux, dict(seed=BIG), REJECT, None),
    ("AtelierFluxFill", "seed_max", flux, dict(seed=BIG - 1), OK, None),
    ("AtelierFluxFill", "prompt_korean", flux, dict(prompt=KOREAN), OK, None),
    ("AtelierFluxFill", "prompt_emoji", flux, dict(prompt=EMOJI), OK, None),
    ("AtelierFluxFill", "prompt_100k", flux, dict(prompt=HUGE), OK, None),
    ("AtelierFluxFill", "prompt_surrogate", flux, dict(prompt=SURROGATE), ERROR, "prompt"),
    ("AtelierFluxFill", "prompt_missing", flux, dict(prompt=DROP), REJECT, None),
    ("AtelierFluxFill", "image_missing", flux, dict(image=DROP), REJECT, None),
    ("AtelierFluxFill", "loader_model_dotdot", flux, dict(loader=dict(model="../../../etc/passwd")), ERROR, None),
    ("AtelierFluxFill", "loader_model_unknown", flux, dict(loader=dict(model="diffusers/nope")), ERROR, None),
    ("AtelierFluxFill", "loader_quant_unknown", flux, dict(loader=dict(quantization="fp3")), ERROR, None),
    ("AtelierFluxFill", "loader_offload_unknown", flux, dict(loader=dict(offload="disk")), ERROR, None),
    ("AtelierFluxFill", "loader_fbc_nan", flux, dict(loader=dict(first_block_cache=NAN)), ERROR, "first_block_cache"),
    ("AtelierFluxFill", "loader_fbc_2", flux, dict(loader=dict(first_block_cache=2.0)), REJECT, None),
    ("AtelierFluxFill", "truncated_safetensors", flux,
     dict(loader=dict(model="diffusion_models/flux1-fill-truncated.safetensors")), ERROR, "flux1-fill-truncated"),
    ("AtelierFluxFill", "lying_header", flux,
     dict(loader=dict(model="diffusion_models/flux1-fill-lying.safetensors")), ERROR, "flux1-fill-lying"),
    ("AtelierFluxFill", "zero_byte_clip_l", flux, dict(loader=dict(
        model="diffusion_models/flux1-fill-tiny.safetensors", clip_l="corrupt_zero_te.safetensors")), ERROR,
     "corrupt_zero_te"),
    ("AtelierFluxFill", "text_clip_l", flux, dict(loader=dict(
        model="diffusion_models/flux1-fill-tiny.safetensors", clip_l="corrupt_text_te.safetensors")), ERROR,
     "corrupt_text_te"),
    ("AtelierFluxFill", "lying_vae", flux, dict(loader=dict(
        model="diffusion_models/flux1-fill-tiny.safetensors", vae="corrupt_lying_v.safetensors")), ERROR,
     "corrupt_lying_v"),
    ("AtelierFluxFill", "folder_without_parts", flux, dict(loader=dict(model="diffusers/not-a-flux")), ERROR,
     "not-a-flux"),
    # --- Caption (VLM loader + caption)
    ("AtelierCaption", "good", caption, {}, OK, None),
    ("AtelierCaption", "1x1", caption, dict(image=(1, 1, 1)), OK, None),
    ("AtelierCaption", "4096x16", caption, dict(image=(4096, 16, 1)), OK, None),
    ("AtelierCaption", "odd_31x17", caption, dict(image=(31, 17, 1)), OK, None),
    ("AtelierCaption", "batch_3", caption, dict(image=(32, 32, 3)), OK, None),
    ("AtelierCaption", "rgba_png", caption, dict(image="corpus/rgba.png"), OK, None),
    ("AtelierCaption", "task_unknown", caption, dict(task="poem"), ERROR, None),
    ("AtelierCaption", "language_unknown", caption, dict(language="xx"), ERROR, None),
    ("AtelierCaption", "tokens_0", caption, dict(max_new_tokens=0), REJECT, None),
    ("AtelierCaption", "tokens_2p64", caption, dict(max_new_tokens=BIG), REJECT, None),
    ("AtelierCaption", "temperature_nan", caption, dict(temperature=NAN), ERROR, "temperature"),
    ("AtelierCaption", "temperature_negative", caption, dict(temperature=-0.5), REJECT, None),
    ("AtelierCaption", "instruction_korean", caption, dict(task="custom", instruction=KOREAN), OK, None),
    ("AtelierCaption", "instruction_emoji", caption, dict(task="custom", instruction=EMOJI), OK, None),
    ("AtelierCaption", "instruction_surrogate", caption, dict(task="custom", instruction=SURROGATE), ERROR,
     "instruction"),
    ("AtelierCaption", "loader_dotdot", caption, dict(loader=dict(model="../../secrets")), ERROR, None),
    ("AtelierCaption", "loader_quant_unknown", caption, dict(loader=dict(quantization="int3")), ERROR, None),
    ("AtelierCaption", "loader_escape", caption, dict(loader=dict(model="../diffusers/flux-fill-tiny")), ERROR,
     "leave models/LLM"),
    ("AtelierCaption", "broken_vlm_folder", caption, dict(loader=dict(model="broken-vlm")), ERROR, "broken-vlm"),
    # --- Background removal
    ("AtelierRemoveBackground", "good", bg, {}, OK, None),
    ("AtelierRemoveBackground", "1x1", bg, dict(image=(1, 1, 1)), OK, None),
    ("AtelierRemoveBackground", "8x8", bg, dict(image=(8, 8, 1)), OK, None),
    ("AtelierRemoveBackground", "4096x16", bg, dict(image=(4096, 16, 1)), OK, None),
    ("AtelierRemoveBackground", "odd_33x17_batch3", bg, dict(image=(33, 17, 3)), OK, None),
    ("AtelierRemoveBackground", "gray_png", bg, dict(image="corpus/gray.png"), OK, None),
    ("AtelierRemoveBackground", "16bit_png", bg, dict(image="corpus/deep16.png"), OK, None),
    ("AtelierRemoveBackground", "resolution_negative", bg, dict(resolution=-32), REJECT, None),
    ("AtelierRemoveBackground", "resolution_2p64", bg, dict(resolution=BIG), REJECT, None),
    ("AtelierRemoveBackground", "threshold_nan", bg, dict(mask_threshold=NAN), ERROR, "mask_threshold"),
    ("AtelierRemoveBackground", "threshold_2", bg, dict(mask_threshold=2.0), REJECT, None),
    # ComfyUI's folder_paths turns "../u2netp.onnx" into "u2netp.onnx": read inside models/, a sane result
    ("AtelierRemoveBackground", "model_dotdot", bg, dict(loader=dict(model="../u2netp.onnx")), OK, None),
    ("AtelierRemoveBackground", "device_unknown", bg, dict(loader=dict(device="tpu")), ERROR, "device"),
    ("AtelierRemoveBackground", "text_onnx", bg, dict(loader=dict(model="corrupt_text.onnx")), ERROR,
     "corrupt_text.onnx"),
    ("AtelierRemoveBackground", "zero_onnx", bg, dict(loader=dict(model="zero.onnx")), ERROR, "zero.onnx"),
    ("AtelierRemoveBackground", "truncated_safetensors", bg, dict(loader=dict(model="truncated.safetensors")), ERROR,
     "truncated.safetensors"),
    # --- SAM2
    ("AtelierSAM2Segment", "good", sam2, {}, OK, None),
    ("AtelierSAM2Segment", "box", sam2, dict(points="", boxes="[[4, 4, 40, 30]]"), OK, None),
    ("AtelierSAM2Segment", "dict_points", sam2, dict(points='[{"x": 10, "y": 10}]'), OK, None),
    ("AtelierSAM2Segment", "1x1", sam2, dict(image=(1, 1, 1), points="[[0, 0]]"), OK, None),
    ("AtelierSAM2Segment", "4096x16", sam2, dict(image=(4096, 16, 1), points="[[2000, 8]]"), OK, None),
    ("AtelierSAM2Segment", "batch_2", sam2, dict(image=(64, 48, 2)), OK, None),
    ("AtelierSAM2Segment", "malformed_json", sam2, dict(points="[[1, 2]"), ERROR, "points"),
    ("AtelierSAM2Segment", "single_quotes", sam2, dict(points="[{'x': 1, 'y': 2}]"), ERROR, "points"),
    ("AtelierSAM2Segment", "deep_nesting", sam2, dict(points=DEEP), ERROR, "points"),
    ("AtelierSAM2Segment", "wrong_shape", sam2, dict(points="[[1]]"), ERROR, "points"),
    ("AtelierSAM2Segment", "object_not_list", sam2, dict(points='{"a": 1}'), ERROR, "points"),
    ("AtelierSAM2Segment", "strings_as_numbers", sam2, dict(points='[["1", "2"]]'), ERROR, "points"),
    ("AtelierSAM2Segment", "overflow_number", sam2, dict(points="[[1e400, 2]]"), ERROR, "points"),
    ("AtelierSAM2Segment", "outside_image", sam2, dict(points="[[5000, 5]]"), ERROR, "points"),
    ("AtelierSAM2Segment", "negative_coords", sam2, dict(points="[[-5, 5]]"), ERROR, "points"),
    ("AtelierSAM2Segment", "nothing", sam2, dict(points=""), ERROR, "point"),
    ("AtelierSAM2Segment", "only_negative", sam2, dict(points="", negative_points="[[1, 1]]"), ERROR, "negative"),
    ("AtelierSAM2Segment", "box_inverted", sam2, dict(points="", boxes="[[40, 30, 4, 4]]"), ERROR, "boxes"),
    ("AtelierSAM2Segment", "box_malformed", sam2, dict(points="", boxes="[[1, 2, 3]]"), ERROR, "boxes"),
    ("AtelierSAM2Segment", "negative_malformed", sam2, dict(negative_points="{{"), ERROR, "negative_points"),
    ("AtelierSAM2Segment", "many_points", sam2, dict(points=str([[i % 60, i % 40] for i in range(2000)])), OK, None),
    ("AtelierSAM2Segment", "points_surrogate", sam2, dict(points="[[1, 2]] \udc00"), ERROR, "points"),
    ("AtelierSAM2Segment", "model_dotdot", sam2, dict(loader=dict(model="../../x.pt")), ERROR, None),
    ("AtelierSAM2Segment", "text_pt", sam2, dict(loader=dict(model="corrupt_text.pt")), ERROR, "corrupt_text.pt"),
    ("AtelierSAM2Segment", "zero_pt", sam2, dict(loader=dict(model="zero.pt")), ERROR, "zero.pt"),
    ("AtelierSAM2Segment", "truncated_safetensors", sam2, dict(loader=dict(model="truncated.safetensors")), ERROR,
     "truncated.safetensors"),
    # --- Placement
    ("AtelierPlacementMask", "good", place, {}, OK, None),
    ("AtelierPlacementMask", "1x1_background", place, dict(background=(1, 1, 1)), OK, None),
    ("AtelierPlacementMask", "object_bigger", place, dict(obj=(200, 200, 1), obj_mask=(1.0, 200, 200, 1)), OK, None),
    ("AtelierPlacementMask", "4096x16", place, dict(background=(4096, 16, 1)), OK, None),
    ("AtelierPlacementMask", "empty_object_mask", place, dict(obj_mask=(0.0, 24, 24, 1)), ERROR, "mask"),
    ("AtelierPlacementMask", "mask_size_mismatch", place, dict(obj_mask=(1.0, 10, 10, 1)), ERROR, "mask"),
    ("AtelierPlacementMask", "batch_mismatch", place, dict(background=(64, 48, 2), obj=(24, 24, 3),
                                                           obj_mask=(1.0, 24, 24, 3)), ERROR, None),
    ("AtelierPlacementMask", "x_nan", place, dict(x=NAN), ERROR, "'x'"),
    ("AtelierPlacementMask", "x_2", place, dict(x=2.0), REJECT, None),
    ("AtelierPlacementMask", "scale_0", place, dict(scale=0.0), REJECT, None),
    ("AtelierPlacementMask", "band_2p64", place, dict(band=BIG), REJECT, None),
    ("AtelierPlacementMask", "feather_negative", place, dict(feather=-1), REJECT, None),
    ("AtelierPlacementMask", "anchor_unknown", place, dict(anchor="middle-ish"), ERROR, None),
    ("AtelierPlacementMask", "mode_unknown", place, dict(mode="magic"), ERROR, None),
    # --- Qwen-Image-Layered split
    ("AtelierSplitLayers", "good", split, {}, OK, None),
    ("AtelierSplitLayers", "4096x16", split, dict(image=(4096, 16, 1)), OK, None),
    ("AtelierSplitLayers", "layers_0", split, dict(layers=0), REJECT, None),
    ("AtelierSplitLayers", "layers_2p64", split, dict(layers=BIG), REJECT, None),
    ("AtelierSplitLayers", "steps_1", split, dict(steps=1), REJECT, None),
    ("AtelierSplitLayers", "resolution_unknown", split, dict(resolution="513"), ERROR, None),
    ("AtelierSplitLayers", "cfg_nan", split, dict(cfg=NAN), ERROR, "cfg"),
    ("AtelierSplitLayers", "prompt_surrogate", split, dict(prompt=SURROGATE), ERROR, "prompt"),
    ("AtelierSplitLayers", "loader_other_model", split, dict(loader=dict(model="diffusers/flux-fill-tiny")), ERROR,
     None),
    ("AtelierSplitLayers", "loader_fbc_nan", split, dict(loader=dict(first_block_cache=NAN)), ERROR,
     "first_block_cache"),
    # --- Load Layers
    ("AtelierLoadLayers", "good", load_layers, {}, OK, None),
    ("AtelierLoadLayers", "dotdot", load_layers, dict(file="../../../etc/passwd"), ERROR, "input"),
    ("AtelierLoadLayers", "absolute", load_layers, dict(file="/etc/hostname"), ERROR, "input"),
    ("AtelierLoadLayers", "missing", load_layers, dict(file="nope.psd"), ERROR, "nope.psd"),
    ("AtelierLoadLayers", "empty_name", load_layers, dict(file=""), ERROR, None),
    ("AtelierLoadLayers", "wrong_extension", load_layers, dict(file="atelier_background.png"), ERROR, None),
    ("AtelierLoadLayers", "psd_is_text", load_layers, dict(file="corpus/fake.psd"), ERROR, "fake.psd"),
    ("AtelierLoadLayers", "psd_zero_bytes", load_layers, dict(file="corpus/zero.psd"), ERROR, "zero.psd"),
    ("AtelierLoadLayers", "pptx_is_text", load_layers, dict(file="corpus/fake.pptx"), ERROR, "pptx"),
    ("AtelierLoadLayers", "zip_is_text", load_layers, dict(file="corpus/fake.zip"), ERROR, "fake.zip"),
    ("AtelierLoadLayers", "zip_slip", load_layers, dict(file="corpus/slip.zip"), OK, None),
    ("AtelierLoadLayers", "zip_slip_manifest", load_layers, dict(file="corpus/slip_manifest.zip"), OK, None),
    ("AtelierLoadLayers", "zip_bomb_declared", load_layers, dict(file="corpus/bomb_declared.zip"), ERROR, "GiB"),
    ("AtelierLoadLayers", "zip_bomb_many", load_layers, dict(file="corpus/bomb_many.zip"), OK, None),
    ("AtelierLoadLayers", "manifest_bad_json", load_layers, dict(file="corpus/manifest_bad_json.zip"), ERROR,
     "manifest"),
    ("AtelierLoadLayers", "manifest_bounds_x", load_layers, dict(file="corpus/manifest_bounds_x.zip"), ERROR,
     "bounds.left"),
    ("AtelierLoadLayers", "manifest_huge_canvas", load_layers, dict(file="corpus/manifest_huge_canvas.zip"), ERROR,
     "canvas"),
    ("AtelierLoadLayers", "manifest_missing_member", load_layers, dict(file="corpus/manifest_missing.zip"), ERROR,
     "gone.png"),
    ("AtelierLoadLayers", "png_is_text", load_layers, dict(file="corpus/png_is_text.zip"), ERROR, "l.png"),
    ("AtelierLoadLayers", "empty_zip", load_layers, dict(file="corpus/empty.zip"), ERROR, "empty.zip"),
    ("AtelierLoadLayers", "name_surrogate", load_layers, dict(file="a\udc80.psd"), ERROR, "file"),
    # --- Combine Layers
    ("AtelierCombineLayers", "good", combine, dict(order="1,3,2"), OK, None),
    ("AtelierCombineLayers", "order_empty", combine, {}, OK, None),
    ("AtelierCombineLayers", "order_garbage", combine, dict(order="1,,x"), ERROR, "order"),
    ("AtelierCombineLayers", "order_0", combine, dict(order="0"), ERROR, "order"),
    ("AtelierCombineLayers", "order_99", combine, dict(order="99"), ERROR, "order"),
    ("AtelierCombineLayers", "order_negative", combine, dict(order="-1"), ERROR, "order"),
    ("AtelierCombineLayers", "order_2p64", combine, dict(order=str(BIG)), ERROR, "order"),
    ("AtelierCombineLayers", "order_huge_range", combine, dict(order="1-18446744073709551616"), ERROR, "order"),
    ("AtelierCombineLayers", "batch_mismatch", combine, dict(alphas=(1.0, 16, 16, 2)), ERROR, None),
    ("AtelierCombineLayers", "alpha_size_mismatch", combine, dict(alphas=(1.0, 8, 8, 3)), ERROR, None),
    ("AtelierCombineLayers", "1x1", combine, dict(layers=(1, 1, 3), alphas=(0.0, 1, 1, 3)), OK, None),
    # --- Export Layers (hostile prefixes stay inside output/)
    ("AtelierExportLayers", "good", export, {}, OK, None),
    ("AtelierExportLayers", "prefix_dotdot", export, dict(filename_prefix="../../evil_export"), ERROR, None),
    ("AtelierExportLayers", "prefix_absolute", export, dict(filename_prefix="/tmp/evil_export"), ERROR, None),
    ("AtelierExportLayers", "prefix_nested_dotdot", export, dict(filename_prefix="a/../../../evil_export"), ERROR,
     None),
    ("AtelierExportLayers", "prefix_backslash", export, dict(filename_prefix="..\\..\\evil_export"), ERROR, "'..'"),
    ("AtelierExportLayers", "prefix_empty", export, dict(filename_prefix=""), ERROR, "empty"),
    ("AtelierExportLayers", "prefix_unicode", export, dict(filename_prefix="corpus/한국어_🎨"), OK, None),
    ("AtelierExportLayers", "prefix_300_chars", export, dict(filename_prefix="x" * 300), ERROR, "255"),
    ("AtelierExportLayers", "format_unknown", export, dict(format="tiff"), ERROR, None),
    ("AtelierExportLayers", "psd_1x1", export, dict(format="psd", layers=(1, 1, 2), alphas=(1.0, 1, 1, 2)), OK, None),
    ("AtelierExportLayers", "pptx_4096x16", export, dict(format="pptx", layers=(4096, 16, 2),
                                                         alphas=(1.0, 4096, 16, 2)), ERROR, "PPTX"),
    ("AtelierExportLayers", "names_malformed", export, dict(layer_names='["a", '), OK, None),
    ("AtelierExportLayers", "names_hostile", export, dict(format="png", layer_names="../../evil_name,/etc/x"), OK,
     None),
    ("AtelierExportLayers", "batch_mismatch", export, dict(alphas=(1.0, 16, 16, 3)), ERROR, None),
    ("AtelierExportLayers", "empty_alphas", export, dict(alphas=(0.0, 16, 16, 2)), OK, None),
    # --- Pose
    ("AtelierPose", "good", pose, {}, OK, None),
    ("AtelierPose", "1x1", pose, dict(image=(1, 1, 1)), OK, None),
    ("AtelierPose", "4096x16", pose, dict(image=(4096, 16, 1)), OK, None),
    ("AtelierPose", "batch_3_odd", pose, dict(image=(33, 17, 3)), OK, None),
    ("AtelierPose", "confidence_nan", pose, dict(min_confidence=NAN), ERROR, "min_confidence"),
    ("AtelierPose", "confidence_2", pose, dict(min_confidence=2.0), REJECT, None),
    ("AtelierPose", "keypoints_malformed", pose, dict(keypoints_in="[{"), ERROR, "keypoints_in"),
    ("AtelierPose", "keypoints_deep", pose, dict(keypoints_in=DEEP), ERROR, "keypoints_in"),
    ("AtelierPose", "keypoints_wrong_shape", pose, dict(keypoints_in='[{"people": 5}]'), ERROR, "keypoints_in"),
    ("AtelierPose", "model_dotdot", pose, dict(model="../pose_landmark_full.tflite"), OK, None),
    ("AtelierPose", "text_tflite", pose, dict(model="corrupt_text.tflite"), ERROR, "corrupt_text.tflite"),
    ("AtelierPose", "zero_tflite", pose, dict(model="zero.tflite"), ERROR, "zero.tflite"),
    # --- Garment mask
    ("AtelierGarmentMask", "good", garment, {}, OK, None),
    ("AtelierGarmentMask", "1x1", garment, dict(image=(1, 1, 1)), ERROR, "person"),
    ("AtelierGarmentMask", "garment_unknown", garment, dict(garment="hat"), ERROR, None),
    ("AtelierGarmentMask", "expand_nan", garment, dict(expand=NAN), ERROR, "expand"),
    ("AtelierGarmentMask", "person_mask_size", garment, dict(person_mask=(1.0, 10, 10, 1)), ERROR, "mask"),
    ("AtelierGarmentMask", "text_tflite", garment, dict(model="corrupt_text.tflite"), ERROR, "corrupt_text.tflite"),
    # --- Depth
    ("AtelierDepth", "good", depth, {}, OK, None),
    ("AtelierDepth", "1x1", depth, dict(image=(1, 1, 1)), OK, None),
    ("AtelierDepth", "4096x16", depth, dict(image=(4096, 16, 1)), OK, None),
    ("AtelierDepth", "resolution_negative", depth, dict(resolution=-14), REJECT, None),
    ("AtelierDepth", "resolution_2p64", depth, dict(resolution=BIG), REJECT, None),
    ("AtelierDepth", "model_dotdot", depth, dict(model="../LLM/tiny-qwen2_5_vl"), ERROR, None),
    ("AtelierDepth", "broken_folder", depth, dict(model="broken-depth"), ERROR, "broken-depth"),
    # --- FastComposer
    ("AtelierFastComposer", "good", compose, {}, OK, None),
    ("AtelierFastComposer", "two_subjects_one_token", compose, dict(subjects=(32, 32, 2)), ERROR, "subject"),
    ("AtelierFastComposer", "no_token", compose, dict(prompt="a park"), ERROR, "subject"),
    ("AtelierFastComposer", "1x1_subject", compose, dict(subjects=(1, 1, 1)), ERROR, "16×16"),
    ("AtelierFastComposer", "masks_mismatch", compose, dict(masks=(1.0, 32, 32, 3)), ERROR, "mask"),
    ("AtelierFastComposer", "width_63", compose, dict(width=63), REJECT, None),
    ("AtelierFastComposer", "alpha_nan", compose, dict(alpha=NAN), ERROR, "alpha"),
    ("AtelierFastComposer", "prompt_korean_emoji", compose, dict(prompt=KOREAN + " <subject> " + EMOJI), OK, None),
    ("AtelierFastComposer", "negative_100k", compose, dict(negative_prompt=HUGE), OK, None),
    ("AtelierFastComposer", "text_bin", compose, dict(loader=dict(model="corrupt_text.bin")), ERROR,
     "corrupt_text.bin"),
    ("AtelierFastComposer", "zero_safetensors", compose, dict(loader=dict(model="zero.safetensors")), ERROR,
     "zero.safetensors"),
    ("AtelierFastComposer", "base_unknown", compose, dict(loader=dict(base="sdxl")), ERROR, None),
    # --- Realtime character
    ("AtelierAnimateCharacter", "good", animate, {}, OK, None),
    ("AtelierAnimateCharacter", "1x1_pose", animate, dict(pose_image=(1, 1, 1)), ERROR, "8×8"),
    ("AtelierAnimateCharacter", "4096x16_reference", animate, dict(reference=(4096, 16, 1)), OK, None),
    ("AtelierAnimateCharacter", "steps_0", animate, dict(steps=0), REJECT, None),
    ("AtelierAnimateCharacter", "batch_0", animate, dict(batch=0), REJECT, None),
    ("AtelierAnimateCharacter", "guidance_nan", animate, dict(guidance=NAN), ERROR, "guidance"),
    ("AtelierAnimateCharacter", "reuse_nan", animate, dict(reuse=NAN), ERROR, "reuse"),
    ("AtelierAnimateCharacter", "keyframes_text", animate, dict(keyframe_prompts="just a caption {"), OK, None),
    ("AtelierAnimateCharacter", "keyframes_deep", animate, dict(keyframe_prompts=DEEP), ERROR, "keyframe_prompts"),
    ("AtelierAnimateCharacter", "keyframes_bad_frame", animate, dict(keyframe_prompts='{"x": "a"}'), ERROR,
     "keyframe_prompts"),
    ("AtelierAnimateCharacter", "prompt_surrogate", animate, dict(prompt=SURROGATE), ERROR, "prompt"),
    ("AtelierAnimateCharacter", "lora_text", animate, dict(loader=dict(fast_lora="corrupt_lora.safetensors")), ERROR,
     "corrupt_lora"),
    ("AtelierAnimateCharacter", "ip_adapter_text", animate, dict(loader=dict(ip_adapter="corrupt_ip.bin")), ERROR,
     "corrupt_ip"),
    ("AtelierAnimateCharacter", "controlnet_text", animate, dict(loader=dict(controlnet="corrupt_cn.safetensors")),
     ERROR, "corrupt_cn"),
    ("AtelierAnimateCharacter", "model_dotdot", animate, dict(loader=dict(model="../../x.safetensors")), ERROR, None),
    # --- Try-on (SDXL), its LoRA node, the FLUX try-on and the Redux loader
    ("AtelierTryOn", "good", tryon, {}, OK, None),
    ("AtelierTryOn", "empty_mask", tryon, dict(mask=(0.0, 64, 64, 1)), ERROR, "mask"),
    ("AtelierTryOn", "mask_other_size", tryon, dict(mask=(1.0, 32, 48, 1)), ERROR, "mask"),
    ("AtelierTryOn", "two_garments_one_person", tryon, dict(garment=(40, 48, 2)), ERROR, "garment"),
    ("AtelierTryOn", "three_depths_two_people", tryon, dict(person=(64, 64, 2), mask=(1.0, 64, 64, 2),
                                                          depth=(64, 64, 3)), ERROR, "depth"),
    ("AtelierTryOn", "steps_0", tryon, dict(steps=0), REJECT, None),
    ("AtelierTryOn", "strength_nan", tryon, dict(strength=NAN), ERROR, "strength"),
    ("AtelierTryOn", "prompt_korean_emoji", tryon, dict(prompt=KOREAN + " " + EMOJI), OK, None),
    ("AtelierTryOn", "negative_100k", tryon, dict(negative_prompt=HUGE), OK, None),
    ("AtelierTryOn", "prompt_surrogate", tryon, dict(prompt=SURROGATE), ERROR, "prompt"),
    ("AtelierTryOn", "odd_size_person", tryon, dict(person=(37, 53, 1), mask=(1.0, 37, 53, 1)), OK, None),
    ("AtelierTryOn", "model_text", tryon, dict(loader=dict(model="checkpoints/corrupt_tryon.safetensors")), ERROR,
     "corrupt_tryon"),
    ("AtelierTryOn", "controlnet_text", tryon, dict(loader=dict(controlnet="corrupt_cn.safetensors")), ERROR,
     "corrupt_cn"),
    ("AtelierTryOn", "ip_adapter_text", tryon, dict(loader=dict(ip_adapter="corrupt_ip.bin")), ERROR, "corrupt_ip"),
    ("AtelierTryOn", "offload_tpu", tryon, dict(loader=dict(offload="tpu")), ERROR, "offload"),
    ("AtelierTryOn", "model_dotdot", tryon, dict(loader=dict(model="../../x.safetensors")), ERROR, None),
    ("AtelierLoRA", "good", lora_sdxl, {}, OK, None),
    ("AtelierLoRA", "lora_text", lora_sdxl, dict(lora="corrupt_lora.safetensors"), ERROR, "corrupt_lora"),
    ("AtelierLoRA", "strength_nan", lora_sdxl, dict(strength=NAN), ERROR, "strength"),
    ("AtelierLoRA", "no_such_lora", lora_sdxl, dict(lora="gone.safetensors"), ERROR, "gone.safetensors"),
    ("AtelierFluxTryOn", "good", flux_tryon, {}, OK, None),
    ("AtelierFluxTryOn", "empty_mask", flux_tryon, dict(mask=(0.0, 32, 32, 1)), ERROR, "mask"),
    ("AtelierFluxTryOn", "height_15", flux_tryon, dict(height=15), REJECT, None),
    ("AtelierFluxTryOn", "margin_nan", flux_tryon, dict(margin=NAN), ERROR, "margin"),
    ("AtelierFluxTryOn", "1x1_garment", flux_tryon, dict(garment=(1, 1, 1)), OK, None),
    ("AtelierFluxTryOn", "prompt_korean_emoji", flux_tryon, dict(prompt=KOREAN + " " + EMOJI), OK, None),
    ("AtelierReduxLoader", "good", flux_tryon, {}, OK, None),  # its group's health row: the try-on without Redux
    # a text file under a Redux name (the SigLIP is found by auto: the try-on world places one): the file is named
    ("AtelierReduxLoader", "redux_text", redux_loader, dict(redux="corrupt_redux.safetensors"), ERROR,
     "corrupt_redux.safetensors"),
    ("AtelierReduxLoader", "redux_none", redux_loader, {}, ERROR, "redux"),
]

# after each node's group: the server answers and the group's good prompt runs again (another seed where it has one)
from tests.corpus.files import HEALTH  # noqa: E402


def _cases() -> list:
    out, last = [], None
    for row in ROWS + [(None,) * 6]:
        node = row[0]
        if last is not None and node != last:
            good = next(r for r in ROWS if r[0] == last and r[1] == "good")
            out.append(pytest.param((last, HEALTH, good[2], good[3], OK, None), id=f"{last}-{HEALTH}"))
        if node is not None:
            out.append(pytest.param(row, id=f"{node}-{row[1]}"))
        last = node
    return out


CASES = _cases()


def test_corpus_size_and_coverage(object_info_nodes):
    assert len(ROWS) >= 150, len(ROWS)
    covered = {r[0] for r in ROWS}
    # every Atelier node is in the corpus: directly, or as the loader/feeder of a node that is
    feeders = {"AtelierFluxFillLoader", "AtelierVLMLoader", "AtelierBackgroundRemoverLoader", "AtelierSAM2Loader",
               "AtelierLayeredLoader", "AtelierFastComposerLoader", "AtelierCharacterLoader", "AtelierTryOnLoader"}
    missing = sorted(n for n in object_info_nodes if n.startswith("Atelier") and n not in covered | feeders)
    assert not missing, f"nodes without corpus cases: {missing}"


@pytest.fixture(scope="module")
def object_info_nodes(client):
    return set(client.object_info())


@pytest.fixture(scope="module")
def choices(corpus_models, comfy_base):
    from tests.harness import workflow_inputs

    c = dict(corpus_models)
    work = corpus_models["_work_dir"]
    c["character"] = {k: v for k, v in workflow_inputs.place_character_models(comfy_base / "models", work).items()
                      if k in CHARACTER_LOADER}
    return c


from tests.corpus.files import OUTCOMES  # noqa: E402  (shared with conftest's summary)


def outcome(client: ComfyClient, prompt: dict, timeout: float = 240) -> tuple[str, str]:
    """(REJECT | ERROR | OK | 'crash', message) of one prompt."""
    try:
        entry = client.run(prompt, timeout=timeout)
    except PromptRejected as e:
        assert e.node_errors or "prompt_no_outputs" not in str(e.error), str(e)
        return REJECT, str(e)
    if client.succeeded(entry):
        return OK, ""
    details = client.error_details(entry) or {}
    message = details.get("exception_message") or ""
    kind = (details.get("exception_type") or "").rsplit(".", 1)[-1]
    if kind in ATELIER_ERRORS and "; got " in message and not BARE.search(message.split("; got ")[0]):
        return ERROR, message
    return "unclear", f"{details.get('exception_type')}: {message}"


@pytest.mark.parametrize("row", CASES)
def test_case(row, client, comfy_server, choices):
    node, case, build, over, expected, needle = row
    prompt = build(choices, **over)
    if case == HEALTH:  # a fresh run, not ComfyUI's cache: another seed where the node has one
        for n in prompt.values():
            if "seed" in n["inputs"]:
                n["inputs"]["seed"] = 12345
    t0 = time.monotonic()
    got, message = outcome(client, prompt)
    OUTCOMES[(node, case)] = (got, round(time.monotonic() - t0, 2))
    if os.environ.get("ATELIER_CORPUS_LOG"):  # one JSON line per case, as it happens (for reports)
        with open(os.environ["ATELIER_CORPUS_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"node": node, "case": case, "expected": expected, "got": got,
                                "seconds": OUTCOMES[(node, case)][1], "message": message[:400]}) + "\n")
    assert comfy_server.alive(), f"server died on {node}/{case}"
    assert got == expected, f"{node}/{case}: expected {expected}, got {got}: {message[:600]}"
    if needle and got == ERROR:
        assert needle.lower() in message.lower(), f"{node}/{case}: the message does not name {needle!r}: {message}"


def test_nothing_written_outside_output(comfy_base):
    """Hostile prefixes, layer names and zip-slip entries wrote nothing outside output/ (and nothing 'evil'
    anywhere but inside output/)."""
    stray = [p for p in Path(comfy_base).parent.rglob("evil*") if "output" not in p.relative_to(comfy_base.parent).parts]
    assert not stray, stray
    assert not Path("/tmp/evil_export").exists() and not list(Path("/tmp").glob("evil_export*"))

