"""Corrupt model files and hostile input files for the corpus tier, written into a ComfyUI base directory."""
from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

OUTCOMES: dict = {}  # (node, case) -> (outcome, seconds), filled by test_corpus, summed up by conftest
HEALTH = "HEALTH"
TEXT = b"this is a text file, not a model\n"


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def lying_safetensors(real: Path) -> bytes:
    """The header of a real file claiming one tensor 1000× larger than the data that follows."""
    raw = real.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, start + (end - start) * 1000]
    header[name]["shape"] = [int(np.prod(header[name]["shape"])) * 1000]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def zip_bytes(entries: dict, manifest: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if manifest is not None:
            z.writestr("manifest.json", json.dumps(manifest))
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def huge_declared_sizes(data: bytes) -> bytes:
    """Every central-directory entry of a ZIP claims 4 GiB unpacked (a zip bomb's declared sizes)."""
    out = bytearray(data)
    i = out.find(b"PK\x01\x02")
    while i != -1:
        out[i + 24:i + 28] = struct.pack("<I", 0xFFFFFFF0)
        i = out.find(b"PK\x01\x02", i + 4)
    return bytes(out)


def layer_png(w: int = 8, h: int = 8) -> bytes:
    return png(np.full((h, w, 4), 200, np.uint8), "RGBA")


def write_all(base: Path, tiny_flux: dict) -> None:
    models, inputs = base / "models", base / "input"
    transformer = Path(tiny_flux["transformer"]).read_bytes()
    # names no "auto" choice picks (auto looks for clip_l / t5 / ae / flux in the name): other tiers share the server
    model_files = {
        "diffusion_models/flux1-fill-truncated.safetensors": transformer[: len(transformer) // 2],
        "diffusion_models/flux1-fill-lying.safetensors": lying_safetensors(Path(tiny_flux["transformer"])),
        "text_encoders/corrupt_zero_te.safetensors": b"",
        "text_encoders/corrupt_text_te.safetensors": TEXT,
        "vae/corrupt_lying_v.safetensors": lying_safetensors(Path(tiny_flux["vae"])),
        "background_removal/corrupt_text.onnx": TEXT,
        "background_removal/zero.onnx": b"",
        "background_removal/truncated.safetensors": transformer[:1000],
        "sam2/corrupt_text.pt": TEXT,
        "sam2/zero.pt": b"",
        "sam2/truncated.safetensors": transformer[:5000],
        "pose/corrupt_text.tflite": TEXT,
        "pose/zero.tflite": b"",
        "fastcomposer/corrupt_text.bin": TEXT,
        "fastcomposer/zero.safetensors": b"",
        "loras/corrupt_lora.safetensors": TEXT,
        "ipadapter/corrupt_ip.bin": TEXT,
        "controlnet/corrupt_cn.safetensors": TEXT,
        "checkpoints/corrupt_tryon.safetensors": TEXT,
        "style_models/corrupt_redux.safetensors": TEXT,
        "depth/broken-depth/config.json": b"{not json",
        "depth/broken-depth/model.safetensors": b"",
        "LLM/broken-vlm/config.json": b'{"model_type": "qwen2_5_vl", "vision_config": 5}',
        "LLM/broken-vlm/model.safetensors": TEXT,
        "diffusers/not-a-flux/model_index.json": json.dumps({"_class_name": "FluxFillPipeline"}).encode(),
    }
    rng = np.random.default_rng(0)
    big_png = layer_png()
    input_files = {
        "corpus/fake.psd": TEXT,
        "corpus/zero.psd": b"",
        "corpus/fake.pptx": TEXT,
        "corpus/fake.zip": TEXT,
        "corpus/slip.zip": zip_bytes({"../../evil_slip.png": big_png, "/abs_evil.png": big_png}),
        "corpus/slip_manifest.zip": zip_bytes({"../../evil_slip.png": big_png}, {
            "width": 8, "height": 8, "layers": [{"file": "../../evil_slip.png", "name": "../../evil"}]}),
        "corpus/bomb_declared.zip": huge_declared_sizes(zip_bytes({"a.png": big_png, "b.png": big_png})),
        "corpus/bomb_many.zip": zip_bytes({f"l/{i:05}.png": big_png for i in range(3000)}),
        "corpus/manifest_bad_json.zip": zip_bytes({"manifest.json": b"{oops", "l.png": big_png}),
        "corpus/manifest_bounds_x.zip": zip_bytes({"l.png": layer_png(4, 4)}, {
            "width": 16, "height": 16, "layers": [{"file": "l.png", "bounds": {"left": "x", "top": 0}}]}),
        "corpus/manifest_huge_canvas.zip": zip_bytes({"l.png": big_png}, {
            "width": 2**64, "height": 2**64, "layers": [{"file": "l.png"}]}),
        "corpus/manifest_missing.zip": zip_bytes({"l.png": big_png}, {
            "width": 8, "height": 8, "layers": [{"file": "gone.png"}]}),
        "corpus/png_is_text.zip": zip_bytes({"l.png": TEXT}),
        "corpus/empty.zip": zip_bytes({}),
        "corpus/gray.png": png(rng.integers(0, 256, (24, 20), dtype=np.uint8), "L"),
        "corpus/rgba.png": png(rng.integers(0, 256, (24, 20, 4), dtype=np.uint8), "RGBA"),
        "corpus/deep16.png": _png16(rng.integers(0, 65536, (24, 20), dtype=np.uint16)),
    }
    for rel, data in model_files.items():
        p = models / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, data in input_files.items():
        p = inputs / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16), "I;16").save(buf, format="PNG")
    return buf.getvalue()
