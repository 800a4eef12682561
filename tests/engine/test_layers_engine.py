"""Qwen-Image-Layered engine on the tiny random model: the output convention (which frame is the composite),
parity with plain diffusers, Stop in the denoising loop and in the captioning, the loader's checks and toggles, and
the pure helpers (flatten, order, alphas)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import layers, stage
from atelier.errors import InputError, ModelFileError, SettingError
from atelier.progress import NullProgress
from atelier.registry import REGISTRY
from tests.harness import tiny_layered

SEED = 5
PROMPT = "a red cup on a wooden table"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_layered.shared_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model(folder):
    m = layers.load(layers.make_handle(layers.LayeredSpec(path=str(folder))))
    m.pipe.set_progress_bar_config(disable=True)
    yield m
    m.close()


def picture(h=48, w=64, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (1, h, w, 3)).astype(np.float32) / 255.0)


class StopAt(NullProgress):
    """Raises like ComfyUI's hook after ``at`` steps (or when asked between caption tokens)."""

    def __init__(self, at: int | None = None, in_caption: bool = False):
        super().__init__()
        self.at, self.in_caption, self.checks = at, in_caption, 0

    def step(self, n: int = 1) -> None:
        super().step(n)
        if self.at is not None and self.done >= self.at:
            raise InterruptedError("stop")

    def check(self) -> None:
        self.checks += 1
        if self.in_caption:
            raise InterruptedError("stop in caption")


# ------------------------------------------------------------------------------------------ pure helpers


def test_take_layers_handles_both_conventions():
    frames = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 2, 2)
    kept, notes = layers.take_layers(frames, 4)
    assert kept.shape[0] == 4 and notes == []
    kept, notes = layers.take_layers(frames, 3)  # 3 layers + the leading composite
    assert kept[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0] and "composite" in notes[0]
    with pytest.raises(SettingError, match="2 layers"):
        layers.take_layers(frames, 2)


