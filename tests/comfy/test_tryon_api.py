"""SDXL try-on through a real ComfyUI server (HTTP API only): schema, parity of Loader → LoRA → Try-On with plain
diffusers on the same tiny files, a LoRA on FLUX Fill, and each bad input as a clear error with the server alive."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import tiny_flux as tf
from tests.harness import tiny_sdxl
from tests.harness.comfy_server import ComfyClient, assert_progress_each_step, progress_values

log = logging.getLogger("atelier.tests")

S = 64
CKPT = "checkpoints/sdxl_inpaint_tiny.safetensors"
CN = "controlnet-depth-sdxl-tiny/diffusion_pytorch_model.safetensors"
IP = "ip-adapter_sdxl_vit-h-tiny.safetensors"
LORA = "tryon_kohya_tiny.safetensors"
PROMPT = "a red shirt"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA" if arr.shape[-1] == 4 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(comfy_base):
    return tiny_sdxl.build_world(comfy_base / "models")


@pytest.fixture(scope="module")
def pictures(client):
    """Uploaded person (RGBA: transparent = where the garment goes), garment, depth; returns names and arrays."""
    rng = np.random.default_rng(3)
    person = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    alpha = np.full((S, S), 255, np.uint8)
    alpha[16:56, 12:52] = 0
    garment = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    depth = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    garment_rgba = np.dstack([garment, np.full((48, 40), 255, np.uint8)])
    garment_rgba[:6, :, 3] = 0
    names = {
        "person": client.upload_image(_png(np.dstack([person, alpha])), "atelier_tryon_person.png"),
        "garment": client.upload_image(_png(garment), "atelier_tryon_garment.png"),
        "garment_rgba": client.upload_image(_png(garment_rgba), "atelier_tryon_garment_rgba.png"),
        "depth": client.upload_image(_png(depth), "atelier_tryon_depth.png"),
    }
    return names, person, 1.0 - alpha.astype(np.float32) / 255.0, garment, depth


def graph(names, *, model=CKPT, controlnet=CN, ip_adapter=IP, clip_vision="auto", lora=LORA, steps=2, seed=3,
          composite_back=False, empty_mask=False, garment="garment", garment_alpha=False) -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": names["person"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": names[garment]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": names["depth"]}},
        "4": {"class_type": "AtelierTryOnLoader", "inputs": {
            "model": model, "controlnet": controlnet, "ip_adapter": ip_adapter, "clip_vision": clip_vision,
            "quantization": "none", "offload": "auto", "attention_slicing": False, "vae_slicing": False,
            "vae_tiling": False, "dtype": "auto"}},
        "6": {"class_type": "AtelierTryOn", "inputs": {
            "pipe": ["5", 0] if lora else ["4", 0], "person": ["1", 0], "garment": ["2", 0],
            "mask": ["7", 0] if empty_mask else ["1", 1], "depth": ["3", 0], "prompt": PROMPT, "negative_prompt": "",
            "ip_adapter_scale": 0.8, "controlnet_scale": 0.6, "strength": 0.99, "steps": steps, "guidance": 7.0,
            "seed": seed, "composite_back": composite_back}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "atelier_tryon"}},
    }
    if lora:
        g["5"] = {"class_type": "AtelierLoRA", "inputs": {"pipe": ["4", 0], "lora": lora, "strength": 1.0}}
    if empty_mask:
        g["7"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": S, "height": S}}
    if garment_alpha:
        g["6"]["inputs"]["garment_alpha"] = ["2", 1]
    return g


def _error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    assert client.system_stats()["system"], "the server must stay alive"
    return msg


def test_schema(client, world):
    info = client.object_info("AtelierTryOnLoader")
    assert info["category"] == "atelier/tryon" and info["output"] == ["ATELIER_TRYON"]
    assert info["input_order"]["required"] == ["model", "controlnet", "ip_adapter", "clip_vision", "quantization",
                                               "offload", "attention_slicing", "vae_slicing", "vae_tiling", "dtype"]
    req = info["input"]["required"]
    assert CKPT in req["model"][1]["options"] and "diffusers/sdxl-inpaint-tiny" in req["model"][1]["options"]
    assert CN in req["controlnet"][1]["options"] and IP in req["ip_adapter"][1]["options"]
    run = client.object_info("AtelierTryOn")
    assert run["input_order"]["required"] == ["pipe", "person", "garment", "mask", "prompt", "negative_prompt",
                                              "ip_adapter_scale", "controlnet_scale", "strength", "steps", "guidance",
                                              "seed", "composite_back"]
    assert run["input_order"]["optional"] == ["depth", "garment_alpha"]
    lo = client.object_info("AtelierLoRA")
    assert lo["input"]["required"]["pipe"][0] == "ATELIER_TRYON,ATELIER_FLUX_FILL"
    assert lo["output"] == ["ATELIER_TRYON,ATELIER_FLUX_FILL"]
    for node in (info, run, lo):
        for group in node["input"].values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{name} has no tooltip"


def test_loader_lora_tryon_equals_plain_diffusers(client, world, pictures, ws):
    """Checkpoint + ControlNet (folder's file) + IP-Adapter (auto CLIP vision) + kohya LoRA through the server =
    StableDiffusionXLControlNetInpaintPipeline + load_ip_adapter + load_lora_weights on the diffusers folder."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetInpaintPipeline
    from diffusers.image_processor import IPAdapterMaskProcessor

    names, person, mask, garment, depth = pictures
    entry = client.run(graph(names))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    got = client.images(entry, "8")[0][..., :3].astype(np.int16)
    assert_progress_each_step(progress_values(ws, "6"), 2)

    pipe = StableDiffusionXLControlNetInpaintPipeline.from_pretrained(
        world["folder"], controlnet=ControlNetModel.from_pretrained(world["controlnet_folder"]), add_watermarker=False)
    pipe.load_ip_adapter(str(world["h94"]), subfolder="sdxl_models", weight_name=IP,
                         image_encoder_folder="models/image_encoder")
    pipe.set_ip_adapter_scale(0.8)
    pipe.load_lora_weights(str(world["lora"]))
    t = torch.from_numpy
    m = t(mask)[None]
    ip_mask = IPAdapterMaskProcessor().preprocess(m.unsqueeze(1), height=S, width=S)
    ref = pipe(prompt=PROMPT, image=t(person).permute(2, 0, 1)[None].float() / 255, mask_image=m.unsqueeze(1),
               control_image=t(depth).permute(2, 0, 1)[None].float() / 255, height=S, width=S, strength=0.99,
               num_inference_steps=2, guidance_scale=7.0, controlnet_conditioning_scale=0.6,
               ip_adapter_image=Image.fromarray(garment), generator=torch.Generator("cpu").manual_seed(3),
               cross_attention_kwargs={"ip_adapter_masks": [ip_mask.reshape(1, 1, S, S)]}, output_type="np").images[0]
    want = np.clip(ref * 255.0, 0, 255).astype(np.int16)
    diff = np.abs(got - want)
    log.info(f"server parity (SDXL try-on + ControlNet + IP-Adapter + kohya LoRA): max {diff.max()} levels of 255")
    assert diff.max() <= 1


def test_composite_back_and_alpha_garment(client, world, pictures):
    names, person, mask, _, _ = pictures
    entry = client.run(graph(names, composite_back=True, garment="garment_rgba", garment_alpha=True, lora=None))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    got = client.images(entry, "8")[0][..., :3]
    assert np.array_equal(got[mask == 0], person[mask == 0])


@pytest.mark.parametrize("case,match", [
    ("sd15", "Stable Diffusion 1.5"),
    ("clip", "CLIP vision encoder that fits"),
    ("empty_mask", "empty mask"),
    ("lora_other_base", "LoRA for SDXL"),
])
def test_bad_inputs_are_clear_errors(client, world, pictures, comfy_base, case, match):
    names = pictures[0]
    if case == "sd15":
        prompt = graph(names, model="checkpoints/sd15_tiny.safetensors", lora=None)
    elif case == "clip":
        prompt = graph(names, clip_vision=world["clip_vision_other"].name, lora=None)
    elif case == "empty_mask":
        prompt = graph(names, empty_mask=True, lora=None)
    else:
        from diffusers import FluxTransformer2DModel

        tiny = comfy_base / "models" / "loras" / "flux_tiny_lora.safetensors"
        if not tiny.exists():
            torch.manual_seed(0)
            tf.random_lora(FluxTransformer2DModel(**tf.TRANSFORMER), tiny)
        prompt = graph(names, lora=tiny.name)
    assert match in _error(client, prompt)


def test_lora_on_flux_fill_through_the_server(client, tiny_flux, comfy_base, pictures):
    """FLUX Fill Loader → LoRA → FLUX Fill runs (the same LoRA node takes either pipe)."""
    from diffusers import FluxTransformer2DModel

    path = comfy_base / "models" / "loras" / "flux_fill_tiny_lora.safetensors"
    if not path.exists():
        tf.random_lora(FluxTransformer2DModel.from_pretrained(tiny_flux["diffusers"], subfolder="transformer"), path)
    names = pictures[0]
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": names["person"]}},
        "2": {"class_type": "AtelierFluxFillLoader", "inputs": {
            "model": tiny_flux["choice_diffusers"], "quantization": "none", "offload": "auto",
            "attention_slicing": False, "vae_slicing": False, "vae_tiling": False, "first_block_cache": 0.0,
            "dtype": "auto"}},
        "3": {"class_type": "AtelierLoRA", "inputs": {"pipe": ["2", 0], "lora": path.name, "strength": 0.8}},
        "4": {"class_type": "AtelierFluxFill", "inputs": {
            "pipe": ["3", 0], "image": ["1", 0], "mask": ["1", 1], "prompt": "x", "steps": 1, "guidance": 30.0,
            "seed": 1, "composite_back": True}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "atelier_lora_fill"}},
    }
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert client.images(entry, "5")[0].shape[:2] == (S, S)
