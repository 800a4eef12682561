"""Placement Mask through the real server, and its hand-off to FLUX Fill."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.harness.comfy_server import ComfyClient

BW, BH = 160, 128


def png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures(client):
    rng = np.random.default_rng(3)
    bg = rng.integers(0, 256, size=(BH, BW, 3), dtype=np.uint8)
    obj = np.zeros((60, 40, 4), np.uint8)
    obj[..., 0] = 220
    obj[..., 1] = 40
    obj[10:50, 5:35, 3] = 255  # a 30×40 opaque rectangle in a transparent 40×60 picture
    return {"bg": client.upload_image(png(bg, "RGB"), "placement_bg.png"),
            "obj": client.upload_image(png(obj, "RGBA"), "placement_obj.png"), "bg_rgb": bg}


def placement_prompt(pictures, **kw) -> dict:
    inputs = dict(background=["1", 0], object=["2", 0], object_mask=["3", 0], x=0.5, y=0.9, scale=0.5,
                  anchor="bottom", mode="harmonize", band=6, feather=0, shadow=True)
    inputs.update(kw)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": pictures["bg"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": pictures["obj"]}},
        "3": {"class_type": "InvertMask", "inputs": {"mask": ["2", 1]}},  # LoadImage's MASK is 1 - alpha
        "4": {"class_type": "AtelierPlacementMask", "inputs": inputs},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "placement"}},
        "6": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "placement_inpaint"}},
        "8": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "placement_obj"}},
    }


def box(a: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(a)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_placement_geometry_through_the_server(client, pictures):
    entry = client.run(placement_prompt(pictures))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    comp = client.images(entry, "5")[0][..., :3]
    inpaint = client.images(entry, "7")[0][..., 0]
    placed = client.images(entry, "9")[0][..., 0]
    assert comp.shape == (BH, BW, 3)
    l, t, r, b = box(placed > 127)
    assert b - t == pytest.approx(0.5 * BH, abs=1)  # scale: object height = half the background's
    assert r - l == pytest.approx(30 * 64 / 40, abs=1)  # aspect of the 30×40 object kept
    assert (l + r) / 2 == pytest.approx(0.5 * BW, abs=1)
    assert b == pytest.approx(0.9 * BH, abs=1)  # anchor bottom: it stands on y
    outside = placed == 0
    assert np.array_equal(comp[outside], pictures["bg_rgb"][outside])
    core = comp[placed == 255].astype(int)
    assert (np.abs(core - [220, 40, 0]) <= 1).all()  # the object's colour (8-bit rounding of a resize)
    # harmonize keeps the object's interior and regenerates around it
    assert (inpaint[t + 8 : b - 8, l + 8 : r - 8] == 0).all()
    assert inpaint[b : b + 3, l:r].max() == 255


def test_placement_then_fill_keeps_everything_outside_the_inpaint_mask(client, pictures, tiny_flux):
    prompt = placement_prompt(pictures, feather=0)  # a binary mask, so its 8-bit PNG says exactly where it is 0
    prompt["10"] = {"class_type": "AtelierFluxFillLoader", "inputs": {
        "model": tiny_flux["choice_diffusers"], "quantization": "none", "offload": "auto",
        "attention_slicing": False, "vae_slicing": False, "vae_tiling": False, "first_block_cache": 0.0,
        "dtype": "auto"}}
    prompt["11"] = {"class_type": "AtelierFluxFill", "inputs": {
        "pipe": ["10", 0], "image": ["4", 0], "mask": ["4", 1], "prompt": "a red box on the floor", "steps": 2,
        "guidance": 30.0, "seed": 1, "composite_back": True}}
    prompt["12"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "placed_fill"}}
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    comp = client.images(entry, "5")[0][..., :3]
    inpaint = client.images(entry, "7")[0][..., 0]
    final = client.images(entry, "12")[0][..., :3]
    keep = inpaint == 0
    assert np.array_equal(final[keep], comp[keep])
    assert not np.array_equal(final[inpaint == 255], comp[inpaint == 255])


def test_auto_position_from_an_analysis_string(client, pictures):
    prompt = placement_prompt(pictures, x=-1.0, y=-1.0, analysis=["20", 0])
    analysis = json.dumps({"placement": {"x": 0.1, "y": 0.3, "w": 0.3, "h": 0.5}})
    prompt["20"] = {"class_type": "PrimitiveString", "inputs": {"value": analysis}}
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    placed = client.images(entry, "9")[0][..., 0]
    l, _, r, b = box(placed > 127)
    assert (l + r) / 2 == pytest.approx(0.25 * BW, abs=1)
    assert b == pytest.approx(0.8 * BH, abs=1)


@pytest.mark.parametrize("kw, expected", [
    ({"object_mask": ["21", 0]}, "all zero"),
    ({"y": 0.0, "anchor": "bottom"}, "lands at least partly on the background"),
])
def test_bad_placement_is_a_clear_error(client, pictures, comfy_server, kw, expected):
    prompt = placement_prompt(pictures, **kw)
    prompt["21"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 40, "height": 60}}
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None and expected in msg
    assert comfy_server.alive()