def test_flatten_is_normal_blending_in_straight_colour():
    rgb = torch.zeros(2, 1, 3, 3)
    rgb[0] = torch.tensor([1.0, 0.0, 0.0])
    rgb[1] = torch.tensor([0.0, 0.0, 1.0])
    alpha = torch.tensor([[[1.0, 0.5, 0.0]], [[0.5, 0.0, 0.5]]])
    image, mask = layers.flatten(rgb, alpha)
    assert torch.allclose(mask[0, 0], torch.tensor([1.0, 0.5, 0.5]))
    assert torch.allclose(image[0, 0, 0], torch.tensor([0.5, 0.0, 0.5]))  # blue 50 % over opaque red
    assert torch.allclose(image[0, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # red at 50 %: straight colour stays red
    assert torch.allclose(image[0, 0, 2], torch.tensor([0.0, 0.0, 1.0]))
    top_first, _ = layers.flatten(rgb, alpha, [1, 0])
    assert torch.allclose(top_first[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # opaque red now on top


def test_parse_order():
    assert layers.parse_order("", 3) == [0, 1, 2]
    assert layers.parse_order("3,1,2", 3) == [2, 0, 1]
    assert layers.parse_order(" 2 - 4 ; 1", 5) == [1, 2, 3, 0]
    assert layers.parse_order("3-1", 3) == [2, 1, 0]
    for bad, msg in [("0", "from 1 to 3"), ("4", "from 1 to 3"), ("1,1", "at most once"), ("a", "layer numbers"),
                     (",", "at least one")]:
        with pytest.raises(InputError, match=msg):
            layers.parse_order(bad, 3)


def test_match_alphas():
    rgb = torch.rand(3, 4, 5, 3)
    assert layers.match_alphas(rgb, torch.rand(1, 4, 5)).shape == (3, 4, 5)
    with pytest.raises(InputError, match="4 alphas for 3 layers"):
        layers.match_alphas(rgb, torch.rand(4, 4, 5))
    with pytest.raises(InputError, match=r"alphas of the layers' size \(5×4\)"):
        layers.match_alphas(rgb, torch.rand(3, 6, 5))


# ------------------------------------------------------------------------------------------------ loader


def test_folder_checks_list_what_is_missing(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(broken / "processor")
    with pytest.raises(ModelFileError) as e:
        layers.check_folder(broken)
    msg = str(e.value)
    assert "transformer/*.safetensors" in msg and "processor/preprocessor_config.json" in msg
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxFillPipeline"}))
    with pytest.raises(ModelFileError, match="QwenImageLayeredPipeline folder"):
        layers.check_folder(other)


def test_make_handle_resolves_like_the_fill_loader(folder):
    handle = layers.make_handle(layers.LayeredSpec(path=str(folder), offload="sequential"))
    assert (handle.offload, handle.dtype) == ("none", "fp32")  # CPU: nothing to offload, fp32
    sizes = layers.part_sizes(folder)
    assert sizes["transformer"] > 0 and sizes["text_encoders"] > sizes["transformer"] and sizes["vae"] > 0
    with pytest.raises(SettingError, match="CUDA GPU"):
        layers.make_handle(layers.LayeredSpec(path=str(folder), quantization="nf4"))
    with pytest.raises(SettingError, match="first_block_cache"):
        layers.make_handle(layers.LayeredSpec(path=str(folder), first_block_cache=1.5))
    assert "offload none" in layers.summary(handle)


def test_toggles_reach_the_pipeline(folder):
    spec = layers.LayeredSpec(path=str(folder), vae_slicing=True, vae_tiling=True, first_block_cache=0.1)
    REGISTRY.release_all()
    m = stage.get(layers.STAGE, layers.make_handle(spec))
    try:
        assert m.pipe.vae.use_slicing and m.pipe.vae.use_tiling
        assert m.pipe.transformer.is_cache_enabled
        assert m.rgba and m.resident_bytes > 0
    finally:
        REGISTRY.release_all()
    assert m.pipe is None  # released: every module dropped


# --------------------------------------------------------------------------------------------- running


def test_bad_inputs_are_refused_before_running(model):
    for kw, msg in [({"layers": 0}, "at least 1 layer"), ({"resolution": 700}, "640 or 1024"),
                    ({"steps": 1}, "steps of at least 2"), ({"language": "fr"}, "en or zh")]:
        with pytest.raises(InputError, match=msg):
            layers.split(model, picture(), **kw)
    with pytest.raises(InputError, match="a batch of 2"):
        layers.split(model, torch.cat([picture(), picture()]))


def test_stop_in_the_caption_and_in_the_loop_leaves_the_pipeline_clean(model):
    progress = StopAt(in_caption=True)
    with pytest.raises(InterruptedError, match="caption"):
        layers.split(model, picture(), layers=2, steps=3, prompt="", progress=progress)
    assert progress.checks >= 1 and progress.done == 0
    progress = StopAt(at=1)
    with pytest.raises(InterruptedError):
        layers.split(model, picture(), layers=2, steps=50, prompt=PROMPT, progress=progress)
    assert progress.done == 1
    # the per-call wrappers are gone: the class methods show through again
    assert "get_image_caption" not in vars(model.pipe) and "generate" not in vars(model.pipe.text_encoder)


def test_split_runs_and_reports_every_step(model):
    progress = NullProgress()
    got = layers.split(model, picture(), layers=2, steps=2, cfg=1.0, seed=SEED, prompt=PROMPT, progress=progress)
    assert progress.done == 2 and got.prompt == PROMPT
    assert got.layers.shape[0] == 2 and got.layers.shape[-1] == 3 and got.alphas.shape == got.layers.shape[:3]
    assert got.composite.shape == (1, *got.layers.shape[1:])
    assert 0 <= float(got.alphas.min()) and float(got.alphas.max()) <= 1


def test_pipeline_output_is_the_layers_without_the_leading_composite(folder):
    """What Split takes as layers (diffusers' `images[0]`, compared with the node through the server in
    tests/comfy/test_layers_api.py) are frames 1..N of the denoised latents decoded; frame 0, the picture's
    composite, is not among them."""
    pipe = tiny_layered.reference_pipeline(folder)
    pil = Image.fromarray(np.rint(picture()[0].numpy() * 255).astype(np.uint8)).convert("RGBA")
    ref, latents = tiny_layered.reference_split(pipe, pil, prompt=PROMPT, layers=2, steps=2, cfg=4.0, seed=SEED)
    assert ref.shape[0] == 2 and ref.shape[1] == 4  # diffusers: `layers` RGBA images
    kept, notes = layers.take_layers(ref, 2)
    assert kept is ref and notes == []

    h, w = ref.shape[2:]
    lat = pipe._unpack_latents(latents, h, w, 2, pipe.vae_scale_factor)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    lat = lat * std + mean
    assert lat.shape[2] == 3  # layers + 1 frames were denoised

    def decode(i: int) -> torch.Tensor:
        with torch.inference_mode():
            return pipe.image_processor.postprocess(pipe.vae.decode(lat[:, :, i : i + 1]).sample.squeeze(2),
                                                    output_type="pt")[0]

    assert torch.allclose(decode(2), ref[1], atol=1e-4)  # the last layer is the last frame: layer i = frame i + 1
    composite_frame = decode(0)
    assert all(float((composite_frame - ref[i]).abs().max()) > 1e-2 for i in range(2))
    # had the pipeline returned the composite first (other implementations do), Split would drop it
    with_composite = torch.cat([composite_frame[None], ref])
    kept, notes = layers.take_layers(with_composite, 2)
    assert torch.equal(kept, ref) and "composite" in notes[0]


def test_spec_is_hashable_and_frozen(folder):
    spec = layers.LayeredSpec(path=str(folder))
    assert hash(spec) == hash(dataclasses.replace(spec))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.quantization = "nf4"  # type: ignore[misc]
