"""FLUX Fill through a real ComfyUI server, driven only through its HTTP API and websocket.

Parity: the node's output equals plain diffusers' FluxFillPipeline on the same tiny weights, inputs and seed, for
both on-disk layouts. Then every toggle value, Stop, /free, and bad inputs.
"""

from __future__ import annotations

import io
import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness.comfy_server import ComfyClient, PromptRejected

W, H = 48, 32  # multiples of 16: the node pads nothing, so the reference sees the same tensors


def rgba_example(w: int = W, h: int = H, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An RGBA PNG whose transparent rectangle is the area to repaint; returns (png, rgb uint8, mask float)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    alpha = np.full((h, w), 255, dtype=np.uint8)
    alpha[h // 4 : 3 * h // 4, w // 5 : 4 * w // 5] = 0
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, format="PNG")
    mask = 1.0 - alpha.astype(np.float32) / 255.0  # what LoadImage's MASK output holds
    return buf.getvalue(), rgb, mask


def loader(model: str, **kw) -> dict:
    inputs = dict(model=model, quantization="none", offload="auto", attention_slicing=False, vae_slicing=False,
                  vae_tiling=False, first_block_cache=0.0, dtype="auto")
    inputs.update(kw)
    return {"class_type": "AtelierFluxFillLoader", "inputs": inputs}


def inpaint_prompt(model: str, image_name: str, *, steps: int = 3, seed: int = 7, composite_back: bool = False,
                   prompt: str = "a red apple on a table", loader_kw: dict | None = None,
                   mask_ref: list | None = None, image_ref: list | None = None) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": loader(model, **(loader_kw or {})),
        "3": {"class_type": "AtelierFluxFill", "inputs": {
            "pipe": ["2", 0], "image": image_ref or ["1", 0], "mask": mask_ref or ["1", 1], "prompt": prompt,
            "steps": steps, "guidance": 30.0, "seed": seed, "composite_back": composite_back}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "atelier_test"}},
    }


@pytest.fixture(scope="module")
def example(client):
    png, rgb, mask = rgba_example()
    name = client.upload_image(png, "atelier_fill_example.png")
    return name, rgb, mask


