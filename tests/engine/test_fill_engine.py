"""FLUX.1 Fill engine on the tiny model: parity with plain diffusers for both layouts, batches, masks, settings,
progress and the model registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atelier import fill, stage
from atelier.attention import SlicedFluxAttnProcessor, enable_sliced_attention
from atelier.errors import InputError, ModelFileError, SettingError
from atelier.images import pad_to_multiple
from atelier.progress import NullProgress
from atelier.registry import REGISTRY
from atelier.types import FluxFillSpec

PROMPT = "a red armchair by the window"
STEPS = 3
GUIDANCE = 30.0
SEED = 1234
TOL = 1e-4


def _image(h=32, w=48, b=1, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _mask(h=32, w=48, b=1):
    m = torch.zeros(b, h, w)
    m[:, h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 1.0
    return m


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def _run(model, image, mask, seed=SEED, progress=None, **kw):
    kw.setdefault("composite_back", False)
    return fill.inpaint(model, image, mask, PROMPT, steps=STEPS, guidance=GUIDANCE, seed=seed, progress=progress, **kw)


@pytest.fixture(scope="module")
def models(files_diffusers, files_single):
    """One plain (default settings) model per layout, shared by the tests that do not change settings."""
    built = {"diffusers": fill.load(fill.make_handle(FluxFillSpec(files=files_diffusers))),
             "single_file": fill.load(fill.make_handle(FluxFillSpec(files=files_single)))}
    for m in built.values():
        m.pipe.set_progress_bar_config(disable=True)
    yield built
    for m in built.values():
        m.close()


@pytest.fixture(params=["diffusers", "single_file"])
def model(request, models):
    return models[request.param]


@pytest.fixture
def pipe_calls(monkeypatch):
    """Seeds of every FluxFillPipeline call made during the test (the class is wrapped, not replaced)."""
    from diffusers import FluxFillPipeline

    calls: list[int] = []
    original = FluxFillPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs["generator"].initial_seed())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxFillPipeline, "__call__", counting)
    return calls


def _load(files, **settings):
    m = fill.load(fill.make_handle(FluxFillSpec(files=files, **settings)))
    m.pipe.set_progress_bar_config(disable=True)
    return m


# ------------------------------------------------------------------------------------------------- parity


def test_loaded_model_resolves_cpu_settings(model):
    assert model.offload == "none"
    assert model.dtype is torch.float32
    assert model.device == torch.device("cpu")
    assert model.multiple == 16  # VAE downscale 8 × 2×2 latent packing
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.pipe.transformer.parameters())


def test_inpaint_equals_plain_diffusers(model, reference):
    image, mask = _image(), _mask()
    out = _run(model, image, mask)
    want = reference(image, mask, PROMPT, STEPS, GUIDANCE, SEED)
    assert out.shape == image.shape == want.shape
    assert torch.isfinite(out).all()
    assert _max_diff(out, want) <= TOL
    assert _max_diff(out, image) > 1e-2  # the tiny model really painted something


def test_both_layouts_give_the_same_pixels(models):
    image, mask = _image(seed=3), _mask()
    a = _run(models["diffusers"], image, mask)
    b = _run(models["single_file"], image, mask)
    assert _max_diff(a, b) <= TOL


def test_same_seed_same_pixels_other_seed_other_pixels(models):
    m = models["diffusers"]
    image, mask = _image(), _mask()
    first, again = _run(m, image, mask), _run(m, image, mask)
    other = _run(m, image, mask, seed=SEED + 7)
    assert torch.equal(first, again)
    assert _max_diff(first, other) > 1e-3


def test_composite_back_keeps_outside_pixels_exact(model):
    image, mask = _image(seed=5), _mask()
    raw = _run(model, image, mask, composite_back=False)
    out = _run(model, image, mask, composite_back=True)
    outside = (mask == 0).unsqueeze(-1).expand_as(out)
    inside = ~outside
    assert torch.equal(out[outside], image[outside])
    assert torch.equal(out[inside], raw[inside])
    assert not torch.equal(raw[outside], image[outside])  # without compositing the outside did change


def test_soft_mask_edges_blend_with_the_generated_pixels(models):
    m = models["diffusers"]
    image, mask = _image(seed=6), _mask() * 0.5
    raw = _run(m, image, mask, composite_back=False)
    out = _run(m, image, mask, composite_back=True)
    torch.testing.assert_close(out, image * (1 - mask.unsqueeze(-1)) + raw * mask.unsqueeze(-1))


# ------------------------------------------------------------------------------------------ masks, batches


def test_empty_mask_returns_the_input_without_sampling(models, pipe_calls):
    image = _image(seed=8)
    progress = NullProgress()
    for composite_back in (True, False):
        out = _run(models["diffusers"], image, torch.zeros(1, 32, 48), progress=progress, composite_back=composite_back)
        assert torch.equal(out, image)
    assert pipe_calls == []
    assert progress.done == 2 * STEPS


def test_a_batch_with_one_empty_mask_samples_only_the_other(models, pipe_calls):
    m = models["diffusers"]
    image = _image(b=2, seed=9)
    mask = torch.cat([torch.zeros(1, 32, 48), _mask()])
    progress = NullProgress()
    out = _run(m, image, mask, progress=progress)
    assert pipe_calls == [SEED + 1]  # image 1 keeps its own seed even though image 0 was skipped
    assert progress.done == 2 * STEPS
    assert torch.equal(out[0], image[0])
    assert torch.equal(out[1:], _run(m, image[1:], _mask(), seed=SEED + 1))


def test_a_batch_with_one_mask_equals_single_runs_with_consecutive_seeds(model):
    image, mask = _image(b=2, seed=10), _mask()
    progress = NullProgress()
    out = _run(model, image, mask, progress=progress)
    assert out.shape == (2, 32, 48, 3)
    assert progress.done == STEPS * 2
    first = _run(model, image[:1], mask, seed=SEED)
    second = _run(model, image[1:], mask, seed=SEED + 1)
    assert torch.equal(out[:1], first)
    assert torch.equal(out[1:], second)


def test_a_mask_per_image_is_used_per_image(models):
    m = models["diffusers"]
    image = _image(b=2, seed=11)
    masks = torch.stack([_mask()[0], torch.flip(_mask()[0], dims=[0, 1])])
    out = _run(m, image, masks, composite_back=True)
    for i in range(2):
        outside = (masks[i] == 0).unsqueeze(-1).expand(32, 48, 3)
        assert torch.equal(out[i][outside], image[i][outside])
    assert torch.equal(out[1:], _run(m, image[1:], masks[1:], seed=SEED + 1, composite_back=True))


def test_progress_counts_steps_times_images(models):
    progress = NullProgress()
    _run(models["single_file"], _image(b=3, seed=12), _mask(), progress=progress)
    assert progress.done == STEPS * 3


def test_a_size_that_is_not_a_multiple_comes_back_at_its_size(model, reference):
    image, mask = _image(h=30, w=45, seed=13), _mask(h=30, w=45)
    out = _run(model, image, mask)
    assert out.shape == (1, 30, 45, 3)
    # what plain diffusers paints on the edge-padded image, cropped back
    padded, padded_mask, pad = pad_to_multiple(image, mask, 16)
    assert padded.shape[1:3] == (32, 48)
    want = pad.crop(reference(padded, padded_mask, PROMPT, STEPS, GUIDANCE, SEED))
    assert _max_diff(out, want) <= TOL
    composited = _run(model, image, mask, composite_back=True)
    outside = (mask == 0).unsqueeze(-1).expand_as(composited)
    assert torch.equal(composited[outside], image[outside])


def test_a_mask_of_another_size_is_an_input_error(models, pipe_calls):
    with pytest.raises(InputError) as e:
        _run(models["diffusers"], _image(), _mask(h=48, w=32))
    assert "48×32" in str(e.value) and "32×48" in str(e.value)
    assert pipe_calls == []


def test_zero_steps_is_an_input_error(models):
    with pytest.raises(InputError, match="steps"):
        fill.inpaint(models["diffusers"], _image(), _mask(), PROMPT, steps=0)


def test_a_closed_model_says_so(files_diffusers):
    m = _load(files_diffusers)
    m.close()
    assert m.pipe is None
    with pytest.raises(SettingError, match="released"):
        _run(m, _image(), _mask())
    m.close()  # twice is fine


# ------------------------------------------------------------------------------------------------ settings


def test_attention_slicing_gives_the_same_pixels(models, files_diffusers):
    base = _run(models["diffusers"], _image(seed=14), _mask())
    m = _load(files_diffusers, attention_slicing=True)
    try:
        procs = list(m.pipe.transformer.attn_processors.values())
        assert len(procs) == 2 and all(isinstance(p, SlicedFluxAttnProcessor) for p in procs)  # 1 double + 1 single
        assert _max_diff(_run(m, _image(seed=14), _mask()), base) <= TOL
        # the default chunk is longer than this tiny sequence: slice for real (512 text + 24 image tokens)
        assert enable_sliced_attention(m.pipe.transformer, chunk=8) == 2
        assert all(p.chunk == 8 for p in m.pipe.transformer.attn_processors.values())
        assert _max_diff(_run(m, _image(seed=14), _mask()), base) <= TOL
    finally:
        m.close()


def test_sliced_attention_processor_equals_the_default_one(models):
    """The processor alone, on one attention module of each kind, with chunks that do not divide the length."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    tr = models["diffusers"].pipe.transformer
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 21, 32, generator=g)
    text = torch.randn(1, 11, 32, generator=g)
    double, single = tr.transformer_blocks[0].attn, tr.single_transformer_blocks[0].attn
    with torch.no_grad():
        ref_img, ref_txt = FluxAttnProcessor()(double, hidden, text)
        for chunk in (1, 5, 64):
            img, txt = SlicedFluxAttnProcessor(chunk)(double, hidden, text)
            assert _max_diff(img, ref_img) <= 1e-5 and _max_diff(txt, ref_txt) <= 1e-5
            out = SlicedFluxAttnProcessor(chunk)(single, hidden)
            assert _max_diff(out, FluxAttnProcessor()(single, hidden)) <= 1e-5


