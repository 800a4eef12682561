"""Layer nodes through a real ComfyUI server, driven only through its HTTP API and websocket.

Split: the node's layers/alphas equal plain diffusers' QwenImageLayeredPipeline on the same tiny weights, picture and
seed (with the pipeline's own captioning), progress every step, Stop, /free. Export: one run writes PSD, PPTX, ZIP
and PNGs; the PSD opens in psd-tools and in GIMP, the PPTX renders in LibreOffice with each picture where its layer
is, the ZIP manifest matches, and PSD → Load Layers is lossless. Bad inputs fail clearly and write nothing outside
output/. Then both example workflows run.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import layer_files
from tests.harness import tiny_layered
from tests.harness.comfy_server import ComfyClient, PromptRejected, load_api_workflow

TINY = "Qwen-Image-Layered-tiny"
API_DIR = Path(__file__).resolve().parents[2] / "workflows" / "api"
W, H = 96, 64
SRC_NAMES = ["Sky", "Red box", "Blue label"]
SRC_BOUNDS = [(0, 0, W, H), (10, 8, 42, 30), (50, 36, 90, 58)]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(comfy_base, tmp_path_factory):
    """The tiny QwenImageLayeredPipeline folder, visible to the server as models/diffusers/<TINY>."""
    src = tiny_layered.shared_folder(tmp_path_factory.getbasetemp())
    link = comfy_base / "models" / "diffusers" / TINY
    if not link.exists():
        link.symlink_to(src, target_is_directory=True)
    return {"folder": src, "choice": f"diffusers/{TINY}"}


@pytest.fixture(scope="module")
def picture(client):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return client.upload_image(buf.getvalue(), "atelier_split_example.png"), rgb


def source_stack() -> layer_files.LayerStack:
    rgba = np.zeros((3, H, W, 4), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    rgba[0, ..., 0], rgba[0, ..., 1], rgba[0, ..., 2], rgba[0, ..., 3] = xx * 2, 120 + yy, 200, 255
    x0, y0, x1, y1 = SRC_BOUNDS[1]
    rgba[1, y0:y1, x0:x1] = (230, 20, 20, 255)
    rgba[1, y0 + 4 : y1 - 4, x0 + 4 : x1 - 4, 3] = 140  # a half-transparent window in the box
    x0, y0, x1, y1 = SRC_BOUNDS[2]
    rgba[2, y0:y1, x0:x1, :3] = (10, 30, 240)
    rgba[2, y0:y1, x0:x1, 3] = np.linspace(40, 255, x1 - x0).astype(np.uint8)[None, :]
    return layer_files.LayerStack(rgba, list(SRC_NAMES))


@pytest.fixture(scope="module")
def sources(comfy_base):
    """Layer files in the server's input/: a ZIP of plain PNGs (3 layers) and one of 2 layers, same size."""
    stack = source_stack()
    inp = comfy_base / "input"
    inp.mkdir(exist_ok=True)

    def plain_zip(name: str, idx: list[int]) -> str:
        with zipfile.ZipFile(inp / name, "w") as z:
            for k, i in enumerate(idx):
                buf = io.BytesIO()
                Image.fromarray(stack.rgba[i], "RGBA").save(buf, "PNG")
                z.writestr(f"{k + 1}_{SRC_NAMES[i]}.png", buf.getvalue())
        return name

    return {"stack": stack, "three": plain_zip("atelier_src3.zip", [0, 1, 2]),
            "two": plain_zip("atelier_src2.zip", [0, 1])}


def loader(model: str, **kw) -> dict:
    inputs = dict(model=model, quantization="none", offload="auto", vae_slicing=False, vae_tiling=False,
                  first_block_cache=0.0, dtype="auto")
    inputs.update(kw)
    return {"class_type": "AtelierLayeredLoader", "inputs": inputs}


