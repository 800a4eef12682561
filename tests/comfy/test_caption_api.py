"""The VLM captioner through a real ComfyUI server, driven only through its HTTP API and websocket.

Parity: AtelierCaption's prompt equals plain ``model.generate`` (greedy) decoded on the same tiny random Qwen2-VL /
Qwen2.5-VL folders and the same image. Then the analysis JSON, batches as output lists, Stop mid-generation,
/free, and a folder without weights.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import tiny_vlm
from tests.harness.comfy_server import ComfyClient

KEYS = ["scene", "lighting", "light_direction", "palette", "mood", "camera", "placement", "found"]
BROKEN = "tiny-vlm-no-weights"


def choice(kind: str) -> str:
    return f"tiny-{kind}"


@pytest.fixture(scope="module")
def tiny_vlms(comfy_base) -> dict[str, Path]:
    """Tiny random Qwen2-VL and Qwen2.5-VL folders in the server's models/LLM (listed on the next /object_info)."""
    llm = comfy_base / "models" / "LLM"
    return {kind: tiny_vlm.build(kind, llm / choice(kind)) for kind in tiny_vlm.KINDS}


@pytest.fixture(scope="module")
def broken_vlm(tiny_vlms, comfy_base) -> Path:
    """A folder with everything but the weights: a download that stopped early."""
    folder = comfy_base / "models" / "LLM" / BROKEN
    if not folder.exists():
        shutil.copytree(tiny_vlms["qwen2_vl"], folder)
        tiny_vlm.strip_weights(folder)
    return folder


def png(seed: int, w: int = 60, h: int = 40) -> tuple[bytes, np.ndarray]:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue(), rgb


@pytest.fixture(scope="module")
def pictures(client) -> list[tuple[str, np.ndarray]]:
    out = []
    for seed in (1, 2):
        data, rgb = png(seed)
        out.append((client.upload_image(data, f"atelier_caption_{seed}.png"), rgb))
    return out