def test_first_block_cache_runs(files_diffusers):
    m = _load(files_diffusers, first_block_cache=0.2)
    try:
        assert m.pipe.transformer.is_cache_enabled
        progress = NullProgress()
        out = _run(m, _image(seed=15), _mask(), progress=progress)
        assert out.shape == (1, 32, 48, 3)
        assert torch.isfinite(out).all()
        assert progress.done == STEPS
        # the cache state is reset after a run: the same inputs give the same pixels again
        assert torch.equal(_run(m, _image(seed=15), _mask()), out)
    finally:
        m.close()


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_first_block_cache_out_of_range_is_a_setting_error(files_diffusers, bad):
    with pytest.raises(SettingError, match="first_block_cache"):
        fill.make_handle(FluxFillSpec(files=files_diffusers, first_block_cache=bad))


def test_vae_slicing_and_tiling_run_and_match(models, files_single):
    base = _run(models["single_file"], _image(seed=16, b=2), _mask())
    m = _load(files_single, vae_slicing=True, vae_tiling=True)
    try:
        assert m.pipe.vae.use_slicing and m.pipe.vae.use_tiling
        out = _run(m, _image(seed=16, b=2), _mask())
        assert out.shape == (2, 32, 48, 3)
        assert _max_diff(out, base) <= TOL  # tiles larger than the image: same maths
    finally:
        m.close()