def split_prompt(model: str, image: str, *, layers: int = 2, steps: int = 2, cfg: float = 4.0, seed: int = 7,
                 prompt: str = "", loader_kw: dict | None = None) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": loader(model, **(loader_kw or {})),
        "3": {"class_type": "AtelierSplitLayers", "inputs": {
            "pipe": ["2", 0], "image": ["1", 0], "layers": layers, "resolution": "640", "steps": steps, "cfg": cfg,
            "seed": seed, "prompt": prompt, "language": "en", "cfg_normalize": True}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "atelier_test/layers"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "atelier_test/alphas"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "atelier_test/comp"}},
    }


def export_node(layers_ref, alphas_ref, fmt: str, prefix: str, names="") -> dict:
    return {"class_type": "AtelierExportLayers", "inputs": {
        "layers": layers_ref, "alphas": alphas_ref, "format": fmt, "filename_prefix": prefix, "layer_names": names}}


def run_ok(client: ComfyClient, prompt: dict) -> dict:
    entry = client.run(prompt)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return entry


def run_error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    return msg


def files_of(entry: dict, node: str, comfy_base: Path) -> list[Path]:
    out = entry["outputs"][node]
    paths = []
    for f in out["atelier_files"]:
        assert f["type"] == "output"
        paths.append(comfy_base / "output" / f["subfolder"] / f["filename"])
    return paths


def need_tool(binary: str, package: str) -> str:
    """The tool's path; skip only where it cannot be installed (CI runs as root: then a missing tool fails)."""
    path = shutil.which(binary)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(f"{binary} is missing although apt-get can install it: run `bash .ci/setup_env.sh` "
                    f"(it installs {package})", pytrace=False)
    pytest.skip(f"{binary} ({package}) is not installed and this user cannot apt-get install it (not root)")


# ------------------------------------------------------------------------------------------------ schema


def test_schema_matches_the_public_contract(client, tiny):
    info = client.object_info("AtelierLayeredLoader")
    assert info["category"] == "atelier/layers" and info["output"] == ["ATELIER_LAYERED"]
    assert info["input_order"]["required"] == ["model", "quantization", "offload", "vae_slicing", "vae_tiling",
                                               "first_block_cache", "dtype"]
    req = info["input"]["required"]
    assert tiny["choice"] in req["model"][1]["options"]
    assert req["quantization"][1]["options"] == ["none", "int8", "nf4", "fp8"]
    assert req["offload"][1]["options"] == ["auto", "none", "model", "sequential"]

    split = client.object_info("AtelierSplitLayers")
    assert split["input_order"]["required"][:9] == ["pipe", "image", "layers", "resolution", "steps", "cfg", "seed",
                                                    "prompt", "language"]
    r = split["input"]["required"]
    assert r["layers"][1]["default"] == 4 and r["steps"][1]["default"] == 50
    assert r["resolution"][1]["options"] == ["640", "1024"] and r["resolution"][1]["default"] == "640"
    assert split["output"] == ["IMAGE", "MASK", "IMAGE", "STRING"]
    assert split["output_name"][:3] == ["layers", "alphas", "composite"]

    export = client.object_info("AtelierExportLayers")
    assert export["output_node"] is True
    assert export["input_order"]["required"] == ["layers", "alphas", "format", "filename_prefix", "layer_names"]
    assert export["input"]["required"]["format"][1]["options"] == ["psd", "pptx", "zip", "png"]
    load = client.object_info("AtelierLoadLayers")
    assert load["output"][:2] == ["IMAGE", "MASK"]
    combine = client.object_info("AtelierCombineLayers")
    assert combine["input_order"]["required"] == ["layers", "alphas", "order"] and combine["output"] == ["IMAGE",
                                                                                                         "MASK"]
    for node in ("AtelierLayeredLoader", "AtelierSplitLayers", "AtelierExportLayers", "AtelierLoadLayers",
                 "AtelierCombineLayers"):
        info = client.object_info(node)
        assert info["category"] == "atelier/layers"
        for group in info["input"].values():
            for name, spec in group.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


