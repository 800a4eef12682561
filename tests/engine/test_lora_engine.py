"""LoRAs on FLUX Fill (the same LoRA machinery as the SDXL try-on): parity with diffusers' load_lora_weights on
the plain pipeline, strengths and removal on the cached base, and a LoRA of another base model."""

from __future__ import annotations

import logging
import pytest
import torch

from atelier import fill, lora
from atelier.errors import ModelFileError
from atelier.registry import REGISTRY
from atelier.stage import get
from atelier.types import FluxFillSpec
from tests.harness import tiny_flux, tiny_sdxl

log = logging.getLogger("atelier.tests")

PROMPT = "a denim jacket"
STEPS, GUIDANCE, SEED = 2, 30.0, 5


@pytest.fixture(scope="module")
def flux_lora(tiny_dir, tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    return tiny_flux.random_lora(transformer, tmp_path_factory.mktemp("loras") / "flux_tiny_lora.safetensors")


def _inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 32, 48, 3, generator=g)
    mask = torch.zeros(1, 32, 48)
    mask[:, 8:24, 10:30] = 1.0
    return image, mask


def _reference(tiny_dir, path, scale):
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    pipe.set_adapters(["default_0"], adapter_weights=[scale])
    image, mask = _inputs()
    out = pipe(prompt=PROMPT, image=image.permute(0, 3, 1, 2), mask_image=mask.unsqueeze(1), height=32, width=48,
               guidance_scale=GUIDANCE, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
               max_sequence_length=512, output_type="pt").images
    return out.permute(0, 2, 3, 1)


def test_flux_fill_lora_parity_strength_and_unload(files_diffusers, tiny_dir, flux_lora, reference, clean_registry):
    handle = fill.make_handle(FluxFillSpec(files=files_diffusers), None)
    model = get(fill.STAGE, handle)
    image, mask = _inputs()
    run = dict(steps=STEPS, guidance=GUIDANCE, seed=SEED, composite_back=False)
    base = fill.inpaint(model, image, mask, PROMPT, **run)
    assert float((base - reference(image, mask, PROMPT, STEPS, GUIDANCE, SEED)).abs().max()) < 1e-4
    loads = REGISTRY.loads
    for strength in (1.0, -0.7):
        h = lora.with_lora(handle, lora.ref(str(flux_lora), strength))
        out = fill.inpaint(get(fill.STAGE, h), image, mask, PROMPT, loras=h.loras, **run)
        d = float((out - _reference(tiny_dir, flux_lora, strength)).abs().max())
        log.info(f"FLUX Fill + LoRA ×{strength}: max abs delta vs diffusers load_lora_weights {d:.2e}, "
              f"change from no LoRA {float((out - base).abs().max()):.2e}")
        assert d < 1e-4 and float((out - base).abs().max()) > 1e-2
    again = fill.inpaint(model, image, mask, PROMPT, loras=(), **run)
    assert torch.equal(again, base) or float((again - base).abs().max()) < 1e-6
    assert REGISTRY.loads == loads, "LoRA changes must reuse the cached base pipeline"
    chained = lora.with_lora(lora.with_lora(handle, lora.ref(str(flux_lora), 0.5)), lora.ref(str(flux_lora), 0.5))
    assert len(chained.loras) == 1 and chained.loras[0].strength == 1.0


def test_sdxl_lora_on_flux_fill_is_a_clear_error(files_diffusers, tmp_path, clean_registry):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl.UNET)
    te = CLIPTextModel(CLIPTextConfig(**tiny_sdxl.CLIP_TEXT))
    path = tiny_sdxl.kohya_lora(unet, te, tmp_path / "sdxl_style.safetensors")
    handle = fill.make_handle(FluxFillSpec(files=files_diffusers), None)
    model = get(fill.STAGE, handle)
    image, mask = _inputs()
    with pytest.raises(ModelFileError, match=r"LoRA for FLUX.*(SDXL|unknown).*layers matched") as e:
        fill.inpaint(model, image, mask, PROMPT, steps=1, loras=(lora.ref(str(path), 1.0),))
    log.info("error: %s", str(e.value)[:400])
    assert model.lora_loaded == {}
    out = fill.inpaint(model, image, mask, PROMPT, steps=1)  # the pipeline still works without it
    assert torch.isfinite(out).all()
