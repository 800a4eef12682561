"""What the nodes send to the frontend's editors after a run (their UI output, as GET /history shows it).

* SAM2 Segment: ``atelier_sam2`` = the image the node received (a temp PNG, scaled down past
  1024 px), one overlay whose coloured pixels are exactly the object masks, the image's full size and the prompt
  texts it ran with. The point/box editor (web/js/atelier_sam2_editor.js) draws these.
* Split Into Layers / Load Layers: ``atelier_layers`` = one RGBA temp PNG per layer with its name and 1-based index
  (the layer gallery, web/js/atelier_layers.js).
* Caption: the reply and the analysis as the node's text.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from atelier import layer_files
from tests.harness import tiny_layered, tiny_sam2, tiny_vlm
from tests.harness.comfy_server import ComfyClient

SAM2_PT = tiny_sam2.NAME + ".pt"
OVERLAY_COLORS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (160, 80, 255), (0, 200, 120), (255, 120, 200)]
OVERLAY_ALPHA = 110
LAYERED = "Qwen-Image-Layered-tiny"
VLM = "tiny-qwen2_5_vl"


def upload_png(client: ComfyClient, rgb: np.ndarray, name: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return client.upload_image(buf.getvalue(), name)


def view(client: ComfyClient, f: dict) -> np.ndarray:
    assert f["type"] == "temp", f
    return np.asarray(Image.open(io.BytesIO(client.view(f["filename"], f["subfolder"], f["type"]))))


def ok(client: ComfyClient, prompt: dict) -> dict:
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return entry


# ------------------------------------------------------------------------------------------------- SAM2


@pytest.fixture(scope="module")
def sam2_model(comfy_base):
    folder = comfy_base / "models" / "sam2"
    if not (folder / SAM2_PT).is_file():
        tiny_sam2.write_checkpoints(folder, formats=("pt",))
    return SAM2_PT


@pytest.fixture(scope="module")
def sam2_picture(client):
    rgb = tiny_sam2.example_image()
    return upload_png(client, rgb, "atelier_editor_sam2.png"), rgb


def segment(image_ref, points="", negative_points="", boxes="", extra=None) -> dict:
    prompt = {
        "2": {"class_type": "AtelierSAM2Loader", "inputs": {"model": SAM2_PT, "dtype": "fp32"}},
        "3": {"class_type": "AtelierSAM2Segment", "inputs": {
            "sam2": ["2", 0], "image": image_ref, "points": points, "negative_points": negative_points,
            "boxes": boxes, "multimask": False}},
    }
    prompt["4"] = {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}}
    prompt["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "atelier_ui/m"}}
    prompt.update(extra or {})
    return prompt


def sam2_ui(entry: dict) -> dict:
    [info] = entry["outputs"]["3"]["atelier_sam2"]
    return info


def test_segment_sends_the_picture_and_its_masks(client, sam2_model, sam2_picture):
    name, rgb = sam2_picture
    points, negative, boxes = '[{"x": 20, "y": 22}]', '[{"x": 52, "y": 8}]', "[[6, 8, 34, 36], [36, 24, 62, 46]]"
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}}
    entry = ok(client, segment(["1", 0], points, negative, boxes, extra=load))
    info = sam2_ui(entry)
    assert (info["width"], info["height"], info["objects"]) == (tiny_sam2.WIDTH, tiny_sam2.HEIGHT, 2)
    assert info["prompts"] == [points, negative, boxes]
    assert np.array_equal(view(client, info["image"]), rgb)

    masks = [m[..., 0] > 127 for m in client.images(entry, "5")]
    assert len(masks) == 2 and not np.array_equal(masks[0], masks[1])
    overlay = view(client, info["overlay"])
    assert overlay.shape == (tiny_sam2.HEIGHT, tiny_sam2.WIDTH, 4)
    assert np.array_equal(overlay[..., 3] > 0, masks[0] | masks[1])
    assert set(np.unique(overlay[..., 3])) <= {0, OVERLAY_ALPHA}
    assert np.all(overlay[masks[1], :3] == OVERLAY_COLORS[1])  # the later object is drawn on top
    assert np.all(overlay[masks[0] & ~masks[1], :3] == OVERLAY_COLORS[0])


def test_the_overlay_follows_the_points(client, sam2_model, sam2_picture):
    name, _ = sam2_picture
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}}
    seen = []
    for points in ('[{"x": 20, "y": 22}]', '[{"x": 48, "y": 34}]'):
        entry = ok(client, segment(["1", 0], points, extra=load))
        [mask] = client.images(entry, "5")
        info = sam2_ui(entry)
        assert info["prompts"][0] == points and info["objects"] == 1
        shade = view(client, info["overlay"])[..., 3] > 0
        assert np.array_equal(shade, mask[..., 0] > 127)
        seen.append(shade)
    assert not np.array_equal(*seen), "two different points gave the same mask"


def test_the_preview_is_the_node_input_scaled_to_1024_with_the_full_size(client, sam2_model, sam2_picture):
    name, rgb = sam2_picture
    chain = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "6": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                          "width": 1280, "height": 960, "crop": "disabled"}}}
    entry = ok(client, segment(["6", 0], points="[[400, 440]]", boxes="[[100, 100, 800, 900]]", extra=chain))
    info = sam2_ui(entry)
    assert (info["width"], info["height"]) == (1280, 960)  # the prompts' coordinate space
    got = view(client, info["image"])
    big = Image.fromarray(rgb.repeat(20, axis=0).repeat(20, axis=1))  # nearest-exact ×20
    big.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
    assert got.shape == (768, 1024, 3)
    assert np.abs(got.astype(int) - np.asarray(big).astype(int)).max() <= 1
    assert view(client, info["overlay"]).shape == (768, 1024, 4)


# ----------------------------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def layer_zip(comfy_base):
    w, h = 96, 64
    rgba = np.zeros((3, h, w, 4), np.uint8)
    rgba[0] = (90, 140, 230, 255)
    rgba[1, 8:30, 10:42] = (230, 20, 20, 180)
    rgba[2, 36:58, 50:90] = (10, 30, 240, 255)
    stack = layer_files.LayerStack(rgba, ["Sky", "Red box", "Blue label"])
    (comfy_base / "input").mkdir(exist_ok=True)
    layer_files.write_zip(stack, comfy_base / "input" / "atelier_editor_layers.zip")
    with zipfile.ZipFile(comfy_base / "input" / "atelier_editor_layers.zip") as z:
        assert "manifest.json" in z.namelist()
    return "atelier_editor_layers.zip", stack


def test_load_layers_sends_each_layer_with_name_and_index(client, layer_zip):
    name, stack = layer_zip
    entry = ok(client, {
        "1": {"class_type": "AtelierLoadLayers", "inputs": {"file": name}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
    })
    gallery = entry["outputs"]["1"]["atelier_layers"]
    assert [(g["index"], g["name"]) for g in gallery] == [(1, "Sky"), (2, "Red box"), (3, "Blue label")]
    assert all((g["width"], g["height"]) == (96, 64) for g in gallery)
    for g, want in zip(gallery, stack.rgba, strict=True):
        got = view(client, g)
        assert got.shape == (64, 96, 4) and np.array_equal(got, want)


@pytest.fixture(scope="module")
def layered_model(comfy_base, tmp_path_factory):
    src = tiny_layered.shared_folder(tmp_path_factory.getbasetemp())
    link = comfy_base / "models" / "diffusers" / LAYERED
    if not link.exists():
        link.symlink_to(src, target_is_directory=True)
    return f"diffusers/{LAYERED}"


def test_split_sends_a_gallery_of_its_layers(client, layered_model):
    rgb = np.random.default_rng(5).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    name = upload_png(client, rgb, "atelier_editor_split.png")
    entry = ok(client, {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "AtelierLayeredLoader", "inputs": {
            "model": layered_model, "quantization": "none", "offload": "auto", "vae_slicing": False,
            "vae_tiling": False, "first_block_cache": 0.0, "dtype": "auto"}},
        "3": {"class_type": "AtelierSplitLayers", "inputs": {
            "pipe": ["2", 0], "image": ["1", 0], "layers": 2, "resolution": "640", "steps": 2, "cfg": 1.0,
            "seed": 3, "prompt": "a picture", "language": "en", "cfg_normalize": True}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "atelier_ui/alpha"}},
    })
    out = entry["outputs"]["3"]
    assert out["text"][0].startswith("prompt: a picture")  # the layers extension's text is still sent
    gallery = out["atelier_layers"]
    assert [(g["index"], g["name"]) for g in gallery] == [(1, "Layer 1"), (2, "Layer 2")]
    alphas = [a[..., 0] for a in client.images(entry, "5")]
    for g, alpha in zip(gallery, alphas, strict=True):
        assert (g["height"], g["width"]) == alpha.shape
        got = view(client, g)
        assert max(got.shape[:2]) == 512 and got.shape[2] == 4  # scaled down to the gallery's 512 px
        assert abs(got.shape[0] / got.shape[1] - alpha.shape[0] / alpha.shape[1]) < 0.01
        # SaveImage truncates to 8 bits, the gallery rounds: 1 apart before the same resize, a little more after
        want = Image.fromarray(alpha).resize(got.shape[1::-1], Image.Resampling.LANCZOS)
        diff = np.abs(got[..., 3].astype(int) - np.asarray(want).astype(int))
        assert diff.max() <= 3 and diff.mean() < 1.0, (diff.max(), diff.mean())


# ---------------------------------------------------------------------------------------------- caption


def test_caption_shows_the_prompt_and_the_analysis(client, comfy_base, sam2_picture):
    tiny_vlm.build("qwen2_5_vl", comfy_base / "models" / "LLM" / VLM)
    name, _ = sam2_picture
    entry = ok(client, {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "AtelierVLMLoader", "inputs": {"model": VLM, "quantization": "none", "offload": "auto",
                                                            "dtype": "auto"}},
        "3": {"class_type": "AtelierCaption", "inputs": {
            "vlm": ["2", 0], "image": ["1", 0], "task": "background_analysis", "instruction": "", "language": "en",
            "max_new_tokens": 12, "seed": 0, "temperature": 0.0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    })
    [prompt], [analysis] = entry["outputs"]["4"]["text"], entry["outputs"]["5"]["text"]
    assert set(json.loads(analysis)) >= {"scene", "lighting", "placement"}
    assert entry["outputs"]["3"]["text"] == [f"{prompt}\n\n{analysis}"]