# ------------------------------------------------------------------------------------------------- split


def test_split_equals_plain_pipeline_with_its_own_caption(client, tiny, picture, ws):
    """Empty prompt: the pipeline captions the picture; the node must give exactly what plain diffusers gives."""
    name, rgb = picture
    entry = run_ok(client, split_prompt(tiny["choice"], name, layers=2, steps=2, cfg=4.0, seed=7, prompt=""))
    layers_png = client.images(entry, "4")
    alphas_png = client.images(entry, "6")
    comp_png = client.images(entry, "7")
    assert len(layers_png) == 2 and len(alphas_png) == 2 and len(comp_png) == 1
    assert entry["outputs"]["3"]["text"][0].startswith("prompt: ")
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "3"]
    assert values == [1, 2], values

    pipe = tiny_layered.reference_pipeline(tiny["folder"])
    ref, _ = tiny_layered.reference_split(pipe, Image.fromarray(rgb).convert("RGBA"), prompt="", layers=2, steps=2,
                                          cfg=4.0, seed=7)
    ref = ref.numpy()
    for i in range(2):  # SaveImage truncates (clip(255 x).astype(uint8)): do the same to the reference
        want_rgb = np.clip(255.0 * ref[i, :3].transpose(1, 2, 0), 0, 255).astype(np.int16)
        want_a = np.clip(255.0 * ref[i, 3], 0, 255).astype(np.int16)
        got_rgb, got_a = layers_png[i][..., :3].astype(np.int16), alphas_png[i][..., 0].astype(np.int16)
        assert got_rgb.shape == want_rgb.shape, (got_rgb.shape, want_rgb.shape)
        assert np.abs(got_rgb - want_rgb).max() <= 1 and np.abs(got_a - want_a).max() <= 1
    # the composite output is the layers flattened again (layer 1 at the bottom)
    a0, a1 = ref[0, 3][..., None], ref[1, 3][..., None]
    c0, c1 = ref[0, :3].transpose(1, 2, 0), ref[1, :3].transpose(1, 2, 0)
    cover = a1 + a0 * (1 - a1)
    straight = np.where(cover > 0, (c1 * a1 + c0 * a0 * (1 - a1)) / np.maximum(cover, 1e-12), 0)
    assert np.abs(comp_png[0][..., :3].astype(np.int16) - np.clip(255 * straight, 0, 255).astype(np.int16)).max() <= 1


def test_zero_layers_is_refused_by_validation(client, tiny, picture, comfy_server):
    name, _ = picture
    with pytest.raises(PromptRejected) as e:
        client.queue(split_prompt(tiny["choice"], name, layers=0))
    assert "layers" in json.dumps(e.value.node_errors) and "min" in json.dumps(e.value.node_errors).lower()
    assert comfy_server.alive()


def test_stop_mid_split_then_the_next_prompt_runs(client, tiny, picture, ws, comfy_server, sources):
    name, _ = picture
    pid = client.queue(split_prompt(tiny["choice"], name, layers=1, steps=200, cfg=1.0, seed=3, prompt="a dog"))
    first = ws.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == "3", timeout=180)
    assert first["data"]["max"] == 200
    client.interrupt()
    entry = client.wait(pid, timeout=180)
    assert ComfyClient.interrupted(entry)
    values = [m["data"]["value"] for m in ws.messages("progress") if m["data"].get("node") == "3"]
    assert max(values) < 200, "the split finished instead of stopping"
    assert comfy_server.alive()


