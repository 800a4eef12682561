"""FastComposer nodes through a real ComfyUI server (HTTP API + websocket), on the tiny official-layout checkpoint.

alpha 1 equals plain diffusers' StableDiffusionPipeline on the prompt without markers (saved PNG vs reference, ±1 for
SaveImage's truncation); a fused run with masks from the background remover; progress each step and Stop; every
bad input a clear error with the server alive."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import real_weights
from tests.harness import tiny_fastcomposer as tf
from tests.harness.comfy_server import ComfyClient

SIZE = 64
PROMPT = "a man <subject> and a woman <subject> at the beach"


@pytest.fixture(scope="module")
def tiny(comfy_base, tmp_path_factory):
    """The tiny checkpoint (and its size sidecar) in the server's models/fastcomposer, plus a non-FastComposer file."""
    src = tf.shared_folder(tmp_path_factory.getbasetemp())
    folder = comfy_base / "models" / "fastcomposer"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = src["checkpoint"]
    for f in (ckpt, tf.config_sidecar_of(ckpt)):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    tf.write_other_model(folder / "sd15-not-fastcomposer.bin")
    u2 = comfy_base / "models" / "background_removal" / "u2netp.onnx"
    if not u2.exists():
        u2.symlink_to(real_weights.u2netp_onnx())
    return {**src, "choice": ckpt.name}


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures(client):
    rng = np.random.default_rng(12)
    a = rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)
    return {"a": client.upload_image(_png(a), "atelier_fc_subject_a.png"),
            "b": client.upload_image(_png(b), "atelier_fc_subject_b.png"),
            "dot": client.upload_image(_png(np.full((1, 1, 3), 128, np.uint8)), "atelier_fc_dot.png"),
            "arrays": (a, b)}


def graph(model: str, pictures: dict, *, prompt: str = PROMPT, names=("a", "b"), alpha: float = 0.2,
          steps: int = 2, seed: int = 5, size: int = SIZE, masks: bool = False) -> dict:
    g = {"1": {"class_type": "AtelierFastComposerLoader", "inputs": {
        "model": model, "offload": "auto", "attention_slicing": False, "vae_slicing": False, "dtype": "auto"}}}
    refs = []
    for i, name in enumerate(names):
        g[f"1{i}"] = {"class_type": "LoadImage", "inputs": {"image": pictures[name]}}
        refs.append([f"1{i}", 0])
    subjects = refs[0]
    if len(refs) == 2:
        g["20"] = {"class_type": "ImageBatch", "inputs": {"image1": refs[0], "image2": refs[1]}}
        subjects = ["20", 0]
    inputs = {"composer": ["1", 0], "prompt": prompt, "subjects": subjects, "negative_prompt": "", "alpha": alpha,
              "steps": steps, "guidance": 5.0, "seed": seed, "width": size, "height": size}
    if masks:
        g["30"] = {"class_type": "AtelierBackgroundRemoverLoader",
                   "inputs": {"model": "u2netp.onnx", "dtype": "auto", "device": "auto"}}
        g["31"] = {"class_type": "AtelierRemoveBackground", "inputs": {
            "remover": ["30", 0], "image": subjects, "resolution": 0, "mask_threshold": 0.0}}
        inputs["subjects"], inputs["subject_masks"] = ["31", 0], ["31", 1]
    g["2"] = {"class_type": "AtelierFastComposer", "inputs": inputs}
    g["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "atelier_test/fc"}}
    return g


def test_schema_matches_the_public_contract(client, tiny):
    loader = client.object_info("AtelierFastComposerLoader")
    assert loader["category"] == "atelier/compose" and loader["output"] == ["ATELIER_FASTCOMPOSER"]
    assert loader["input_order"]["required"] == ["model", "offload", "attention_slicing", "vae_slicing", "dtype"]
    assert loader["input_order"]["optional"] == ["base"]
    assert tiny["choice"] in loader["input"]["required"]["model"][1]["options"]
    node = client.object_info("AtelierFastComposer")
    assert node["category"] == "atelier/compose" and node["output"] == ["IMAGE"]
    assert node["input_order"]["required"] == ["composer", "prompt", "subjects", "negative_prompt", "alpha", "steps",
                                               "guidance", "seed", "width", "height"]
    assert node["input_order"]["optional"] == ["subject_masks"]
    assert node["input"]["required"]["alpha"][1]["default"] == 0.2
    for info in (loader, node):
        for group in info["input"].values():
            for name, spec in group.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), name