@pytest.mark.parametrize("offload", ["auto", "none", "model", "sequential"])
def test_offload_resolves_to_none_on_cpu(files_diffusers, offload):
    handle = fill.make_handle(FluxFillSpec(files=files_diffusers, offload=offload))
    assert handle.offload == "none"
    assert handle.dtype == "fp32"
    assert handle.spec.offload == offload  # what the user chose is kept in the spec


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantization_on_cpu_is_refused_before_loading(files_single, quantization):
    loads = REGISTRY.loads
    with pytest.raises(SettingError, match="'none'"):
        fill.make_handle(FluxFillSpec(files=files_single, quantization=quantization))
    assert REGISTRY.loads == loads


def test_make_handle_checks_the_files(files_single, single_files, tmp_path):
    with pytest.raises(ModelFileError, match="vae"):
        fill.make_handle(FluxFillSpec(files=dataclasses.replace(files_single, vae=str(tmp_path / "gone.safetensors"))))
    with pytest.raises(ModelFileError, match="FLUX.1 Fill"):  # a VAE picked as the transformer
        fill.make_handle(FluxFillSpec(files=dataclasses.replace(files_single, path=str(single_files["vae"]))))
    with pytest.raises(ModelFileError, match="T5 tokenizer"):
        fill.make_handle(FluxFillSpec(files=dataclasses.replace(files_single, t5_tokenizer=str(tmp_path / "none"))))
    with pytest.raises(ModelFileError, match="model_index.json"):
        fill.make_handle(FluxFillSpec(files=dataclasses.replace(files_single, layout="diffusers", path=str(tmp_path))))


def test_part_sizes_are_read_from_headers(files_diffusers, files_single, models):
    d, s = fill.part_sizes(files_diffusers), fill.part_sizes(files_single)
    transformer_params = sum(p.numel() for p in models["diffusers"].pipe.transformer.parameters())
    vae_params = sum(p.numel() for p in models["diffusers"].pipe.vae.parameters())
    assert d["transformer"] == s["transformer"] == 2 * transformer_params  # fused BFL qkv or split: same count
    assert d["vae"] == s["vae"] == 2 * vae_params
    assert d["text_encoders"] > 0 and s["text_encoders"] > 0
    # fp32 doubles the 16-bit size in the estimate the model carries
    assert models["diffusers"].footprint.transformer == 2 * d["transformer"]