def test_free_releases_and_toggles_run(client, tiny, picture, server_log):
    """The loader (VAE slicing + FirstBlockCache) loads; Unload (POST /free) drops it; a split reloads and runs."""
    name, _ = picture
    kw = {"vae_slicing": True, "first_block_cache": 0.1}
    load_only = {"2": loader(tiny["choice"], **kw),
                 "8": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    run_ok(client, load_only)
    loads = len(re.findall(r"Atelier: loading Qwen-Image-Layered", server_log()))
    mark = len(server_log())
    client.free(unload_models=True, free_memory=False)
    deadline = time.time() + 30
    while "Atelier: released a loaded model (LayeredSpec" not in server_log(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert "Atelier: released a loaded model (LayeredSpec" in server_log(mark)
    run_ok(client, split_prompt(tiny["choice"], name, layers=1, steps=2, cfg=1.0, seed=11, prompt="a cat",
                                loader_kw=kw))
    assert len(re.findall(r"Atelier: loading Qwen-Image-Layered", server_log())) == loads + 1


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(client, sources, comfy_base):
    """One run: Load Layers (ZIP of plain PNGs) → Export as PSD, PPTX, ZIP and PNG."""
    names = ", ".join(SRC_NAMES)
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}}}
    for node, fmt in (("2", "psd"), ("3", "pptx"), ("4", "zip"), ("5", "png")):
        prompt[node] = export_node(["1", 0], ["1", 1], fmt, f"atelier_test/export_{fmt}", names)
    entry = run_ok(client, prompt)
    return {"entry": entry, **{fmt: files_of(entry, node, comfy_base)
                               for node, fmt in (("2", "psd"), ("3", "pptx"), ("4", "zip"), ("5", "png"))}}


def test_export_shows_files_and_layer_previews(exported, client):
    entry = exported["entry"]
    for node, fmt in (("2", "psd"), ("3", "pptx"), ("4", "zip")):
        out = entry["outputs"][node]
        assert len(out["images"]) == 3 and all(i["type"] == "temp" for i in out["images"])
        assert f"output/atelier_test/export_{fmt}_" in out["text"][0]
        preview = client.images(entry, node)
        assert all(p.shape[-1] == 4 for p in preview)  # RGBA: the previews show the transparency
    pngs = entry["outputs"]["5"]
    assert [i["type"] for i in pngs["images"]] == ["output"] * 3
    assert [p.name for p in exported["png"]] == [f"export_png_00001_{i:02}.png" for i in (1, 2, 3)]


def test_psd_opens_in_psd_tools_with_names_order_bounds_and_pixels(exported, sources):
    from psd_tools import PSDImage

    (path,) = exported["psd"]
    psd = PSDImage.open(path)
    src = sources["stack"]
    assert psd.size == (W, H)
    assert [layer.name for layer in psd] == SRC_NAMES  # psd-tools lists bottom first
    for layer, (left, top, right, bottom), want in zip(psd, SRC_BOUNDS, src.rgba, strict=True):
        assert layer.bbox == (left, top, right, bottom) and layer.opacity == 255 and layer.visible
        assert np.array_equal(np.asarray(layer.topil().convert("RGBA")), want[top:bottom, left:right])


GIMP_SCRIPT = """
(let* ((image (car (gimp-file-load RUN-NONINTERACTIVE "{psd}" "{psd}")))
       (layers (vector->list (cadr (gimp-image-get-layers image))))
       (port (open-output-file "{report}"))
       (k 0))
  (display (number->string (length layers)) port) (newline port)
  (for-each
    (lambda (layer)
      (let* ((offsets (gimp-drawable-offsets layer))
             (png (string-append "{out}/layer_" (number->string k) ".png")))
        (file-png-save-defaults RUN-NONINTERACTIVE image layer png png)
        (display (string-append (number->string (car offsets)) " " (number->string (cadr offsets)) " "
                                (number->string (car (gimp-drawable-width layer))) " "
                                (number->string (car (gimp-drawable-height layer))) " "
                                (number->string (car (gimp-layer-get-opacity layer))) " "
                                (car (gimp-item-get-name layer))) port)
        (newline port)
        (set! k (+ k 1))))
    layers)
  (close-output-port port))
"""