def reference(folder, rgb: np.ndarray, mask: np.ndarray, prompt: str, steps: int, seed: int) -> np.ndarray:
    """Plain diffusers on the same weights and inputs; returns HxWx3 float in [0, 1]."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    image = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    m = torch.from_numpy(mask)[None, None]
    out = pipe(prompt=prompt, image=image, mask_image=m, height=rgb.shape[0], width=rgb.shape[1],
               guidance_scale=30.0, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
               max_sequence_length=512, output_type="np").images[0]
    return out


def saved(client: ComfyClient, entry: dict) -> np.ndarray:
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    images = client.images(entry, "4")
    assert len(images) == 1
    return images[0][..., :3]


def run_error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    return msg


def combo_error(client: ComfyClient, prompt: dict) -> str:
    """A combo value outside its options: 0.3.75 does not check V3 combos, so the node's own error must say it;
    0.30 rejects the prompt first ("Value not in list"). The message, either way."""
    try:
        return run_error(client, prompt)
    except PromptRejected as e:
        return str(e)


# ------------------------------------------------------------------------------------------------ schema


def test_schema_matches_the_public_contract(client, tiny_flux):
    info = client.object_info("AtelierFluxFillLoader")
    assert info["category"] == "atelier/fill"
    assert info["output"] == ["ATELIER_FLUX_FILL"]
    assert info["input_order"]["required"] == ["model", "quantization", "offload", "attention_slicing",
                                               "vae_slicing", "vae_tiling", "first_block_cache", "dtype"]
    req = info["input"]["required"]
    assert req["quantization"][1]["options"] == ["none", "int8", "nf4", "fp8"]
    assert req["offload"][1]["options"] == ["auto", "none", "model", "sequential"]
    assert req["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    models = req["model"][1]["options"]
    assert tiny_flux["choice_diffusers"] in models and tiny_flux["choice_single"] in models
    for group in info["input"].values():
        for name, spec in group.items():
            assert spec[1].get("tooltip"), f"loader input {name} has no tooltip"

    fill = client.object_info("AtelierFluxFill")
    assert fill["input_order"]["required"] == ["pipe", "image", "mask", "prompt", "steps", "guidance", "seed",
                                               "composite_back"]
    r = fill["input"]["required"]
    assert r["steps"][1]["default"] == 28 and r["guidance"][1]["default"] == 30.0
    assert r["composite_back"][1]["default"] is True
    assert r["seed"][1].get("control_after_generate") is True
    assert fill["output"] == ["IMAGE"]


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_node_equals_plain_diffusers(client, tiny_flux, example, layout):
    name, rgb, mask = example
    entry = client.run(inpaint_prompt(tiny_flux[f"choice_{layout}"], name, steps=3, seed=11))
    got = saved(client, entry).astype(np.int16)
    ref = reference(tiny_flux["diffusers"], rgb, mask, "a red apple on a table", steps=3, seed=11)
    want = np.clip(ref * 255.0, 0, 255).astype(np.int16)  # SaveImage truncates the same way
    assert got.shape == want.shape == (H, W, 3)
    diff = np.abs(got - want)
    assert diff.max() <= 1, f"max difference {diff.max()} levels"
    # and it is not the input: the masked area was really generated
    inside = mask > 0.5
    assert np.abs(got[inside] - rgb[inside].astype(np.int16)).mean() > 10


def test_composite_back_keeps_unmasked_pixels_exact(client, tiny_flux, example):
    name, rgb, mask = example
    entry = client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, composite_back=True))
    got = saved(client, entry)
    outside = mask == 0
    assert np.array_equal(got[outside], rgb[outside])
    assert not np.array_equal(got[~outside], rgb[~outside])


def test_same_seed_same_pixels_other_seed_other_pixels(client, tiny_flux, example):
    name, _, _ = example
    a = saved(client, client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, seed=3)))
    b = saved(client, client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, seed=3,
                                                prompt="a red apple on a table ")))
    c = saved(client, client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, seed=4)))
    assert np.array_equal(a, b) or np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_any_size_is_padded_and_cropped_back(client, tiny_flux):
    png, rgb, mask = rgba_example(w=45, h=30, seed=5)
    name = client.upload_image(png, "atelier_odd_size.png")
    got = saved(client, client.run(inpaint_prompt(tiny_flux["choice_single"], name, steps=2, composite_back=True)))
    assert got.shape == (30, 45, 3)
    assert np.array_equal(got[mask == 0], rgb[mask == 0])


def test_progress_is_reported_every_step(client, tiny_flux, example, ws):
    name, _, _ = example
    entry = client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=4, seed=21))
    assert ComfyClient.succeeded(entry)
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "3"]
    assert values == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ every toggle


@pytest.mark.parametrize("kw", [
    {"offload": "none"}, {"offload": "model"}, {"offload": "sequential"}, {"offload": "auto"},
    {"dtype": "fp32"}, {"dtype": "bf16"}, {"dtype": "fp16"},
    {"attention_slicing": True}, {"vae_slicing": True}, {"vae_tiling": True}, {"first_block_cache": 0.1},
])
def test_every_toggle_value_runs_on_cpu(client, tiny_flux, example, kw):
    name, rgb, mask = example
    entry = client.run(inpaint_prompt(tiny_flux["choice_single"], name, steps=2, composite_back=True,
                                      loader_kw=kw))
    got = saved(client, entry)
    assert got.shape == (H, W, 3)
    assert np.array_equal(got[mask == 0], rgb[mask == 0])


def test_attention_slicing_gives_the_same_pixels(client, tiny_flux, example):
    name, _, _ = example
    plain = saved(client, client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, seed=5)))
    sliced = saved(client, client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2, seed=5,
                                                     loader_kw={"attention_slicing": True})))
    assert np.abs(plain.astype(int) - sliced.astype(int)).max() <= 1


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp8"])
def test_quantization_on_cpu_is_a_clear_error(client, tiny_flux, example, comfy_server, quantization):
    name, _, _ = example
    msg = run_error(client, inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=2,
                                           loader_kw={"quantization": quantization}))
    assert "CUDA GPU" in msg and "'none'" in msg
    assert comfy_server.alive()


# ---------------------------------------------------------------------------------------- stop and memory


def test_interrupt_mid_run_then_next_prompt_runs(client, tiny_flux, ws, comfy_server):
    png, _, _ = rgba_example(w=256, h=256, seed=9)
    name = client.upload_image(png, "atelier_interrupt.png")
    pid = client.queue(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=200, seed=1))
    first = ws.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == "3", timeout=120)
    assert first["data"]["max"] == 200
    client.interrupt()
    entry = client.wait(pid, timeout=120)
    assert ComfyClient.interrupted(entry)
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "3"]
    assert max(values) < 200, "the run finished instead of stopping"
    # the next prompt runs normally on the same (hook-reset) pipeline
    name2, _, _ = rgba_example()
    entry = client.run(inpaint_prompt(tiny_flux["choice_diffusers"], client.upload_image(name2, "after_stop.png"),
                                      steps=2, seed=2))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert comfy_server.alive()


def _loads(log: str) -> int:
    return len(re.findall(r"Atelier: loading FLUX\.1 Fill", log))


def test_free_releases_the_pipeline_and_the_next_run_reloads(client, tiny_flux, example, server_log):
    name, _, _ = example
    model = tiny_flux["choice_diffusers"]
    client.run(inpaint_prompt(model, name, steps=1, seed=100, loader_kw={"vae_tiling": True}))
    before = _loads(server_log())
    entry = client.run(inpaint_prompt(model, name, steps=1, seed=101, loader_kw={"vae_tiling": True}))
    assert ComfyClient.succeeded(entry)
    assert _loads(server_log()) == before, "a cached pipeline was loaded again"

    mark = len(server_log())  # an earlier test may have released a model too
    client.free(unload_models=True, free_memory=False)  # what the Unload models button sends
    deadline = time.time() + 30
    while "Atelier: released a loaded model" not in server_log(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert "Atelier: released a loaded model" in server_log(mark)
    entry = client.run(inpaint_prompt(model, name, steps=1, seed=102, loader_kw={"vae_tiling": True}))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert _loads(server_log()) == before + 1, "the run after /free did not reload the pipeline"


# ------------------------------------------------------------------------------------------------ bad input


def test_mask_of_another_size_is_a_clear_error(client, tiny_flux, example, comfy_server):
    name, _, _ = example
    prompt = inpaint_prompt(tiny_flux["choice_diffusers"], name, mask_ref=["5", 0])
    prompt["5"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    msg = run_error(client, prompt)
    assert "mask of the image's size (48×32)" in msg and "64×64" in msg
    assert comfy_server.alive()


def test_empty_mask_returns_the_input_untouched(client, tiny_flux, example, server_log):
    name, rgb, _ = example
    mark = len(server_log())
    prompt = inpaint_prompt(tiny_flux["choice_diffusers"], name, mask_ref=["5", 0], steps=3)
    prompt["5"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": W, "height": H}}
    got = saved(client, client.run(prompt))
    assert np.array_equal(got, rgb)
    assert "mask 0 is empty: image returned untouched, no sampling" in server_log(mark)


def test_mask_batch_mismatch_is_a_clear_error(client, tiny_flux, example):
    name, _, _ = example
    prompt = inpaint_prompt(tiny_flux["choice_diffusers"], name, image_ref=["5", 0], mask_ref=["7", 0])
    prompt["5"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["6"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}}
    prompt["7"] = {"class_type": "ImageToMask", "inputs": {"image": ["6", 0], "channel": "red"}}
    msg = run_error(client, prompt)
    assert "a mask batch of 1 or 2" in msg and "a mask batch of 3" in msg


def test_image_batch_with_one_mask_runs_each_image(client, tiny_flux, example):
    name, rgb, mask = example
    prompt = inpaint_prompt(tiny_flux["choice_diffusers"], name, image_ref=["5", 0], steps=2,
                            composite_back=True)
    prompt["5"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    a, b = client.images(entry, "4")
    assert np.array_equal(a[mask == 0], rgb[mask == 0]) and np.array_equal(b[mask == 0], rgb[mask == 0])
    assert not np.array_equal(a, b), "image i uses seed + i, so the two repaints differ"


def test_folder_with_a_missing_file_lists_what_is_expected(client, tiny_flux, example, comfy_base, comfy_server):
    broken = comfy_base / "models" / "diffusers" / "flux-fill-broken"
    if not broken.exists():
        shutil.copytree(tiny_flux["diffusers"], broken)
        for f in (broken / "text_encoder_2").glob("*.safetensors"):
            f.unlink()
    name, _, _ = example
    msg = run_error(client, inpaint_prompt("diffusers/flux-fill-broken", name))
    assert "text_encoder_2/*.safetensors" in msg and "model_index.json" not in msg.split("got")[1]
    assert "transformer/" in msg  # the whole expected layout is listed
    assert comfy_server.alive()


def test_folder_of_another_pipeline_is_not_offered_and_is_a_clear_error(client, tiny_flux, example, comfy_base,
                                                                        comfy_server):
    other = comfy_base / "models" / "diffusers" / "flux-dev-not-fill"
    if not other.exists():
        shutil.copytree(tiny_flux["diffusers"], other)
        index = other / "model_index.json"
        index.write_text(index.read_text().replace("FluxFillPipeline", "FluxPipeline"))
    options = client.object_info("AtelierFluxFillLoader")["input"]["required"]["model"][1]["options"]
    assert "diffusers/flux-dev-not-fill" not in options
    name, _, _ = example
    # 0.3.75 does not check V3 combo values against their options, so the loader itself must say it
    msg = combo_error(client, inpaint_prompt("diffusers/flux-dev-not-fill", name))
    assert ("a FluxFillPipeline folder; got a FluxPipeline folder ('flux-dev-not-fill')" in msg
            or "Value not in list: model: 'diffusers/flux-dev-not-fill' not in" in msg), msg
    assert comfy_server.alive()


def test_unknown_setting_value_is_a_clear_error(client, tiny_flux, example):
    name, _, _ = example
    msg = combo_error(client, inpaint_prompt(tiny_flux["choice_diffusers"], name, loader_kw={"offload": "gpu"}))
    assert ("offload one of auto, none, model, sequential" in msg
            or "Value not in list: offload: 'gpu' not in ['auto', 'none', 'model', 'sequential']" in msg), msg


def test_a_seed_of_the_full_64_bit_range_is_accepted(client, tiny_flux, example):
    name, _, _ = example
    entry = client.run(inpaint_prompt(tiny_flux["choice_diffusers"], name, steps=1, seed=2**64 - 1))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
