"""SDXL try-on engine on tiny random weights: parity with plain diffusers' StableDiffusionXLControlNetInpaintPipeline
(ControlNet, h94-layout IP-Adapter as .safetensors and .bin, kohya LoRA), single file = folder, IP-Adapter scale 0 =
no adapter, LoRAs changing on the cached pipeline, and the bad inputs."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import lora, tryon
from atelier.errors import InputError, ModelFileError
from atelier.progress import NullProgress
from atelier.registry import REGISTRY
from atelier.stage import get
from tests.harness import tiny_sdxl
from tests.harness.comfy_server import comfy_root

log = logging.getLogger("atelier.tests")

TOL = 1e-4
SIZE = 64
PROMPT = "a red shirt with a white logo"
KW = dict(prompt=PROMPT, steps=2, guidance=7.0, strength=0.99, seed=3, ip_adapter_scale=0.8, controlnet_scale=0.6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_sdxl.build_world(tmp_path_factory.getbasetemp() / "tiny_sdxl_models")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    person = torch.rand(1, SIZE, SIZE, 3, generator=g)
    garment = torch.rand(1, 48, 40, 3, generator=g)
    depth = torch.rand(1, SIZE, SIZE, 3, generator=g)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:56, 12:52] = 1.0
    return person, garment, depth, mask


def files(world, layout="single_file", controlnet="controlnet_folder", ip="ip_safetensors", clip="clip_vision"):
    return tryon.TryOnFiles(
        layout=layout, path=str(world["checkpoint" if layout == "single_file" else "folder"]),
        controlnet=str(world[controlnet]) if controlnet else None, ip_adapter=str(world[ip]) if ip else None,
        clip_vision=str(world[clip]) if ip else None, tokenizer=str(comfy_root() / "comfy" / "sd1_tokenizer"))


def handle(world, **kw):
    return tryon.make_handle(tryon.TryOnSpec(files=files(world, **kw)), None)


@pytest.fixture(scope="module")
def reference(world):
    """``run(person, garment, depth, mask, ip_scale, lora=None, lora_scale=1.0, ip=True)``: plain diffusers."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetInpaintPipeline
    from diffusers.image_processor import IPAdapterMaskProcessor

    def make(ip: bool):
        pipe = StableDiffusionXLControlNetInpaintPipeline.from_pretrained(
            world["folder"], controlnet=ControlNetModel.from_pretrained(world["controlnet_folder"]),
            add_watermarker=False)
        if ip:
            pipe.load_ip_adapter(str(world["h94"]), subfolder="sdxl_models", weight_name=world["ip_safetensors"].name,
                                 image_encoder_folder="models/image_encoder")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipes = {True: make(True), False: make(False)}

    def run(person, garment, depth, mask, ip_scale=KW["ip_adapter_scale"], lora_file=None, lora_scale=1.0, ip=True):
        pipe = pipes[ip]
        kw = {}
        if ip:
            pipe.set_ip_adapter_scale(ip_scale)
            ip_mask = IPAdapterMaskProcessor().preprocess(mask.unsqueeze(1), height=SIZE, width=SIZE)
            kw = {"ip_adapter_image": Image.fromarray((garment[0].numpy() * 255).round().astype(np.uint8)),
                  "cross_attention_kwargs": {"ip_adapter_masks": [ip_mask.reshape(1, 1, SIZE, SIZE)]}}
        if lora_file:
            pipe.load_lora_weights(str(lora_file))
            pipe.set_adapters(["default_0"], adapter_weights=[lora_scale])
        try:
            out = pipe(prompt=PROMPT, image=person.permute(0, 3, 1, 2), mask_image=mask.unsqueeze(1),
                       control_image=depth.permute(0, 3, 1, 2), height=SIZE, width=SIZE, strength=KW["strength"],
                       num_inference_steps=KW["steps"], guidance_scale=KW["guidance"],
                       controlnet_conditioning_scale=KW["controlnet_scale"],
                       generator=torch.Generator("cpu").manual_seed(KW["seed"]), output_type="pt", **kw).images
        finally:
            if lora_file:
                pipe.unload_lora_weights()
        return out.permute(0, 2, 3, 1)

    return run


@pytest.fixture(scope="module")
def single(world):
    """(handle, model) of the checkpoint + ControlNet folder + .safetensors adapter; the model is fetched again
    (rebuilt if another test's model replaced it: one try-on pipeline at a time)."""
    REGISTRY.release_all()
    h = handle(world)

    class Pair(tuple):
        def __iter__(self):
            yield h
            yield get(tryon.STAGE, h)

    yield Pair()
    REGISTRY.release_all()


def _delta(a, b) -> float:
    return float((a - b).abs().max())


