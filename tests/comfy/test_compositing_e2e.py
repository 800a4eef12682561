"""The object-compositing workflows end to end through a real ComfyUI server, as shipped in workflows/api/.

Every stage runs a real model at toy size: a tiny random Qwen2.5-VL (captioner), the real u²-net-p ONNX weights
(background removal), a tiny random SAM 2.1 (the SAM2 variant) and the tiny random FLUX.1 Fill. The files name the
real models (Qwen2.5-VL-3B-Instruct, FLUX.1-Fill-dev, sam2.1_hiera_large.pt: gigabytes); the tests swap in the tiny
ones and cut steps / tokens, and add probe nodes (Preview as Text, MaskToImage -> SaveImage) to read what flows
between the stages. Checked: the run succeeds; the object lands on the rectangle the VLM's analysis asks for
(x = y = -1); FLUX Fill keeps every pixel outside the inpaint mask; FLUX Fill got exactly the captioner's prompt.
Then the per-stage workflows (caption_only, remove_background, sam2_points) run as shipped, models swapped.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import real_weights as rw
from tests.harness import tiny_sam2, tiny_vlm
from tests.harness.comfy_server import ComfyClient, load_api_workflow

API_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"

BW, BH = 160, 128  # background size: small for the tiny FLUX, tall enough that placements differ by pixels
VLM_CHOICE = "tiny-qwen2_5_vl"  # the folder test_caption_api builds too (reused when it exists)
SAM2_CHOICE = tiny_sam2.NAME + ".pt"
U2NETP = "u2netp.onnx"  # the workflows' own choice: the real file is in the test models folder, no swap needed
SAM2_BOX = [6, 8, 34, 36]  # around the yellow disc of tiny_sam2.example_image() (64×48)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(comfy_base, tiny_flux) -> dict:
    """Every model the workflows load, at toy size (u²-net-p: the real file), in the server's models/ tree."""
    root = comfy_base / "models"
    tiny_vlm.build("qwen2_5_vl", root / "LLM" / VLM_CHOICE)
    u2netp = rw.u2netp_onnx()
    link = root / "background_removal" / U2NETP
    if not link.exists():
        link.symlink_to(u2netp)
    if not (root / "sam2" / SAM2_CHOICE).exists():
        tiny_sam2.write_checkpoints(root / "sam2", formats=("pt",))
    return {"flux": tiny_flux["choice_diffusers"], "u2netp": u2netp}


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def background() -> np.ndarray:
    """A floor-and-wall scene with noise (what the VLM looks at and the object is pasted into)."""
    yy, xx = np.mgrid[0:BH, 0:BW].astype(np.float64)
    rgb = np.stack([90 + 100 * yy / BH, 120 + 40 * xx / BW, 150 - 60 * yy / BH], axis=-1)
    rgb[yy > BH * 0.6] *= 0.7  # the floor
    rgb += np.random.default_rng(5).normal(0, 6, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pictures(client) -> dict:
    """Uploaded under the names the workflows carry; returns the arrays LoadImage will read."""
    obj, _ = rw.synthetic_object()  # a vase on a studio backdrop: u²-net-p cuts it out cleanly
    out = {"atelier_background.png": background(), "atelier_object.png": obj,
           "atelier_object_photo.png": tiny_sam2.example_image()}
    for name, rgb in out.items():
        assert client.upload_image(png(rgb), name) == name
    return out


# ---------------------------------------------------------------------------------------------- helpers


def node(api: dict, class_type: str) -> str:
    found = [k for k, n in api.items() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type} node, found {found}"
    return found[0]


def source(api: dict, node_id: str, input_name: str) -> str:
    ref = api[node_id]["inputs"][input_name]
    assert isinstance(ref, list), f"{api[node_id]['class_type']}.{input_name} is not connected"
    return ref[0]


def shrink_models(api: dict, models: dict, caption_seed: int) -> None:
    """Swap the real models the file names for the tiny ones (and cut the work to what a test needs).

    ``caption_seed``: one per test. Greedy decoding ignores it, but it keeps ComfyUI from reusing another test's
    cached caption: a cached node (and the Preview as Text probes after it) reports no text in /history."""
    vlm, cap = node(api, "AtelierVLMLoader"), node(api, "AtelierCaption")
    fill_loader, fill = node(api, "AtelierFluxFillLoader"), node(api, "AtelierFluxFill")
    assert api[vlm]["inputs"]["model"] == "Qwen2.5-VL-3B-Instruct"
    assert api[fill_loader]["inputs"]["model"] == "diffusers/FLUX.1-Fill-dev"
    api[vlm]["inputs"]["model"] = VLM_CHOICE
    # a real analysis needs ~300 tokens; the tiny model's reply is noise, parsed to the defaults either way
    api[cap]["inputs"]["max_new_tokens"] = 12
    api[cap]["inputs"]["seed"] = caption_seed
    api[fill_loader]["inputs"]["model"] = models["flux"]
    api[fill]["inputs"]["steps"] = 2  # the tiny FLUX's pixels are noise: 2 steps prove the wiring


def add_probes(api: dict) -> dict:
    """Preview-as-Text of both caption outputs and the placement's masks as PNGs; returns their node ids."""
    cap, place = node(api, "AtelierCaption"), node(api, "AtelierPlacementMask")
    probes = {"prompt": "100", "analysis": "101", "object_mask": "103", "inpaint_mask": "105"}
    api["100"] = {"class_type": "PreviewAny", "inputs": {"source": [cap, 0]}}
    api["101"] = {"class_type": "PreviewAny", "inputs": {"source": [cap, 1]}}
    api["102"] = {"class_type": "MaskToImage", "inputs": {"mask": [place, 2]}}
    api["103"] = {"class_type": "SaveImage", "inputs": {"images": ["102", 0], "filename_prefix": "e2e_object"}}
    api["104"] = {"class_type": "MaskToImage", "inputs": {"mask": [place, 1]}}
    api["105"] = {"class_type": "SaveImage", "inputs": {"images": ["104", 0], "filename_prefix": "e2e_inpaint"}}
    return probes


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    assert ys.size, "empty mask"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def expected_rect(analysis: str, obj_box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """Where x = y = -1 with anchor bottom must put the object: centred on the analysis' placement region,
    standing on its bottom edge, height = scale × background height, the object's aspect kept."""
    region = json.loads(analysis)["placement"]
    cx, ground = region["x"] + region["w"] / 2, region["y"] + region["h"]
    x0, y0, x1, y1 = obj_box
    height = max(1, round(scale * BH))
    width = max(1, round((x1 - x0) * height / (y1 - y0)))
    left, top = round(cx * BW - width / 2), round(ground * BH - height)
    return left, top, left + width, top + height


def run_ok(client: ComfyClient, api: dict) -> dict:
    entry = client.run(api, timeout=240)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return entry


def check_run(client, api, entry, probes, obj_box, server_log, mark) -> tuple[np.ndarray, str]:
    """The assertions both variants share; returns (FLUX Fill's saved output, the captioner's prompt)."""
    cap, place = node(api, "AtelierCaption"), node(api, "AtelierPlacementMask")
    fill, preview = node(api, "AtelierFluxFill"), node(api, "PreviewImage")
    [save] = [k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [fill, 0]]
    assert api[preview]["inputs"]["images"] == [place, 0]  # the preview shows the composite
    [prompt] = entry["outputs"][probes["prompt"]]["text"]
    [analysis] = entry["outputs"][probes["analysis"]]["text"]
    assert entry["outputs"][cap]["text"] == [f"{prompt}\n\n{analysis}"]  # what the Caption node shows
    assert prompt.strip(), "the captioner gave FLUX Fill an empty prompt"

    # placement: x = y = -1 took the analysis' region (the log names the source), and the object is there
    assert api[place]["inputs"]["x"] == api[place]["inputs"]["y"] == -1.0
    assert api[place]["inputs"]["anchor"] == "bottom" and api[place]["inputs"]["analysis"] == [cap, 1]
    assert "bottom, analysis)" in server_log(mark), "Placement Mask did not read the analysis"
    want = expected_rect(analysis, obj_box, api[place]["inputs"]["scale"])
    placed = client.images(entry, probes["object_mask"])[0][..., 0]
    got = bbox(placed > 0)
    assert all(abs(g - w) <= 1 for g, w in zip(got, want, strict=True)), (
        f"object at {got}, the analysis asks for {want} ({analysis})")

    # FLUX Fill: every pixel outside the (binary, feather 0) inpaint mask is the composite's, and the rest changed
    composite = client.images(entry, preview)[0][..., :3]
    out = client.images(entry, save)[0][..., :3]
    inpaint = client.images(entry, probes["inpaint_mask"])[0][..., 0]
    assert set(np.unique(inpaint)) <= {0, 255}, "feather 0 should give a binary mask"
    keep = inpaint == 0
    assert out.shape == composite.shape == (BH, BW, 3)
    assert np.array_equal(out[keep], composite[keep]), "FLUX Fill changed pixels outside the inpaint mask"
    assert not np.array_equal(out[~keep], composite[~keep]), "FLUX Fill did not repaint the inpaint mask"
    # the composite itself: the scene, untouched, outside the object's rectangle (a pixel of margin for rounding)
    x0, y0, x1, y1 = want
    outside = np.ones((BH, BW), bool)
    outside[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = False
    assert np.array_equal(composite[outside], background()[outside])
    return out, prompt


# ---------------------------------------------------------------------------------------------- tests


def test_object_compositing_workflow_end_to_end(client, models, pictures, server_log):
    api = load_api_workflow(API_DIR / "object_compositing.json")
    shrink_models(api, models, caption_seed=1)
    place, cut = node(api, "AtelierPlacementMask"), node(api, "AtelierRemoveBackground")
    assert api[node(api, "AtelierBackgroundRemoverLoader")]["inputs"]["model"] == U2NETP
    assert api[node(api, "AtelierFluxFill")]["inputs"]["composite_back"] is True
    api[place]["inputs"]["feather"] = 0  # a binary inpaint mask: its 8-bit PNG says exactly where it is 0
    probes = add_probes(api)

    mark = len(server_log())
    entry = run_ok(client, api)
    # the object's bounding box as Placement Mask sees it: Remove Background's mask, recomputed in this process
    # by the same engine on the same file and picture (test_bg_remove_api proves node == engine, bit for bit)
    obj_rgb = pictures[api[source(api, cut, "image")]["inputs"]["image"]]
    _, mask = rw.engine_remove(models["u2netp"], obj_rgb)
    out, prompt = check_run(client, api, entry, probes, bbox(mask.numpy() > 0.01), server_log, mark)

    # FLUX Fill received the captioner's prompt: the same node fed that text as a typed-in prompt gives the same
    # pixels (same seed), and another prompt gives others (so the prompt does steer the tiny model)
    fill = node(api, "AtelierFluxFill")
    for nid, text in (("110", prompt), ("112", prompt + ", at night")):
        api[nid] = {"class_type": "AtelierFluxFill", "inputs": dict(api[fill]["inputs"], prompt=text)}
        api[str(int(nid) + 1)] = {"class_type": "SaveImage",
                                  "inputs": {"images": [nid, 0], "filename_prefix": f"e2e_prompt_{nid}"}}
    again = run_ok(client, api)
    assert np.array_equal(client.images(again, "111")[0][..., :3], out), "FLUX Fill got another prompt"
    assert not np.array_equal(client.images(again, "113")[0][..., :3], out)


def test_object_compositing_sam2_workflow_end_to_end(client, models, pictures, server_log):
    api = load_api_workflow(API_DIR / "object_compositing_sam2.json")
    shrink_models(api, models, caption_seed=2)
    place, seg = node(api, "AtelierPlacementMask"), node(api, "AtelierSAM2Segment")
    sam2_loader = node(api, "AtelierSAM2Loader")
    assert api[sam2_loader]["inputs"]["model"] == "sam2.1_hiera_large.pt"
    api[sam2_loader]["inputs"]["model"] = SAM2_CHOICE  # 156 MB of random weights instead of Meta's 900 MB
    # the object photo goes to SAM2 and, as it is, to Placement Mask; SAM2's mask says which pixels are the object
    assert source(api, seg, "image") == source(api, place, "object")
    assert api[place]["inputs"]["object_mask"] == [seg, 0]
    api[seg]["inputs"]["boxes"] = json.dumps([SAM2_BOX])  # the file's box is for a 640×480 photo
    api[place]["inputs"]["feather"] = 0
    probes = add_probes(api)
    api["106"] = {"class_type": "MaskToImage", "inputs": {"mask": [seg, 0]}}
    api["107"] = {"class_type": "SaveImage", "inputs": {"images": ["106", 0], "filename_prefix": "e2e_sam2"}}

    mark = len(server_log())
    entry = run_ok(client, api)
    [sam_mask] = [m[..., 0] for m in client.images(entry, "107")]  # SAM2's masks are 0/1: the PNG is exact
    assert set(np.unique(sam_mask)) <= {0, 255} and sam_mask.shape == tiny_sam2.example_image().shape[:2]
    check_run(client, api, entry, probes, bbox(sam_mask > 0), server_log, mark)


# ------------------------------------------------------------------------------- the per-stage workflows


def test_caption_only_workflow_runs(client, models, pictures):
    api = load_api_workflow(API_DIR / "caption_only.json")
    vlm, cap = node(api, "AtelierVLMLoader"), node(api, "AtelierCaption")
    assert api[vlm]["inputs"]["model"] == "Qwen2.5-VL-3B-Instruct"
    api[vlm]["inputs"]["model"] = VLM_CHOICE
    api[cap]["inputs"].update(max_new_tokens=12, seed=3)  # seed: see shrink_models
    shows = {api[k]["inputs"]["source"][1]: k for k, n in api.items() if n["class_type"] == "PreviewAny"}
    assert sorted(shows) == [0, 1], "one Preview as Text per caption output"
    entry = run_ok(client, api)
    [prompt] = entry["outputs"][shows[0]]["text"]
    [analysis] = entry["outputs"][shows[1]]["text"]
    assert prompt.strip() and entry["outputs"][cap]["text"] == [f"{prompt}\n\n{analysis}"]
    assert {"scene", "lighting", "palette", "placement", "found"} <= set(json.loads(analysis))


def test_remove_background_workflow_runs(client, models, pictures):
    api = load_api_workflow(API_DIR / "remove_background.json")
    assert api[node(api, "AtelierBackgroundRemoverLoader")]["inputs"]["model"] == U2NETP  # runs as shipped
    cut = node(api, "AtelierRemoveBackground")
    [save_object] = [k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [cut, 0]]
    [save_mask] = [k for k, n in api.items() if n["class_type"] == "SaveImage" and k != save_object]
    entry = run_ok(client, api)
    [obj] = client.images(entry, save_object)
    [mask] = client.images(entry, save_mask)
    silhouette = rw.synthetic_object()[1]
    assert rw.iou(mask[..., 0] >= 128, silhouette) > 0.9  # the vase, cut out
    assert (obj[..., :3][mask[..., 0] == 0] == 0).all()  # on black


def test_sam2_points_workflow_runs(client, models, pictures):
    api = load_api_workflow(API_DIR / "sam2_points.json")
    loader, seg = node(api, "AtelierSAM2Loader"), node(api, "AtelierSAM2Segment")
    assert api[loader]["inputs"]["model"] == "sam2.1_hiera_large.pt"
    api[loader]["inputs"]["model"] = SAM2_CHOICE
    assert json.loads(api[seg]["inputs"]["points"]) and json.loads(api[seg]["inputs"]["negative_points"])
    # the file's clicks are for a 640×480 photo; these sit on the 64×48 example's disc and background
    api[seg]["inputs"].update(points='[{"x": 20, "y": 22}, {"x": 24, "y": 20}]', negative_points='[{"x": 60, "y": 4}]')
    entry = run_ok(client, api)
    [mask] = client.images(entry, node(api, "SaveImage"))
    assert mask.shape[:2] == tiny_sam2.example_image().shape[:2]
    assert set(np.unique(mask[..., 0])) <= {0, 255}