def test_psd_opens_in_gimp(exported, sources, tmp_path):
    """GIMP (headless, script-fu) loads the PSD: layer count, names, order (GIMP lists top first), offsets, sizes,
    opacity, and each layer's pixels as GIMP exports them."""
    gimp = need_tool("gimp-console", "gimp") if shutil.which("gimp-console") else need_tool("gimp", "gimp")
    (path,) = exported["psd"]
    report = tmp_path / "report.txt"
    script = GIMP_SCRIPT.format(psd=path, report=report, out=tmp_path)
    env = dict(os.environ, GIMP2_DIRECTORY=str(tmp_path / "gimp-profile"), HOME=str(tmp_path))
    proc = subprocess.run([gimp, "-i", "-d", "-f", "-n", "-b", script, "-b", "(gimp-quit 0)"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert report.is_file(), f"GIMP wrote no report (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    lines = report.read_text(encoding="utf-8").splitlines()
    assert int(lines[0]) == 3
    rows = [line.split(" ", 5) for line in lines[1:]]
    assert [r[5] for r in rows] == SRC_NAMES[::-1]  # top layer first in GIMP
    src = sources["stack"]
    for k, row in enumerate(rows):
        i = 2 - k  # back to bottom-first
        left, top, right, bottom = SRC_BOUNDS[i]
        assert [int(row[0]), int(row[1]), int(row[2]), int(row[3])] == [left, top, right - left, bottom - top]
        assert float(row[4]) == pytest.approx(100.0)
        with Image.open(tmp_path / f"layer_{k}.png") as im:
            got = np.asarray(im.convert("RGBA"))
        want = src.rgba[i, top:bottom, left:right]
        shows = want[..., 3] > 0
        assert np.array_equal(got[..., 3], want[..., 3])
        assert np.array_equal(got[shows][:, :3], want[shows][:, :3])


def test_pptx_renders_in_libreoffice_with_pictures_at_the_layer_bounds(exported, tmp_path):
    soffice = need_tool("soffice", "libreoffice-impress")
    (path,) = exported["pptx"]
    # the XML: one picture per layer, in order, at its bounds
    from pptx import Presentation

    prs = Presentation(path)
    emu = layer_files.slide_scale(W, H)
    assert (prs.slide_width, prs.slide_height) == (W * emu, H * emu)
    pics = list(prs.slides[0].shapes)
    assert [p.name for p in pics] == SRC_NAMES
    for p, (left, top, right, bottom) in zip(pics, SRC_BOUNDS, strict=True):
        assert (p.left, p.top, p.width, p.height) == (left * emu, top * emu, (right - left) * emu,
                                                      (bottom - top) * emu)
    # LibreOffice renders the slide; the red box and the blue label show where the layers are
    profile = tmp_path / "lo-profile"
    proc = subprocess.run([soffice, f"-env:UserInstallation=file://{profile}", "--headless", "--norestore",
                           "--convert-to", "png", "--outdir", str(tmp_path), str(path)],
                          capture_output=True, text=True, timeout=180)
    rendered = tmp_path / (path.stem + ".png")
    assert rendered.is_file(), f"LibreOffice rendered nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(rendered).convert("RGB")).astype(int)
    sx, sy = img.shape[1] / W, img.shape[0] / H

    def found(colour) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(np.abs(img - np.array(colour)).sum(-1) < 60)
        assert xs.size, f"colour {colour} not found in the rendered slide"
        return xs.min() / sx, ys.min() / sy, (xs.max() + 1) / sx, (ys.max() + 1) / sy

    # the red box is opaque all round its border: its whole bounds show red
    red = found((230, 20, 20))
    assert all(abs(a - b) <= 2.0 for a, b in zip(red, SRC_BOUNDS[1], strict=True)), red
    # the blue label fades in from the left: its top, right and bottom edges show pure blue
    left, top, right, bottom = SRC_BOUNDS[2]
    got = found((10, 30, 240))
    assert left - 2 <= got[0], got
    assert all(abs(a - b) <= 2.0 for a, b in zip(got[1:], (top, right, bottom), strict=True)), got


def test_zip_manifest_and_pngs_match(exported, sources):
    (path,) = exported["zip"]
    src = sources["stack"]
    with zipfile.ZipFile(path) as z:
        doc = json.loads(z.read("manifest.json"))
        assert (doc["width"], doc["height"], doc["order"]) == (W, H, "bottom-to-top")
        assert [e["name"] for e in doc["layers"]] == SRC_NAMES
        for e, want, box in zip(doc["layers"], src.rgba, SRC_BOUNDS, strict=True):
            assert tuple(e["bounds"][k] for k in ("left", "top", "right", "bottom")) == box
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(z.read(e["file"]))).convert("RGBA")), want)
    for p, want in zip(exported["png"], src.rgba, strict=True):
        assert np.array_equal(np.asarray(Image.open(p).convert("RGBA")), want)