def test_single_file_parity_with_diffusers(single, reference, inputs):
    """Checkpoint (ComfyUI's converters wrote it) + ControlNet folder + IP-Adapter .safetensors = plain diffusers
    on the diffusers folder; composite_back keeps the outside exact; progress counts every step."""
    h, model = single
    person, garment, depth, mask = inputs
    progress = NullProgress()
    out = tryon.run(model, person, garment, mask, depth=depth, composite_back=False, progress=progress, **KW)
    ref = reference(person, garment, depth, mask)
    d = _delta(out, ref)
    log.info(f"parity single-file checkpoint vs diffusers folder: max abs delta {d:.2e}")
    assert d < TOL and float(out.std()) > 0.01
    assert progress.done == KW["steps"]
    back = tryon.run(model, person, garment, mask, depth=depth, composite_back=True, **KW)
    assert torch.equal(back[mask[..., None].expand_as(back) == 0], person[mask[..., None].expand_as(person) == 0])
    assert _delta(back[:, 16:56, 12:52], out[:, 16:56, 12:52]) < 1e-6


def test_ip_adapter_scale_zero_is_no_adapter(single, reference, inputs):
    h, model = single
    out = tryon.run(model, *inputs[:2], inputs[3], depth=inputs[2], composite_back=False, **dict(KW, ip_adapter_scale=0.0))
    d = _delta(out, reference(*inputs, ip=False))
    d_on = _delta(out, reference(*inputs))
    log.info(f"IP-Adapter scale 0 vs no adapter: max abs delta {d:.2e} (scale 0.8 differs by {d_on:.2e})")
    assert d < TOL and d_on > 100 * TOL


def test_kohya_lora_parity_and_cached_base(world, single, reference, inputs):
    """A kohya LoRA = diffusers' load_lora_weights on the plain pipeline (strength 1 and 0.5); changing strength or
    removing it reuses the cached base (no reload) and gives back the LoRA-free pixels."""
    h, model = single
    loads = REGISTRY.loads
    base = tryon.run(model, *inputs[:2], inputs[3], depth=inputs[2], composite_back=False, **KW)
    for strength in (1.0, 0.5):
        hl = lora.with_lora(h, lora.ref(str(world["lora"]), strength))
        assert hl.spec == h.spec
        out = tryon.run(get(tryon.STAGE, hl), *inputs[:2], inputs[3], depth=inputs[2], composite_back=False,
                        loras=hl.loras, **KW)
        d = _delta(out, reference(*inputs, lora_file=world["lora"], lora_scale=strength))
        log.info(f"kohya LoRA ×{strength}: max abs delta vs diffusers load_lora_weights {d:.2e}; "
              f"change from no LoRA {_delta(out, base):.2e}")
        assert d < TOL and _delta(out, base) > 100 * TOL
    again = tryon.run(model, *inputs[:2], inputs[3], depth=inputs[2], composite_back=False, loras=(), **KW)
    assert _delta(again, base) < 1e-6 and model.lora_loaded == {}
    assert REGISTRY.loads == loads


# ---------------------------------------------------------------------------------------------- bad inputs


def test_sd15_checkpoint_is_a_clear_error(world):
    f = dataclasses.replace(files(world, controlnet=None, ip=None), path=str(world["sd15"]))
    with pytest.raises(ModelFileError, match="Stable Diffusion 1.5"):
        tryon.make_handle(tryon.TryOnSpec(files=f), None)


def test_ip_adapter_of_another_width_than_the_clip_vision(world):
    with pytest.raises(ModelFileError, match="CLIP vision encoder that fits.*width 24.*width 20"):
        handle(world, clip="clip_vision_other")


def test_plus_adapter_reads_hidden_states(world):
    """IP-Adapter Plus (Resampler) is matched on the encoder's hidden width, the plain one on its projection."""
    from atelier import ip_adapter

    plus = ip_adapter.needs(ip_adapter.read(str(world["ip_plus"])))
    plain = ip_adapter.needs(ip_adapter.read(str(world["ip_bin"])))
    assert plus == {"plus": True, "clip_dim": 32, "clip_feature": "hidden", "cross_dim": 72}
    assert plain == {"plus": False, "clip_dim": 24, "clip_feature": "projection", "cross_dim": 72}
    assert handle(world, ip="ip_plus").spec.files.ip_adapter.endswith("plus_sdxl_vit-h-tiny.safetensors")


