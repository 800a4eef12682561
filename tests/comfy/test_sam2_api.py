"""SAM2 nodes through a real ComfyUI server, driven only through its HTTP API and websocket.

Parity: the masks that come back (MaskToImage -> SaveImage, PNG) equal Meta's ``SAM2ImagePredictor`` run in this
process on the same random-weight checkpoint, image and prompts, exactly after 8-bit rounding. Then the schema,
batches, progress, and bad inputs (each a clear error, server alive).
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import tiny_sam2
from tests.harness.comfy_server import ComfyClient

H, W = tiny_sam2.HEIGHT, tiny_sam2.WIDTH
PT = tiny_sam2.NAME + ".pt"
ST = tiny_sam2.NAME + ".safetensors"


@pytest.fixture(scope="module")
def sam2_models(comfy_base):
    """The random SAM 2.1 tiny checkpoint (.pt and .safetensors) in the server's models/sam2."""
    return tiny_sam2.write_checkpoints(comfy_base / "models" / "sam2")


@pytest.fixture(scope="module")
def example(client):
    rgb = tiny_sam2.example_image()
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return client.upload_image(buf.getvalue(), "atelier_sam2_example.png"), rgb


@pytest.fixture(scope="module")
def reference(sam2_models, example):
    """Meta's predictor (build_sam2 + SAM2ImagePredictor) in this process, holding the example image as LoadImage
    hands it to the node (uint8 / 255)."""
    return tiny_sam2.reference(sam2_models["pt"]).set_image(example[1])


def ref_mask(ref: tiny_sam2.Reference, points=(), negative=(), box=None, multimask=False) -> np.ndarray:
    m = ref.mask(points, negative, box, multimask)
    return np.where(m, 255, 0).astype(np.uint8)  # MaskToImage -> SaveImage of a 0/1 mask


def segment_prompt(image_name: str, *, points="", negative_points="", boxes="", multimask=False, model=PT,
                   dtype="auto", batch: int = 1) -> dict:
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "AtelierSAM2Loader", "inputs": {"model": model, "dtype": dtype}},
        "3": {"class_type": "AtelierSAM2Segment", "inputs": {
            "sam2": ["2", 0], "image": ["1", 0] if batch == 1 else ["6", 0], "points": points,
            "negative_points": negative_points, "boxes": boxes, "multimask": multimask}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "atelier_sam2"}},
    }
    if batch > 1:
        prompt["6"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": batch}}
    return prompt


def saved_masks(client: ComfyClient, entry: dict) -> list[np.ndarray]:
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return [img[..., 0] for img in client.images(entry, "5")]


def run_error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    return msg


# ------------------------------------------------------------------------------------------------ schema


def test_schema_matches_the_public_contract(client, sam2_models):
    loader = client.object_info("AtelierSAM2Loader")
    assert loader["category"] == "atelier/mask" and loader["output"] == ["ATELIER_SAM2"]
    assert loader["input_order"]["required"] == ["model", "dtype"]
    req = loader["input"]["required"]
    assert PT in req["model"][1]["options"] and ST in req["model"][1]["options"]
    assert req["dtype"][1]["options"] == ["auto", "bf16", "fp16", "fp32"]

    seg = client.object_info("AtelierSAM2Segment")
    assert seg["category"] == "atelier/mask" and seg["output"] == ["MASK"]
    assert seg["input_order"]["required"] == ["sam2", "image", "points", "negative_points", "boxes", "multimask"]
    assert seg["input"]["required"]["sam2"][0] == "ATELIER_SAM2"
    for info in (loader, seg):
        for group in info["input"].values():
            for name, spec in group.items():
                assert spec[1].get("tooltip"), f"{info['name']} input {name} has no tooltip"


# ------------------------------------------------------------------------------------------------ parity


def test_masks_equal_the_predictor_one_per_box(client, sam2_models, example, reference, ws):
    name, _ = example
    points, negative = [(20, 22)], [(52, 8)]
    boxes = [[6, 8, 34, 36], [36, 24, 62, 46]]
    entry = client.run(segment_prompt(name, points=json.dumps([{"x": x, "y": y} for x, y in points]),
                                      negative_points=json.dumps([{"x": x, "y": y} for x, y in negative]),
                                      boxes=json.dumps(boxes)))
    got = saved_masks(client, entry)
    assert len(got) == 2 and all(g.shape == (H, W) for g in got)
    for g, box in zip(got, boxes, strict=True):
        want = ref_mask(reference, points, negative, box)
        assert np.array_equal(g, want), f"{int((g != want).sum())} pixels differ"
    assert not np.array_equal(got[0], got[1])
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "3"]
    assert values == [1, 2]  # one step per object