def caption_prompt(model: str, image_name: str, *, task: str = "caption", max_new_tokens: int = 12,
                   instruction: str = "", language: str = "en", seed: int = 0, temperature: float = 0.0,
                   second_image: str | None = None) -> dict:
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "AtelierVLMLoader", "inputs": {"model": model, "quantization": "none",
                                                            "offload": "auto", "dtype": "auto"}},
        "3": {"class_type": "AtelierCaption", "inputs": {
            "vlm": ["2", 0], "image": ["1", 0], "task": task, "instruction": instruction, "language": language,
            "max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    if second_image:
        prompt["6"] = {"class_type": "LoadImage", "inputs": {"image": second_image}}
        prompt["7"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["6", 0]}}
        prompt["3"]["inputs"]["image"] = ["7", 0]
    return prompt


def texts(entry: dict, node: str) -> list[str]:
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return list(entry["outputs"][node]["text"])


_REFERENCES: dict = {}


def reference(folder: Path, kind: str, rgb: np.ndarray, task: str, max_new_tokens: int) -> str:
    """Plain transformers: the model class, AutoProcessor, the folder's chat template, greedy generate."""
    import torch
    import transformers

    from atelier.prompts import build_messages

    if kind not in _REFERENCES:
        model = getattr(transformers, tiny_vlm.CLASSES[kind][0]).from_pretrained(folder, local_files_only=True)
        _REFERENCES[kind] = (model.eval(), transformers.AutoProcessor.from_pretrained(folder, local_files_only=True))
    model, processor = _REFERENCES[kind]
    text = processor.apply_chat_template(build_messages(task, "en"), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.fromarray(rgb)], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


# ------------------------------------------------------------------------------------------------ schema


def test_schema_matches_the_public_contract(client, tiny_vlms, broken_vlm):
    info = client.object_info("AtelierVLMLoader")
    assert info["category"] == "atelier/caption" and info["output"] == ["ATELIER_VLM"]
    assert info["input_order"]["required"] == ["model", "quantization", "offload", "dtype"]
    req = info["input"]["required"]
    assert req["quantization"][1]["options"] == ["none", "int8", "nf4", "fp8"]
    assert req["offload"][1]["options"] == ["auto", "none", "model"]
    assert req["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    models = req["model"][1]["options"]
    assert choice("qwen2_vl") in models and choice("qwen2_5_vl") in models
    assert BROKEN in models  # listed: picking it explains what is missing

    cap = client.object_info("AtelierCaption")
    assert cap["category"] == "atelier/caption"
    assert cap["input_order"]["required"] == ["vlm", "image", "task", "instruction", "language", "max_new_tokens",
                                              "seed", "temperature"]
    r = cap["input"]["required"]
    assert r["task"][1]["options"] == ["background_analysis", "caption", "inpaint_prompt", "custom"]
    assert r["language"][1]["options"] == ["en", "ko"]
    assert r["temperature"][1]["default"] == 0.0 and r["vlm"][0] == "ATELIER_VLM"
    assert cap["output"] == ["STRING", "STRING"] and cap["output_name"] == ["prompt", "analysis"]
    assert cap["output_is_list"] == [True, True]
    for node in (info, cap):
        for group in node["input"].values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{name} has no tooltip"


# ---------------------------------------------------------------------------- parity, Stop, lists, /free


def check_caption_parity(client, tiny_vlms, pictures, kind):
    from atelier.analysis import clean_reply

    name, rgb = pictures[0]
    entry = client.run(caption_prompt(choice(kind), name, max_new_tokens=16))
    [got] = texts(entry, "4")
    want = reference(tiny_vlms[kind], kind, rgb, "caption", 16)
    assert got == clean_reply(want) and got == want.strip(), (got, want)
    assert len(got) > 5
    [shown] = entry["outputs"]["3"]["text"]  # the text on the node
    assert shown == got


# the tests run in file order: grouped by model so the server reloads as little as possible (one VLM at a time)


def test_qwen2_vl_caption_equals_model_generate(client, tiny_vlms, pictures):
    check_caption_parity(client, tiny_vlms, pictures, "qwen2_vl")


def test_stop_mid_generation_ends_within_a_token_or_two_then_the_next_prompt_runs(client, tiny_vlms, pictures,
                                                                                   ws, comfy_server):
    name, _ = pictures[0]
    many = 4000
    pid = client.queue(caption_prompt(choice("qwen2_vl"), name, max_new_tokens=many, seed=1))
    first = ws.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == "3"
                        and m["data"].get("prompt_id") == pid, timeout=120)
    assert first["data"]["max"] == many
    client.interrupt()
    t0 = time.monotonic()
    entry = client.wait(pid, timeout=120)
    assert ComfyClient.interrupted(entry)
    values = [m["data"]["value"] for m in ws.messages("progress")
              if m["data"].get("node") == "3" and m["data"].get("prompt_id") == pid]
    assert max(values) < many // 20, f"generation went on to {max(values)} of {many} tokens"
    assert time.monotonic() - t0 < 30
    entry = client.run(caption_prompt(choice("qwen2_vl"), name, max_new_tokens=4, seed=2))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert comfy_server.alive()


def test_custom_without_instruction_is_a_clear_error(client, tiny_vlms, pictures):
    name, _ = pictures[0]
    entry = client.run(caption_prompt(choice("qwen2_vl"), name, task="custom", instruction="  "))
    assert "an instruction for task 'custom'" in (ComfyClient.error_message(entry) or "")
    entry = client.run(caption_prompt(choice("qwen2_vl"), name, task="custom", instruction="What is it?",
                                      language="ko", max_new_tokens=3))
    assert len(texts(entry, "4")) == 1


def test_qwen2_5_vl_caption_equals_model_generate(client, tiny_vlms, pictures):
    check_caption_parity(client, tiny_vlms, pictures, "qwen2_5_vl")


def test_background_analysis_gives_json_with_every_key(client, tiny_vlms, pictures):
    from atelier.analysis import parse_analysis
    from atelier.prompts import analysis_prompt

    name, rgb = pictures[0]
    entry = client.run(caption_prompt(choice("qwen2_5_vl"), name, task="background_analysis", max_new_tokens=16))
    [prompt], [analysis] = texts(entry, "4"), texts(entry, "5")
    data = json.loads(analysis)
    assert list(data) == KEYS
    assert set(data["placement"]) == {"x", "y", "w", "h"} and all(0 <= v <= 1 for v in data["placement"].values())
    want = reference(tiny_vlms["qwen2_5_vl"], "qwen2_5_vl", rgb, "background_analysis", 16)
    assert data == parse_analysis(want)
    assert prompt == analysis_prompt(parse_analysis(want), fallback=want)


def test_a_batch_of_two_gives_a_list_of_two(client, tiny_vlms, pictures):
    (a, rgb_a), (b, rgb_b) = pictures
    entry = client.run(caption_prompt(choice("qwen2_5_vl"), a, second_image=b, max_new_tokens=8))
    prompts, analyses = texts(entry, "4"), texts(entry, "5")
    assert len(prompts) == 2 and len(analyses) == 2
    assert prompts == [reference(tiny_vlms["qwen2_5_vl"], "qwen2_5_vl", rgb, "caption", 8).strip()
                       for rgb in (rgb_a, rgb_b)]
    assert prompts[0] != prompts[1]
    assert all(list(json.loads(x)) == KEYS for x in analyses)
    [shown] = entry["outputs"]["3"]["text"]
    assert shown.startswith("[1/2] ") and "\n\n[2/2] " in shown


def _loads(log: str) -> int:
    return len(re.findall(r"Atelier: loading Qwen2(?:\.5)?-VL", log))


def test_free_releases_the_vlm_and_the_next_run_reloads(client, tiny_vlms, pictures, server_log):
    name, _ = pictures[0]
    prompt = caption_prompt(choice("qwen2_5_vl"), name, max_new_tokens=3, seed=11)
    assert ComfyClient.succeeded(client.run(prompt))
    before = _loads(server_log())
    prompt["3"]["inputs"]["seed"] = 12
    assert ComfyClient.succeeded(client.run(prompt))
    assert _loads(server_log()) == before, "a cached VLM was loaded again"

    mark = len(server_log())
    client.free(unload_models=True, free_memory=False)  # what the Unload models button sends
    deadline = time.time() + 30
    while "Atelier: released a loaded model" not in server_log(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert "Atelier: released a loaded model" in server_log(mark)
    prompt["3"]["inputs"]["seed"] = 13
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert _loads(server_log()) == before + 1, "the run after /free did not reload the VLM"


# ------------------------------------------------------------------------------------------------ bad input


def test_a_folder_without_weights_is_a_clear_error(client, broken_vlm, pictures, comfy_server):
    name, _ = pictures[0]
    entry = client.run(caption_prompt(BROKEN, name))
    msg = ComfyClient.error_message(entry)
    assert msg is not None and ComfyClient.error_details(entry)["node_type"] == "AtelierVLMLoader"
    expected, got = msg.split("; got ", 1)
    assert "config.json" in expected and "model.safetensors" in expected and "preprocessor_config.json" in expected
    assert f"'{BROKEN}' without model.safetensors" in got and "preprocessor_config.json" not in got
    assert "models/LLM" in msg
    assert comfy_server.alive()


