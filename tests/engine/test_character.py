"""Realtime character engine on tiny random weights: frame 1 = plain diffusers (ControlNet + IP-Adapter + LCM
LoRA/scheduler + seed), the reuse step = its formula and diffusers' img2img pipeline, TAESD key mapping =
AutoencoderTiny, the colour ΔE, keyframe prompts, and the bad inputs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from atelier import character, sd15_files, stage
from atelier.errors import InputError, ModelFileError, SettingError
from atelier.images import to_bchw
from tests.harness import tiny_character as tc

log = logging.getLogger("atelier.tests")

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tc.build(tmp_path_factory.getbasetemp() / "tiny-character")


def _spec(tiny, **kw) -> character.CharacterSpec:
    base = dict(model=str(tiny["sd15"]), controlnet=str(tiny["controlnet"]), tokenizer=tc.tokenizer_dir(),
                ip_adapter=str(tiny["ip_adapter"]), clip_vision=str(tiny["clip_vision"]),
                fast_lora=str(tiny["lcm_lora"]))
    base.update(kw)
    return character.CharacterSpec(**base)


@pytest.fixture(scope="module")
def model(tiny):
    spec = _spec(tiny)
    handle = character.make_handle(spec)
    return character.load(handle)


def _poses(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def _reference_image():
    g = torch.Generator().manual_seed(11)
    return torch.rand(1, 40, 48, 3, generator=g)


def _pil(image):
    from PIL import Image

    return Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def reference_pipe(tiny):
    """Plain diffusers, built from the same files without Atelier's loaders."""
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**tc.CLIP_VISION_CONFIG))
    vision.load_state_dict(load_file(str(tiny["clip_vision"])))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny["sd15"]), controlnet=ControlNetModel.from_pretrained(str(tiny["controlnet"])),
        tokenizer=CLIPTokenizer.from_pretrained(tc.tokenizer_dir(), model_max_length=77),
        image_encoder=vision.eval(), feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.load_ip_adapter(str(tiny["ip_adapter"].parent), subfolder="", weight_name=tiny["ip_adapter"].name,
                         image_encoder_folder=None)
    pipe.load_lora_weights(str(tiny["lcm_lora"].parent), weight_name=tiny["lcm_lora"].name)
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_frame_one_is_plain_diffusers(model, reference_pipe, guidance):
    poses, ref = _poses(1), _reference_image()
    settings = character.Settings(steps=3, guidance=guidance, controlnet_scale=0.8, ip_adapter_scale=0.7, reuse=0.5,
                                  seed=123)
    frames, report = character.animate(model, poses, ref, "a knight in red armour", settings=settings)
    reference_pipe.set_ip_adapter_scale(0.7)
    with torch.inference_mode():
        expected = reference_pipe(
            "a knight in red armour", image=to_bchw(poses), ip_adapter_image=_pil(ref), num_inference_steps=3,
            guidance_scale=guidance, controlnet_conditioning_scale=0.8, generator=torch.Generator("cpu").manual_seed(123),
            output_type="pt").images
    delta = (frames - expected.permute(0, 2, 3, 1)).abs().max().item()
    log.info(f"frame-1 parity (guidance {guidance}): max |Δ| = {delta:.2e}")
    assert frames.shape == (1, SIZE, SIZE, 3)
    assert delta < 1e-4
    assert frames.std() > 0.01  # not a flat picture
    assert report["per_frame"][0]["mode"] == "fresh" and report["resets"] == [{"frame": 0, "reason": "start"}]
    assert report["settings"]["scheduler"] == "LCMScheduler" and report["settings"]["cfg"] is (guidance > 1)