def test_alpha_one_equals_plain_sd_and_reports_each_step(client, tiny, pictures, ws):
    entry = client.run(graph(tiny["choice"], pictures, alpha=1.0, steps=2, seed=5))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    got = client.images(entry, "3")[0].astype(np.int16)
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "2"]
    assert values[-2:] == [1, 2], values
    ref = tf.reference_pipeline(tiny["reference_sd"])
    with torch.inference_mode():
        out = ref(prompt=PROMPT.replace("<subject>", ""), negative_prompt="", guidance_scale=5.0,
                  num_inference_steps=2, width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(5),
                  output_type="pt").images[0]
    want = np.clip(255.0 * out.permute(1, 2, 0).numpy(), 0, 255).astype(np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_fused_run_with_background_remover_masks(client, tiny, pictures):
    plain = client.run(graph(tiny["choice"], pictures, alpha=1.0, seed=9))
    fused = client.run(graph(tiny["choice"], pictures, alpha=0.0, seed=9, masks=True))
    assert ComfyClient.succeeded(fused), ComfyClient.error_message(fused)
    a, b = client.images(plain, "3")[0], client.images(fused, "3")[0]
    assert a.shape == b.shape == (SIZE, SIZE, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0, "fusing the subjects must change the picture"


@pytest.mark.parametrize("case, words", [
    ("markers", ["2 markers and 1 pictures"]),
    ("start", ["start of the prompt"]),
    ("long", ["77", "tokens"]),
    ("dot", ["1×1"]),
    ("other", ["unexpected", "model.*", "first_stage_model.*", "missing", "postfuse_module."]),
])
def test_bad_inputs_fail_clearly(client, tiny, pictures, comfy_server, case, words):
    model, kw = tiny["choice"], {}
    if case == "markers":
        kw = {"names": ("a",)}
    elif case == "start":
        kw = {"prompt": "<subject> and a woman <subject>"}
    elif case == "long":
        kw = {"prompt": "a man <subject> and a woman <subject> " + "very " * 80}
    elif case == "dot":
        kw = {"names": ("dot",), "prompt": "a man <subject>"}
    elif case == "other":
        model = "sd15-not-fastcomposer.bin"
    entry = client.run(graph(model, pictures, **kw))
    msg = ComfyClient.error_message(entry)
    assert msg is not None and all(w in msg for w in words), msg
    assert comfy_server.alive()


def test_stop_mid_run(client, tiny, pictures, ws, comfy_server):
    pid = client.queue(graph(tiny["choice"], pictures, steps=200, size=256, seed=2))
    first = ws.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == "2", timeout=180)
    assert first["data"]["max"] == 200
    client.interrupt()
    entry = client.wait(pid, timeout=180)
    assert ComfyClient.interrupted(entry)
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "2"]
    assert max(values) < 200, "the run finished instead of stopping"
    assert comfy_server.alive()


def test_multi_subject_workflow_runs(client, tiny):
    """The shipped API twin with the artist's edits (tiny model, 2 steps, 64²): two photos through the background
    remover into FastComposer; the picture differs from plain SD1.5 (alpha 1) with the same seed."""
    from pathlib import Path

    from tests.harness.comfy_server import load_api_workflow
    from tests.harness.workflow_inputs import edits_for, input_files

    api = load_api_workflow(Path(__file__).resolve().parents[2] / "workflows" / "api" / "multi_subject.json")
    files = input_files()
    for name in (api["2"]["inputs"]["image"], api["3"]["inputs"]["image"]):
        client.upload_image(files[name], name)
    assert api["7"]["inputs"]["model"] == "pytorch_model.bin" and api["8"]["inputs"]["subject_masks"] == ["6", 1]
    edits = edits_for("multi_subject.json", {"AtelierFastComposerLoader": tiny["choice"]})
    for node in api.values():
        node["inputs"].update(edits.get(node["class_type"], {}))
    entry = client.run(api)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    (fused,) = client.images(entry, "9")
    api["8"]["inputs"]["alpha"] = 1.0
    plain = client.run(api)
    assert ComfyClient.succeeded(plain), ComfyClient.error_message(plain)
    assert fused.shape == (64, 64, 3) and np.abs(fused.astype(int) - client.images(plain, "9")[0].astype(int)).max() > 0