def test_handle_summary_names_the_settings(files_diffusers):
    h = fill.make_handle(FluxFillSpec(files=files_diffusers, vae_tiling=True, first_block_cache=0.1))
    text = fill.summary(h)
    assert "fp32" in text and "offload none" in text and "VAE tiling" in text and "FirstBlockCache 0.1" in text
    assert "VAE slicing" not in text


# ------------------------------------------------------------------------------------------------ registry


def test_get_model_builds_once_per_spec(clean_registry, files_diffusers):
    handle = fill.make_handle(FluxFillSpec(files=files_diffusers))
    loads = clean_registry.loads
    first = stage.get(fill.STAGE, handle)
    second = stage.get(fill.STAGE, handle)
    assert first is second
    assert clean_registry.loads == loads + 1
    # an equal handle made again (as ComfyUI does on a re-run) finds the same model
    assert stage.get(fill.STAGE, fill.make_handle(FluxFillSpec(files=files_diffusers))) is first
    assert clean_registry.loads == loads + 1
    assert clean_registry.get(handle.spec) is first


def test_another_setting_replaces_the_previous_model(clean_registry, files_diffusers):
    first = fill.make_handle(FluxFillSpec(files=files_diffusers))
    second = fill.make_handle(FluxFillSpec(files=files_diffusers, vae_slicing=True))
    old = stage.get(fill.STAGE, first)
    new = stage.get(fill.STAGE, second)
    assert new is not old
    assert clean_registry.get(first.spec) is None
    assert clean_registry.get(second.spec) is new
    assert clean_registry.keys() == [second.spec]
    assert old.pipe is None  # closed, so its memory can go
    assert new.pipe.vae.use_slicing


def test_release_then_rebuild(clean_registry, files_diffusers):
    handle = fill.make_handle(FluxFillSpec(files=files_diffusers))
    model = stage.get(fill.STAGE, handle)
    loads = clean_registry.loads
    assert clean_registry.release(handle.spec) is True
    assert clean_registry.release(handle.spec) is False
    assert model.pipe is None
    assert clean_registry.get(handle.spec) is None
    rebuilt = stage.get(fill.STAGE, handle)  # a handle whose model was released rebuilds it
    assert rebuilt is not model and rebuilt.pipe is not None
    assert clean_registry.loads == loads + 1
    out = _run(rebuilt, _image(), _mask())
    assert out.shape == (1, 32, 48, 3)


def test_compile_gives_the_same_pixels_and_says_so(models, files_diffusers):
    """The loader's `compile` toggle: the transformer's blocks run through torch.compile (inductor), same pixels."""
    base = _run(models["diffusers"], _image(seed=15), _mask())
    m = _load(files_diffusers, compile=True)
    try:
        blocks = list(m.pipe.transformer.transformer_blocks) + list(m.pipe.transformer.single_transformer_blocks)
        assert blocks and all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in blocks)
        assert any("compiled" in n for n in m.notes)
        assert _max_diff(_run(m, _image(seed=15), _mask()), base) <= 1e-3  # fused kernels round differently
    finally:
        m.close()


def test_compile_is_skipped_under_sequential_offload():
    from atelier import pipelines

    class Fake:  # what compile_transformer reads: the resolved mode, the device, the notes
        offload, device, notes = "sequential", torch.device("cpu"), []
        pipe = type("P", (), {"transformer": torch.nn.Linear(2, 2)})()

    fake = Fake()
    pipelines.compile_transformer(fake)
    assert fake.pipe.transformer._compiled_call_impl is None
    assert any("skipped" in n for n in fake.notes)


def test_vae_tiling_uses_tiles_small_enough_to_tile_a_1024_picture():
    """FLUX's VAE says sample_size 1024: diffusers would tile only pictures larger than that."""
    from diffusers import AutoencoderKL

    from atelier.pipelines import enable_vae_tiling

    vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=1024)
    assert vae.tile_sample_min_size == 1024 and vae.tile_latent_min_size == 128
    enable_vae_tiling(vae)
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
    # a 1024² latent (128²) now takes the tiled path, and decodes to the same size
    calls = []
    original = vae.tiled_decode
    vae.tiled_decode = lambda z, **kw: calls.append(z.shape) or original(z, **kw)
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 4, 128, 128)).sample
    assert calls and out.shape == (1, 3, 1024, 1024)
