"""Realtime character nodes through a real ComfyUI server: loader + Animate Character on the tiny SD1.5 models
(ControlNet, IP-Adapter, LCM LoRA, TAESD) → frames and a report; progress per frame; bad inputs are clear errors
and the server stays up."""

from __future__ import annotations

import json

import pytest

from tests.harness.comfy_server import PromptRejected, assert_progress_each_step
from tests.harness.workflow_inputs import place_character_models

SIZE = 64


@pytest.fixture(scope="module")
def choices(comfy_base, tmp_path_factory):
    return place_character_models(comfy_base / "models", tmp_path_factory.getbasetemp())


def graph(choices, frames=3, steps=2, controlnet=None, vae="full", keyframes="", reuse=0.5, batch=1):
    return {
        "1": {"class_type": "AtelierCharacterLoader", "inputs": {
            "model": choices["model"], "controlnet": controlnet or choices["controlnet"],
            "ip_adapter": choices["ip_adapter"], "clip_vision": "auto", "fast_lora": choices["fast_lora"],
            "vae": vae, "offload": "auto", "attention_slicing": False, "vae_slicing": False, "dtype": "auto",
            "compile": False}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": frames,
                                                     "color": 0x3366CC}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 48, "batch_size": 1, "color": 0xCC3322}},
        "4": {"class_type": "AtelierAnimateCharacter", "inputs": {
            "character": ["1", 0], "pose_image": ["2", 0], "reference": ["3", 0], "prompt": "a red knight",
            "keyframe_prompts": keyframes, "steps": steps, "guidance": 1.0, "controlnet_scale": 1.0,
            "ip_adapter_scale": 0.6, "reuse": reuse, "reset_every": 0, "batch": batch, "seed": 3}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def test_schema(client):
    info = client.object_info("AtelierAnimateCharacter")
    assert info["category"] == "atelier/animate"
    names = list(info["input"]["required"]) + list(info["input"].get("optional", {}))
    for n in ("character", "pose_image", "reference", "prompt", "keyframe_prompts", "steps", "guidance",
              "controlnet_scale", "ip_adapter_scale", "reuse", "reset_every", "batch", "seed"):
        assert n in names
    assert info["input"]["required"]["steps"][1]["min"] == 1 and info["input"]["required"]["steps"][1]["max"] == 30
    loader = client.object_info("AtelierCharacterLoader")
    assert list(loader["input"]["required"])[:6] == ["model", "controlnet", "ip_adapter", "clip_vision", "fast_lora",
                                                     "vae"]


def test_animate_runs_and_reports(client, ws, choices):
    pid = client.queue(graph(choices, frames=3, vae=choices["vae"], keyframes='{"2": "jumping"}'))
    entry = client.wait(pid, timeout=600)
    assert client.succeeded(entry), client.error_message(entry)
    frames = client.images(entry, "5")
    assert len(frames) == 3 and frames[0].shape == (SIZE, SIZE, 3)
    text = entry["outputs"]["4"]["text"][0]
    assert text.startswith("3 frames") and "0 OOM events" in text
    loader_text = entry["outputs"]["1"]["text"][0]
    assert "IP-Adapter" in loader_text and "LCMScheduler" in loader_text and "TAESD" in loader_text
    progress = [m["data"] for m in ws.messages("progress") if m["data"].get("node") == "4"]
    assert_progress_each_step([p["value"] for p in progress], 3)  # one step per frame
    assert progress[-1]["max"] == 3


def test_report_output_is_json(client, choices):
    g = graph(choices, frames=2)
    g["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    entry = client.run(g, timeout=600)
    assert client.succeeded(entry), client.error_message(entry)
    raw = entry["outputs"]["6"]["text"][0]
    report = json.loads(raw)
    assert report["frames"] == 2 and len(report["per_frame"]) == 2
    assert [r["mode"] for r in report["per_frame"]] == ["fresh", "reuse"]
    assert report["per_frame"][1]["delta_e"] is not None and report["fps"] > 0


def test_bad_inputs_are_clear_and_server_stays_up(client, choices):
    with pytest.raises(PromptRejected):
        client.queue(graph(choices, steps=0))
    entry = client.run(graph(choices, controlnet=choices["controlnet_sdxl"]), timeout=300)
    assert not client.succeeded(entry) and "SDXL" in client.error_message(entry)
    entry = client.run(graph(choices, frames=2, keyframes='{"5": "late"}'), timeout=300)
    assert "keyframe at frame 5" in client.error_message(entry)
    assert client.system_stats()["system"]


def _png(seed: int, side: int = SIZE) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_live_routes(client, choices):
    """The live panel's routes: a run configures them; frames come back; concurrent frames never queue (latest
    wins: the replaced ones are answered dropped); a bad frame is a clear 400 and the server stays up."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    entry = client.run(graph(choices, frames=1), timeout=600)  # the run the panel takes its character from
    assert client.succeeded(entry), client.error_message(entry)
    status = requests.get(client.url + "/atelier/live/status", timeout=30).json()
    assert status["ready"] and "IP-Adapter" in status["character"] and status["prompt"] == "a red knight"
    url = client.url + "/atelier/live/frame?pose=none&size=64"
    r = requests.post(url, data=_png(1), headers={"Content-Type": "image/png"}, timeout=120)
    data = r.json()
    assert r.status_code == 200 and data["image"].startswith("data:image/jpeg;base64,")
    assert data["width"] == SIZE and data["model_fps"] > 0 and data["mode"] == "fresh"

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: requests.post(url, data=_png(10 + i), timeout=300).json(), range(6)))
    done = [a for a in answers if not a.get("dropped")]
    dropped = [a for a in answers if a.get("dropped")]
    assert dropped and len(done) + len(dropped) == 6
    assert all(a["mode"] == "reuse" for a in done)  # the session carried on from the first frame
    bad = requests.post(url, data=b"nope", timeout=30)
    assert bad.status_code == 400 and "JPEG, PNG or WebP" in bad.json()["error"]
    assert requests.post(client.url + "/atelier/live/reset", timeout=30).json() == {"ok": True}
    assert client.system_stats()["system"]
