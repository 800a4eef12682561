"""Monocular depth (Depth Anything V2, DPT and the other transformers depth estimators) for try-on ControlNets.

A model is a transformers folder in models/depth (config.json, model.safetensors, preprocessor_config.json), loaded
with ``AutoModelForDepthEstimation`` and ``AutoImageProcessor`` from that folder only: no remote code, safetensors
only. ``estimate(model, image, resolution)`` does what transformers' ``depth-estimation`` pipeline does for each
picture (8-bit RGB through the folder's image processor, the model, ``post_process_depth_estimation`` resized to the
picture, min–max normalised) and returns the depth as an IMAGE (near = bright for relative-depth models such as
Depth Anything and DPT), keeping full float precision where the pipeline rounds to 8 bits.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError
from .images import check_image
from .memory import dtype_name, is_cuda, resolve_dtype, transformers_dtype_kwarg
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

GROUP = "depth"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_NEEDED = ("config.json", "preprocessor_config.json")
_GET_IT = ("Put the whole transformers folder (config.json, model.safetensors, preprocessor_config.json), e.g. "
           "depth-anything/Depth-Anything-V2-Small-hf or Intel/dpt-hybrid-midas, in models/depth.")


def is_depth_folder(path: str | os.PathLike) -> bool:
    """A folder whose config.json names a depth-estimation architecture."""
    try:
        with open(Path(path) / "config.json", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return any("DepthEstimation" in a for a in cfg.get("architectures") or []) or cfg.get("model_type") in (
        "depth_anything", "dpt", "glpn", "zoedepth", "depth_pro", "prompt_depth_anything")


@dataclass(frozen=True)
class DepthSpec:
    path: str
    device: str = "cpu"
    dtype: str = "auto"
    stamp: tuple = ()


@dataclass(frozen=True)
class DepthHandle:
    spec: DepthSpec
    model_type: str
    dtype: str
    weight_bytes: int


def folder_stamp(path: str | os.PathLike) -> tuple:
    out = []
    for name in (*_NEEDED, *WEIGHTS):
        try:
            st = os.stat(Path(path) / name)
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


def make_handle(spec: DepthSpec, free_vram: int | None = None) -> DepthHandle:
    """Check the folder (every file named when something is missing); loads nothing."""
    folder = Path(spec.path)
    missing = [n for n in _NEEDED if not (folder / n).is_file()]
    weights = [folder / n for n in WEIGHTS if (folder / n).is_file()]
    if not weights:
        missing.append("model.safetensors" + (" (.bin files are not read)" if (folder / "pytorch_model.bin")
                                              .is_file() else ""))
    if missing:
        raise ModelFileError("a transformers depth folder: config.json, model.safetensors, preprocessor_config.json",
                             f"'{folder}' without {', '.join(missing)}", _GET_IT)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelFileError("a readable config.json", f"'{folder / 'config.json'}' ({e})", _GET_IT) from e
    if not is_depth_folder(folder):
        raise ModelFileError("a depth-estimation model (architectures …ForDepthEstimation)",
                             f"'{folder.name}' with architectures {cfg.get('architectures')}, model_type "
                             f"{cfg.get('model_type')!r}", _GET_IT)
    n = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    dtype = resolve_dtype(spec.dtype, spec.device)
    return DepthHandle(spec=spec, model_type=str(cfg.get("model_type")), dtype=dtype_name(dtype), weight_bytes=n)


def need_bytes(handle: DepthHandle, free_vram: int | None = None) -> int:
    return handle.weight_bytes + (512 << 20) if is_cuda(handle.spec.device) else 0


@dataclass
class DepthModel:
    handle: DepthHandle
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        if self.model is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def close(self) -> None:
        self.model = self.processor = None


def load(handle: DepthHandle) -> DepthModel:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    spec = handle.spec
    device = torch.device(spec.device)
    dtype = resolve_dtype(handle.dtype, device)
    try:
        processor = AutoImageProcessor.from_pretrained(spec.path, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(spec.path, local_files_only=True, use_safetensors=True,
                                                            **{transformers_dtype_kwarg(): dtype})
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError("a depth model transformers can load", f"'{Path(spec.path).name}' "
                             f"({type(e).__name__}: {str(e)[:200]})", _GET_IT) from e
    model = model.to(device).eval()
    return DepthModel(handle=handle, model=model, processor=processor, device=device, dtype=dtype)


def summary(handle: DepthHandle, model: DepthModel | None = None) -> str:
    return with_notes(f"{Path(handle.spec.path).name}: {handle.model_type}, {handle.dtype}, {handle.spec.device}",
                      model)


STAGE = Stage(group=GROUP, make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


def _size_override(processor: Any, resolution: int) -> dict:
    """Processor kwargs that make the model see ``resolution`` (its size key kept: height/width or shortest_edge)."""
    if resolution <= 0:
        return {}
    size = getattr(processor, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    if "shortest_edge" in size:
        return {"size": {"shortest_edge": resolution}}
    return {"size": {"height": resolution, "width": resolution}}


MIN_SIDE = 14  # one ViT patch: a smaller picture gives an empty depth map
MAX_ASPECT = 8  # the processors scale the long side to ~518 px: a longer strip would leave a side of 0 patches


def _pad_strip(pil):
    """A picture under MIN_SIDE or with an aspect ratio over MAX_ASPECT, padded (centred, edge colour) so the processor keeps both
    sides; returns (picture, (left, top) of the original in it): the depth is cropped back to the original."""
    from PIL import ImageOps

    w, h = pil.size
    nw, nh = max(w, MIN_SIDE, -(-h // MAX_ASPECT)), max(h, MIN_SIDE, -(-w // MAX_ASPECT))
    if (nw, nh) == (w, h):
        return pil, (0, 0)
    left, top = (nw - w) // 2, (nh - h) // 2
    return ImageOps.expand(pil, (left, top, nw - w - left, nh - h - top), fill=pil.getpixel((0, 0))), (left, top)


def estimate(model: DepthModel, image: torch.Tensor, resolution: int = 0,
             progress: Progress | None = None) -> torch.Tensor:
    """Depth of every picture (IMAGE BHWC) → IMAGE BHWC, grey, each picture min–max normalised to [0, 1].

    ``resolution``: the side the model sees (0 = the processor's own size, e.g. 518 for Depth Anything)."""
    from PIL import Image

    from .layer_files import to_uint8

    if model.model is None:
        raise released("depth model")
    progress = progress or NullProgress()
    image = check_image(image)
    b, h, w, _ = image.shape
    out = torch.empty((b, h, w, 3), dtype=torch.float32)
    extra = _size_override(model.processor, resolution)
    for i in range(b):
        pil, (left, top) = _pad_strip(Image.fromarray(to_uint8(image[i].detach().cpu().numpy())))
        inputs = model.processor(images=pil, return_tensors="pt", **extra).to(model.dtype)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = model.model(**inputs)
            depth = model.processor.post_process_depth_estimation(outputs, [(pil.height, pil.width)])[0][
                "predicted_depth"]
        d = depth.float().cpu()[top:top + h, left:left + w]
        lo, hi = d.min(), d.max()
        d = (d - lo) / (hi - lo) if hi > lo else torch.zeros_like(d)
        out[i] = d[..., None].expand(h, w, 3)
        progress.step(1)
    return out