def test_empty_mask_and_alpha_garment(single, inputs):
    h, model = single
    person, garment, depth, mask = inputs
    with pytest.raises(InputError, match="empty mask"):
        tryon.run(model, person, garment, torch.zeros_like(mask), **KW)
    rgba = torch.cat([garment, torch.zeros(1, 48, 40, 1)], dim=-1)
    rgba[:, 10:30, 10:30, 3] = 1.0
    flat = tryon.flatten_alpha(rgba)
    assert torch.equal(flat[:, 10:30, 10:30], garment[:, 10:30, 10:30]) and float(flat[0, 0, 0].min()) == 1.0
    alpha_mask = 1.0 - rgba[..., 3]  # LoadImage's MASK of that PNG
    assert torch.equal(tryon.flatten_alpha(garment, alpha_mask), flat)


def test_lora_of_another_base_is_a_clear_error(single, tmp_path, inputs):
    from safetensors.torch import save_file

    h, model = single
    flux_like = {}
    for i in range(2):
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        flux_like[f"{name}.lora_down.weight"] = torch.randn(4, 64)
        flux_like[f"{name}.lora_up.weight"] = torch.randn(192, 4)
    path = tmp_path / "flux_style.safetensors"
    save_file(flux_like, path)
    with pytest.raises(ModelFileError, match=r"LoRA for SDXL.*FLUX.*0 of 2 layers"):
        tryon.run(model, *inputs[:2], inputs[3], loras=(lora.ref(str(path), 1.0),), **KW)
    assert model.lora_loaded == {}
    with pytest.raises(InputError, match="strength"):
        lora.ref(str(path), 3.0)


# ------------------------------------------------ other layouts (replace the shared model: run last)


def test_folder_controlnet_file_and_bin_adapter(world, reference, inputs, clean_registry):
    """Diffusers folder + ControlNet as one file + IP-Adapter .bin = the same reference."""
    h = handle(world, layout="diffusers", controlnet="controlnet_file", ip="ip_bin")
    out = tryon.run(get(tryon.STAGE, h), *inputs[:2], inputs[3], depth=inputs[2], composite_back=False, **KW)
    d = _delta(out, reference(*inputs))
    log.info(f"parity folder + ControlNet file + IP-Adapter .bin: max abs delta {d:.2e}")
    assert d < TOL


def test_base_checkpoint_without_controlnet_or_adapter(world, inputs, clean_registry):
    """A base (4-channel) SDXL checkpoint runs through the inpaint pipeline; depth without ControlNet is ignored."""
    f = dataclasses.replace(files(world, controlnet=None, ip=None), path=str(world["base_checkpoint"]))
    h = tryon.make_handle(tryon.TryOnSpec(files=f), None)
    assert h.kind == "sdxl"
    out = tryon.run(get(tryon.STAGE, h), *inputs[:2], inputs[3], depth=inputs[2], composite_back=False, **KW)
    assert out.shape == (1, SIZE, SIZE, 3) and torch.isfinite(out).all()


def test_plus_adapter_runs(world, inputs, clean_registry):
    """IP-Adapter Plus (.safetensors, Resampler) loads through diffusers and steers the result."""
    h = handle(world, ip="ip_plus")
    model = get(tryon.STAGE, h)
    person, garment, depth, mask = inputs
    a = tryon.run(model, person, garment, mask, depth=depth, composite_back=False, **KW)
    b = tryon.run(model, person, garment, mask, depth=depth, composite_back=False,
                  **dict(KW, ip_adapter_scale=0.0))
    assert torch.isfinite(a).all() and _delta(a, b) > 1e-3


def test_bf16_keeps_every_part_in_bf16_and_runs(world, inputs, clean_registry):
    """The ControlNet pipeline is built from the base's parts in the run dtype (diffusers' from_pipe cast them all to
    float32 next to a bf16 IP-Adapter: 'query.dtype: float, key.dtype: BFloat16' on the H200)."""
    h = tryon.make_handle(tryon.TryOnSpec(files=files(world, layout="diffusers", ip="ip_plus"), dtype="bf16"), None)
    model = get(tryon.STAGE, h)
    pipe = model.pipe
    dtypes = {name: {p.dtype for p in getattr(pipe, name).parameters()}
              for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet", "image_encoder")}
    assert all(d == {torch.bfloat16} for d in dtypes.values()), dtypes
    person, garment, depth, mask = inputs
    out = tryon.run(model, person, garment, mask, depth=depth, composite_back=False, **KW)
    assert out.shape == (1, SIZE, SIZE, 3) and torch.isfinite(out).all()
    # under model / sequential offload this VAE stays on the GPU: diffusers casts it to float32 and back in a run
    from atelier import pipelines
    pipe.vae.register_to_config(force_upcast=True)  # as SDXL's own VAE config says (the tiny one does not)
    assert pipelines.upcasting_vaes(pipe, pipe.components, torch.bfloat16) == ["vae"]
    assert pipelines.upcasting_vaes(pipe, pipe.components, torch.float32) == []