def test_psd_load_layers_round_trip_is_lossless(client, exported, sources, comfy_base):
    """The exported PSD → Load Layers → Export (ZIP, names from Load Layers): every alpha and visible colour, and
    the names, come back exactly."""
    (psd,) = exported["psd"]
    shutil.copy(psd, comfy_base / "input" / "atelier_roundtrip.psd")
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": "atelier_roundtrip.psd"}},
              "2": export_node(["1", 0], ["1", 1], "zip", "atelier_test/roundtrip", ["1", 2])}
    entry = run_ok(client, prompt)
    (path,) = files_of(entry, "2", comfy_base)
    back = layer_files.read_zip(path)
    assert back.names == SRC_NAMES
    assert np.array_equal(back.rgba, sources["stack"].rgba)


def test_combine_layers_order(client, sources):
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}},
              "2": {"class_type": "AtelierCombineLayers", "inputs": {"layers": ["1", 0], "alphas": ["1", 1],
                                                                     "order": "3,2"}},
              "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "atelier_test/m"}}}
    entry = run_ok(client, prompt)
    (mask,) = client.images(entry, "4")
    src = sources["stack"].rgba.astype(np.float64) / 255
    a2, a1 = src[2, ..., 3], src[1, ..., 3]  # layer 3 at the bottom, layer 2 over it; layer 1 hidden
    want = np.clip(255 * (a1 + a2 * (1 - a1)), 0, 255).astype(np.int16)
    assert np.abs(mask[..., 0].astype(np.int16) - want).max() <= 1


# --------------------------------------------------------------------------------------------- bad input


def _outside_snapshot(comfy_base: Path) -> set:
    """Every path under the server's base dir and its parent except output/, temp/ and logs."""
    root = comfy_base.parent
    skip = {comfy_base / "output", comfy_base / "temp", comfy_base / "user"}
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        found |= {str(here / f) for f in filenames if f != "server.log"}
    return found


@pytest.mark.parametrize("prefix", ["../escape_layers", "atelier_test/../../escape_layers", "/tmp/escape_layers"])
def test_prefix_outside_output_is_refused_and_nothing_is_written(client, sources, comfy_base, comfy_server, prefix):
    before = _outside_snapshot(comfy_base)
    out_before = sorted(p for p in (comfy_base / "output").rglob("*"))
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}},
              "2": export_node(["1", 0], ["1", 1], "psd", prefix)}
    msg = run_error(client, prompt)
    assert "filename_prefix inside ComfyUI's output folder" in msg
    assert _outside_snapshot(comfy_base) == before
    assert sorted(p for p in (comfy_base / "output").rglob("*")) == out_before
    assert not Path("/tmp/escape_layers_00001_.psd").exists()
    assert comfy_server.alive()


def test_more_alphas_than_layers_is_a_clear_error(client, sources, comfy_server):
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["two"]}},
              "2": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}},
              "3": export_node(["1", 0], ["2", 1], "psd", "atelier_test/bad")}
    msg = run_error(client, prompt)
    assert "an alpha batch of 1 or 2" in msg and "3 alphas for 2 layers" in msg
    assert comfy_server.alive()