def test_ip_adapter_changes_the_picture(model):
    poses = _poses(1)
    outs = []
    for scale in (0.0, 1.0):
        f, _ = character.animate(model, poses, _reference_image(), "x",
                                 settings=character.Settings(steps=2, ip_adapter_scale=scale))
        outs.append(f)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_reuse_step_matches_formula_and_img2img(model, reference_pipe):
    """Frame 2 starts from √ᾱ(t)·z₁ + √(1−ᾱ(t))·ε and equals diffusers' ControlNet img2img pipeline given z₁."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    poses, ref = _poses(2, seed=3), _reference_image()
    settings = character.Settings(steps=4, guidance=1.0, reuse=0.5, seed=7)
    session = character.Session(model, ref, "a dancer", settings=settings)
    first = session.run(poses[:1])
    z1 = session.prev_latent.clone()
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].clone()), with_kwargs=True)
    try:
        second = session.run(poses[1:])
    finally:
        hook.remove()
    n, strength = character.reuse_plan(4, 0.5)
    assert n == 2 and len(seen) == n
    sched = model.img2img.scheduler
    sched.set_timesteps(4)
    t = sched.timesteps[4 - n]
    noise = torch.randn(z1.shape, generator=torch.Generator("cpu").manual_seed(7))
    expected_start = character.mixed_latent(z1, noise, sched.alphas_cumprod, int(t))
    d_start = (seen[0] - expected_start).abs().max().item()
    log.info(f"reuse start latent vs formula: max |Δ| = {d_start:.2e}")
    assert d_start < 1e-5

    img2img = StableDiffusionControlNetImg2ImgPipeline(**reference_pipe.components)
    img2img.set_ip_adapter_scale(0.6)
    with torch.inference_mode():
        expected = img2img("a dancer", image=z1, control_image=to_bchw(poses[1:]), strength=strength,
                           ip_adapter_image=_pil(ref), num_inference_steps=4, guidance_scale=1.0,
                           controlnet_conditioning_scale=1.0, generator=torch.Generator("cpu").manual_seed(7), output_type="pt",
                           height=SIZE, width=SIZE).images
    d = (second - expected.permute(0, 2, 3, 1)).abs().max().item()
    log.info(f"reuse frame vs diffusers img2img: max |Δ| = {d:.2e}")
    assert d < 1e-4
    assert (second - first).abs().max() > 1e-3
    rep = session.report()
    assert [r["mode"] for r in rep["per_frame"]] == ["fresh", "reuse"]
    assert rep["per_frame"][1]["steps_run"] == 2 and rep["per_frame"][1]["delta_e"] is not None


def test_reuse_plan_table():
    assert character.reuse_plan(4, 0.0) == (4, 1.0)
    assert character.reuse_plan(4, 1.0)[0] == 1
    assert character.reuse_plan(2, 0.5)[0] == 1
    assert character.reuse_plan(10, 0.3)[0] == 7
    for steps in range(1, 31):
        for r in np.linspace(0, 1, 21):
            n, s = character.reuse_plan(steps, float(r))
            assert min(int(steps * s), steps) == n  # what diffusers will run


def test_reset_every_and_batches(model):
    poses = _poses(5, seed=4)
    settings = character.Settings(steps=2, reuse=0.5, reset_every=4, batch=2, seed=1)
    frames, rep = character.animate(model, poses, _reference_image(), "x", settings=settings)
    assert frames.shape == (5, SIZE, SIZE, 3)
    assert [r["mode"] for r in rep["per_frame"]] == ["fresh", "fresh", "reuse", "reuse", "fresh"]
    assert rep["resets"] == [{"frame": 0, "reason": "start"}, {"frame": 4, "reason": "reset_every"}]
    assert rep["frames"] == 5 and rep["fps"] > 0 and len(rep["per_frame"]) == 5
    assert all((frames[i] - frames[i + 1]).abs().max() > 1e-3 for i in range(4))


def test_keyframe_prompts(model):
    assert character.parse_keyframes('{"0": "smiling", "3": "angry"}') == {0: "smiling", 3: "angry"}
    assert character.parse_keyframes('[{"frame": 2, "prompt": "jump"}]') == {2: "jump"}
    assert character.parse_keyframes("a caption from the VLM") == {0: "a caption from the VLM"}
    assert character.parse_keyframes("  ") == {}
    with pytest.raises(InputError):
        character.parse_keyframes('{"x": "y"}')
    assert character.frame_prompt("anime", {0: "smiling", 3: "angry"}, 4) == (3, "anime, angry")
    assert character.frame_prompt("anime", {2: "jump"}, 1) == (None, "anime")
    calls = []
    orig = model.pipe.encode_prompt
    model.pipe.encode_prompt = lambda text, *a, **k: (calls.append(text), orig(text, *a, **k))[1]
    try:
        _, rep = character.animate(model, _poses(4), _reference_image(), "anime", keyframe_prompts='{"0": "a", "2": "b"}',
                                   settings=character.Settings(steps=1, reuse=0.0))
    finally:
        model.pipe.encode_prompt = orig
    assert [c for c in calls if c is not None] == ["anime, a", "anime, b"]  # once per keyframe (None: the pipeline given embeds)
    assert [r["keyframe"] for r in rep["per_frame"]] == [0, 0, 2, 2]


def test_bad_inputs(model, tiny):
    poses = _poses(3)
    with pytest.raises(InputError, match="steps from 1"):
        character.animate(model, poses, _reference_image(), "x", settings=character.Settings(steps=0))
    with pytest.raises(InputError, match="keyframe at frame 5"):
        character.animate(model, poses, _reference_image(), "x", keyframe_prompts='{"5": "late"}')
    with pytest.raises(InputError, match="reference"):
        character.animate(model, poses, None, "x")
    with pytest.raises(ModelFileError, match="SDXL"):
        character.make_handle(_spec(tiny, controlnet=str(tiny["controlnet_sdxl"])))
    with pytest.raises(ModelFileError, match="SD1.5 model|diffusers folder"):
        character.make_handle(_spec(tiny, model=str(tiny["controlnet"])))
    with pytest.raises(ModelFileError, match="fast LoRA"):
        character.make_handle(_spec(tiny, fast_lora=str(tiny["ip_adapter"])))
    with pytest.raises(ModelFileError, match="CLIP vision"):
        character.make_handle(_spec(tiny, clip_vision=None))


def test_size_change_resets(model):
    """Live frames of another size: the previous latent cannot carry over; the frame starts fresh (a reset)."""
    s = character.Session(model, _reference_image(), "x", settings=character.Settings(steps=2, reuse=0.5))
    s.run(_poses(1, 64))
    s.run(_poses(1, 64))
    out = s.run(_poses(1, 48))
    assert out.shape == (1, 48, 48, 3)
    assert [r["reason"] for r in s.resets] == ["start", "size changed"]
    assert s.records[-1].delta_e is None  # frames of different sizes are not compared


def test_oom_splits_the_batch(model, monkeypatch):
    s = character.Session(model, _reference_image(), "x", settings=character.Settings(steps=1, batch=4))
    real = s._pass
    def flaky(poses, *a):
        if poses.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(poses, *a)
    monkeypatch.setattr(s, "_pass", flaky)
    out = s.run(_poses(4))
    assert out.shape[0] == 4
    assert s.oom_events == [{"frame": 0, "batch": 4, "action": "split into passes of 2 and 2"}]
    monkeypatch.setattr(s, "_pass", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(SettingError, match="out of memory at batch 1"):
        s.run(_poses(1))


def test_controlnet_single_file_equals_folder(tiny):
    a = sd15_files.load_controlnet(str(tiny["controlnet"]), torch.float32)
    b = sd15_files.load_controlnet(str(tiny["controlnet_file"]), torch.float32)
    assert a.config.block_out_channels == b.config.block_out_channels
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_original_controlnet_file_equals_folder(tiny, tmp_path_factory):
    """lllyasviel's original layout (control_v11p_sd15_openpose.pth keys) loads with the shipped config."""
    path = tc.export_ldm_controlnet(tiny["controlnet"], tmp_path_factory.getbasetemp() / "cn" / "control_tiny.safetensors")
    kind, cfg = sd15_files.controlnet_kind(path)
    assert kind == "original_file" and cfg["conditioning_embedding_out_channels"] == [8, 8, 8, 16]
    a = sd15_files.load_controlnet(str(tiny["controlnet"]), torch.float32)
    b = sd15_files.load_controlnet(str(path), torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_taesd_mapping_equals_autoencoder_tiny(tiny):
    ref = tc.TaesdReference(seed=7)
    vae, has_encoder = sd15_files.load_taesd(str(tiny["taesd_decoder"]), torch.float32)
    assert has_encoder
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        d_dec = (vae.decode(z).sample - ref.decode(z)).abs().max().item()
        d_enc = (vae.encode(x).latents - ref.encode(x)).abs().max().item()
    log.info(f"TAESD decode max |Δ| = {d_dec:.2e}, encode max |Δ| = {d_enc:.2e}")
    assert d_dec < 1e-5 and d_enc < 1e-5
    # the encoder file alone names its decoder
    assert sd15_files.taesd_pair(str(tiny["taesd_encoder"]))[0] == str(tiny["taesd_decoder"])


def test_taesd_in_the_pipeline(tiny):
    handle = character.make_handle(_spec(tiny, taesd=str(tiny["taesd_decoder"]), ip_adapter=None, clip_vision=None))
    model = character.load(handle)
    assert type(model.pipe.vae).__name__ == "AutoencoderTiny" and "TAESD" in character.summary(handle, model)
    frames, rep = character.animate(model, _poses(2), None, "x", settings=character.Settings(steps=2))
    assert frames.shape == (2, SIZE, SIZE, 3) and rep["settings"]["ip_adapter"] is False
    model.close()


def test_delta_e():
    from skimage.color import rgb2lab

    g = torch.Generator().manual_seed(0)
    img = torch.rand(32, 32, 3, generator=g)
    lab = character.srgb_to_lab(img)
    assert np.abs(lab.numpy() - rgb2lab(img.numpy().astype(np.float64))).max() < 0.05
    perm = img.reshape(-1, 3)[torch.randperm(32 * 32, generator=g)].reshape(32, 32, 3)
    assert character.histogram_delta_e(img, img) == 0.0
    assert character.histogram_delta_e(img, perm, side=32) < 1e-9  # pixels moved, same colours
    grey = torch.full((16, 16, 3), 0.5)
    red = torch.tensor([0.8, 0.3, 0.3]).expand(16, 16, 3)
    de76 = float(torch.linalg.norm(character.srgb_to_lab(grey[0, 0]) - character.srgb_to_lab(red[0, 0])))
    assert abs(character.histogram_delta_e(grey, red) - de76) < 1e-6


def test_stage_summary_and_sizes(tiny):
    handle = character.make_handle(_spec(tiny))
    assert handle.scheduler == "LCMScheduler" and handle.layout == "diffusers"
    sizes = character.part_sizes(handle.spec)
    assert sizes["transformer"] > 0 and sizes["text_encoders"] > 0 and sizes["vae"] > 0
    line = character.summary(handle)
    assert "IP-Adapter" in line and "LCMScheduler" in line and "\n" not in line
    assert stage.STAGE_MODULES["character"] == "character"
    assert character.scheduler_for(None) == "DPMSolverMultistepScheduler"
    assert character.scheduler_for("/x/TCD-SD15-LoRA.safetensors") == "TCDScheduler"
    assert character.scheduler_for("/x/Hyper-SD15-2steps-lora.safetensors") == "TCDScheduler"
    assert json.dumps(character.Settings().__dict__)


def test_single_file_checkpoint_equals_the_folder(tiny, model, tmp_path_factory):
    """An original-layout SD1.5 checkpoint (keys written by ComfyUI's own maps) loads offline with the shipped
    configs and gives the folder's frames."""
    ckpt = tc.export_ldm_checkpoint(tiny["sd15"], tmp_path_factory.getbasetemp() / "checkpoints" / "sd15-tiny.safetensors")
    handle = character.make_handle(_spec(tiny, model=str(ckpt)))
    assert handle.layout == "single_file"
    single = character.load(handle)
    try:
        s = character.Settings(steps=2, reuse=0.5, seed=5)
        a, _ = character.animate(single, _poses(2), _reference_image(), "a knight", settings=s)
        b, _ = character.animate(model, _poses(2), _reference_image(), "a knight", settings=s)
    finally:
        single.close()
    d = (a - b).abs().max().item()
    log.info(f"single file vs folder: max |Δ| = {d:.2e}")
    assert d < 1e-4