def test_after_unload_points_only_multimask_reloads_and_matches(client, sam2_models, example, reference,
                                                                server_log):
    name, _ = example
    was_loaded = "Atelier: loading SAM 2.1 tiny" in server_log()
    mark = len(server_log())
    client.free(unload_models=True, free_memory=False)  # what the Unload models button sends
    deadline = time.time() + 30
    while was_loaded and "released a loaded model (SAM2Spec" not in server_log(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert not was_loaded or "released a loaded model (SAM2Spec" in server_log(mark)
    entry = client.run(segment_prompt(name, points="[[20, 22], [24, 20]]", negative_points="[[60, 4]]",
                                      multimask=True))
    [got] = saved_masks(client, entry)
    assert "Atelier: loading SAM 2.1 tiny" in server_log(mark), "the run after /free did not reload the model"
    assert np.array_equal(got, ref_mask(reference, [(20, 22), (24, 20)], [(60, 4)], multimask=True))


def test_image_batch_gives_objects_per_image_in_order(client, sam2_models, example, reference):
    name, _ = example
    boxes = [[6, 8, 34, 36], [36, 24, 62, 46]]
    got = saved_masks(client, client.run(segment_prompt(name, boxes=json.dumps(boxes), batch=2)))
    want = [ref_mask(reference, box=b) for b in boxes]
    assert len(got) == 4
    for k, g in enumerate(got):  # image 0: objects 0, 1; image 1: objects 0, 1
        assert np.array_equal(g, want[k % 2])


def test_safetensors_checkpoint_loads_and_reports_what_it_is(client, sam2_models, example):
    # the segment node refuses the point (outside the image) after the loader ran: no embedding is computed
    entry = client.run(segment_prompt(example[0], points="[[99, 1]]", model=ST, dtype="fp32"))
    assert "inside the 64×48 image" in (ComfyClient.error_message(entry) or "")
    text = json.dumps(entry["outputs"]["2"])  # the loader's text on the node
    assert ST in text and "SAM 2.1 tiny" in text and "fp32" in text


def test_a_file_replaced_under_the_same_name_is_read_again(client, sam2_models, example, comfy_base):
    swap = comfy_base / "models" / "sam2" / "atelier_swap.pt"
    shutil.copyfile(sam2_models["pt"], swap)
    bad_points = dict(points="[[99, 1]]", model=swap.name)  # the segment node stops before any embedding
    first = client.run(segment_prompt(example[0], **bad_points))
    assert "SAM 2.1 tiny" in json.dumps(first["outputs"]["2"])
    tiny_sam2.write_checkpoints(swap.parent, seed=1, name=swap.stem, config_name="configs/sam2/sam2_hiera_t.yaml",
                                formats=("pt",))
    second = client.run(segment_prompt(example[0], **bad_points))
    assert "SAM 2.0 tiny" in json.dumps(second["outputs"]["2"]), "the loader did not notice the new file"
    swap.unlink()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kw, needles", [
    ({"points": '[{"x": 70, "y": 10}]'}, ["inside the 64×48 image", "point 0 at (70, 10)"]),
    ({"boxes": "[[0, 0, 64, 50]]"}, ["inside the 64×48 image", "box 0"]),
    ({}, ["at least one point", "no points and no boxes"]),
    ({"negative_points": "[[3, 3]]"}, ["only negative points"]),
    ({"points": '[{"x": 10, "y": 20}'}, ["not valid JSON"]),
    ({"boxes": "[[30, 5, 10, 40]]"}, ["x1 > x0"]),
])
def test_bad_prompts_are_clear_errors_and_the_server_lives(client, sam2_models, example, comfy_server, kw,
                                                           needles):
    name, _ = example
    msg = run_error(client, segment_prompt(name, **kw))
    for needle in needles:
        assert needle in msg, msg
    assert comfy_server.alive()


def test_a_file_that_is_not_sam2_is_a_clear_error(client, sam2_models, example, comfy_base, comfy_server):
    torch.save({"model": {"backbone.weight": torch.zeros(4, 3)}}, comfy_base / "models" / "sam2" / "not_sam2.pt")
    msg = run_error(client, segment_prompt(example[0], points="[[5, 5]]", model="not_sam2.pt"))
    assert "SAM 2 or SAM 2.1 checkpoint" in msg and "backbone.weight" in msg
    assert comfy_server.alive()