def test_alphas_of_another_size_is_a_clear_error(client, sources, comfy_server):
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}},
              "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
              "3": export_node(["1", 0], ["2", 0], "zip", "atelier_test/bad")}
    msg = run_error(client, prompt)
    assert f"alphas of the layers' size ({W}×{H})" in msg and "32×32" in msg
    assert comfy_server.alive()


def test_unreadable_psd_is_a_clear_error(client, comfy_base, comfy_server):
    (comfy_base / "input" / "atelier_broken.psd").write_bytes(b"8BPS" + os.urandom(64))
    (comfy_base / "input" / "atelier_notes.psd").write_bytes(b"this is a text file")
    for name in ("atelier_broken.psd", "atelier_notes.psd"):
        prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": name}},
                  "2": export_node(["1", 0], ["1", 1], "png", "atelier_test/never")}
        msg = run_error(client, prompt)
        assert f"a PSD file that psd-tools can read; got '{name}'" in msg
    msg = run_error(client, {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": "missing.psd"}},
                             "2": export_node(["1", 0], ["1", 1], "png", "atelier_test/never")})
    assert "input folder" in msg and "atelier_src3.zip" in msg
    assert comfy_server.alive()


def test_combine_order_out_of_range_is_a_clear_error(client, sources, comfy_server):
    prompt = {"1": {"class_type": "AtelierLoadLayers", "inputs": {"file": sources["three"]}},
              "2": {"class_type": "AtelierCombineLayers", "inputs": {"layers": ["1", 0], "alphas": ["1", 1],
                                                                     "order": "1,5"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    msg = run_error(client, prompt)
    assert "layer numbers from 1 to 3" in msg
    assert comfy_server.alive()


# --------------------------------------------------------------------------------------------- workflows


def test_layer_split_workflow_runs(client, tiny, comfy_base):
    api = load_api_workflow(API_DIR / "layer_split.json")
    assert api["2"]["inputs"]["model"] == "diffusers/Qwen-Image-Layered"
    api["2"]["inputs"]["model"] = tiny["choice"]  # the real model is 20 B; the tiny random one has its layout
    api["3"]["inputs"].update(steps=2, layers=2, prompt="a poster")
    rng = np.random.default_rng(8)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    client.upload_image(buf.getvalue(), api["1"]["inputs"]["image"])
    entry = run_ok(client, api)
    (psd,) = files_of(entry, "4", comfy_base)
    (pptx,) = files_of(entry, "5", comfy_base)
    assert psd.suffix == ".psd" and pptx.suffix == ".pptx"
    assert len(layer_files.read_psd(psd).names) == 2
    assert len(client.images(entry, "6")) == 2 and len(client.images(entry, "7")) == 1


def test_layer_edit_roundtrip_workflow_runs(client, comfy_base):
    api = load_api_workflow(API_DIR / "layer_edit_roundtrip.json")
    stack = source_stack()
    layer_files.write_psd(stack, comfy_base / "input" / api["1"]["inputs"]["file"])
    entry = run_ok(client, api)
    (saved,) = client.images(entry, "5")
    assert saved.shape == (H, W, 4)
    image, mask = _flatten(stack, [0, 2, 1])
    assert np.abs(saved[..., 3].astype(int) - np.clip(255 * mask, 0, 255).astype(int)).max() <= 1
    shows = mask > 0
    assert np.abs(saved[..., :3][shows].astype(int) - np.clip(255 * image[shows], 0, 255).astype(int)).max() <= 1


def _flatten(stack: layer_files.LayerStack, order: list[int]):
    from atelier.layers import flatten

    f = torch.from_numpy(stack.rgba.astype(np.float32) / 255)
    image, mask = flatten(f[..., :3], f[..., 3], order)
    return image[0].numpy(), mask[0].numpy()
