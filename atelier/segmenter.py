"""SAM 2 / SAM 2.1 segmentation from point and box prompts, on Meta's ``sam2`` package.

``make_handle(spec)`` reads a checkpoint's tensor names and shapes and recognises which of the eight official
models it is (2.0 or 2.1; tiny, small, base+, large) from the weights alone; ``load(handle)`` builds that model
from the ``sam2`` package's own YAML config and loads the weights; ``segment(model, image, prompts, ...)`` runs
``sam2.sam2_image_predictor.SAM2ImagePredictor`` on each image: the image embedding once, then one prediction per
object. Prompts come from the nodes as JSON strings; the parsers here are pure functions.

Conventions are ComfyUI's (IMAGE BHWC float in [0, 1], MASK BHW, 1 = object). Importing this module imports
``sam2``: without the package the import fails with ``ModuleNotFoundError`` naming it, which is how the pack
leaves the SAM2 nodes out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import weights
from .errors import InputError, ModelFileError
from .images import check_image
from .memory import dtype_name, is_cuda, resolve_dtype
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

# the package this stage needs: a missing one surfaces here, at import, as ModuleNotFoundError naming the package
# to install (sam2's own dependencies by their pip names: sam2 installed with --no-deps lacks them)
_PIP_NAMES = {"hydra": "hydra-core", "omegaconf": "omegaconf", "iopath": "iopath", "antlr4": "antlr4-python3-runtime"}
try:
    import sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor
except ModuleNotFoundError as e:
    top = (e.name or "").split(".")[0]
    if top in _PIP_NAMES:
        raise ModuleNotFoundError(f"the sam2 package needs '{_PIP_NAMES[top]}' (pip install {_PIP_NAMES[top]})",
                                  name=_PIP_NAMES[top]) from e
    raise

log = logging.getLogger("atelier")

# ------------------------------------------------------------------------------------------ recognition

# (Hiera embed dim, number of Hiera blocks) -> size; both read off the weights
_SIZES = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base_plus", (144, 48): "large"}
_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
_LABEL = {"tiny": "tiny", "small": "small", "base_plus": "base+", "large": "large"}
# keys that exist only in SAM 2.1 checkpoints (no_obj_embed_spatial: true; proj_tpos_enc_in_obj_ptrs: true)
_V21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")

_PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"
_BLOCK_PREFIX = "image_encoder.trunk.blocks."

# what build_sam2(..., apply_postprocessing=True) adds to every config: the official image predictor's behaviour
_POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


@dataclass(frozen=True)
class SAM2Arch:
    """Which official SAM 2 model a checkpoint is."""

    version: str  # "2.0" or "2.1"
    size: str  # tiny, small, base_plus, large

    @property
    def config_name(self) -> str:
        """The config's name inside the sam2 package, as ``build_sam2`` takes it."""
        if self.version == "2.1":
            return f"configs/sam2.1/sam2.1_hiera_{_SUFFIX[self.size]}.yaml"
        return f"configs/sam2/sam2_hiera_{_SUFFIX[self.size]}.yaml"

    @property
    def config_path(self) -> Path:
        return Path(sam2.__file__).parent / self.config_name

    @property
    def label(self) -> str:
        return f"SAM {self.version} {_LABEL[self.size]}"


ALL_ARCHS = tuple(SAM2Arch(v, s) for v in ("2.0", "2.1") for s in _SUFFIX)

_WHAT = ("a SAM 2 or SAM 2.1 checkpoint (sam2_hiera_* / sam2.1_hiera_*: tiny, small, base+ or large) in Meta's "
         "key names")
_GET_IT = ("Use the official checkpoints (e.g. sam2.1_hiera_base_plus.pt from facebook/sam2.1-hiera-base-plus) "
           "or a .safetensors conversion that keeps their key names, in models/sam2.")


def recognise(shapes: Mapping[str, Sequence[int]], name: str = "the checkpoint") -> SAM2Arch:
    """The SAM 2 model whose weights have these names and shapes, or a ModelFileError saying what was found."""
    if _PATCH_EMBED not in shapes:
        raise ModelFileError(_WHAT, f"{name} without '{_PATCH_EMBED}' ({_describe_keys(shapes)})", _GET_IT)
    embed_dim = int(shapes[_PATCH_EMBED][0])
    blocks = {k[len(_BLOCK_PREFIX):].split(".", 1)[0] for k in shapes if k.startswith(_BLOCK_PREFIX)}
    n_blocks = len(blocks)
    size = _SIZES.get((embed_dim, n_blocks))
    if size is None:
        known = ", ".join(f"{_LABEL[s]} = {d}/{b}" for (d, b), s in _SIZES.items())
        raise ModelFileError(_WHAT, f"{name} with a Hiera image encoder of embed dim {embed_dim} and {n_blocks} "
                                    f"blocks (known: {known})", _GET_IT)
    if "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight" not in shapes:
        raise ModelFileError(_WHAT, f"{name} with a Hiera encoder but no SAM 2 mask decoder", _GET_IT)
    version = "2.1" if any(k in shapes for k in _V21_KEYS) else "2.0"
    return SAM2Arch(version=version, size=size)


def _describe_keys(shapes: Mapping[str, Sequence[int]]) -> str:
    keys = list(shapes)
    if not keys:
        return "no tensors"
    hint = ""
    if any(k.startswith("image_encoder.blocks.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys):
        hint = "; this looks like a SAM 1 checkpoint, which these nodes do not read"
    elif any(k.startswith(("vision_encoder.", "model.vision_encoder.")) for k in keys):
        hint = "; this looks like a Hugging Face transformers conversion, which these nodes do not read"
    return f"{len(keys)} tensors such as '{keys[0]}'{hint}"


# --------------------------------------------------------------------------------------------- reading


def _strip_prefix(names: list[str]) -> str:
    """A 'model.' prefix on every key (some conversions keep the checkpoint's top-level name) is dropped."""
    return "model." if names and all(n.startswith("model.") for n in names) else ""


def read_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` (``weights_only=True``; official files hold them under "model") or ``.safetensors``."""
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(_WHAT, f"no file at '{path}'", "Put the checkpoint in models/sam2 and refresh (R).")
    if Path(path).suffix.lower() not in (".pt", ".safetensors"):
        raise ModelFileError(f"{_WHAT}, as .pt or .safetensors", f"'{Path(path).name}'", _GET_IT)
    tensors = weights.read_state_dict(path, what=f"{_WHAT}, loadable with weights_only=True (plain tensors)",
                                      fix=_GET_IT, mmap=mmap)
    prefix = _strip_prefix(list(tensors))
    return {k[len(prefix):]: v for k, v in tensors.items()}


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names -> shapes, cheaply: the .safetensors header, or a memory-mapped .pt."""
    path = str(path)
    if Path(path).suffix.lower() == ".safetensors" and os.path.isfile(path):
        try:
            header = weights.read_safetensors_header(path)
        except ModelFileError as e:
            raise ModelFileError(_WHAT, f"'{Path(path).name}' ({e.received})", _GET_IT) from e
        prefix = _strip_prefix(list(header))
        return {k[len(prefix):]: tuple(v["shape"]) for k, v in header.items()}
    return {k: tuple(v.shape) for k, v in read_state_dict(path, mmap=True).items()}


# ------------------------------------------------------------------------------------------- spec/handle


@dataclass(frozen=True)
class SAM2Spec:
    """What the loader was asked for; equal specs share one loaded model. ``stamp`` (size, mtime) makes a file
    replaced under the same name another spec, so it is loaded anew."""

    path: str
    dtype: str = "auto"
    device: str = "cpu"
    stamp: tuple = ()


@dataclass(frozen=True)
class SAM2Handle:
    """What the loader outputs (ATELIER_SAM2): the spec and what was read off the weights."""

    spec: SAM2Spec
    arch: SAM2Arch
    dtype: str  # resolved: bf16 / fp16 / fp32
    weight_bytes: int  # parameters in the run dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """Weights are stored in ``dtype`` on GPUs; on the CPU they stay fp32 and bf16/fp16 run through autocast
    (CPU layer norms refuse half-precision weights with full-precision activations)."""
    return dtype if is_cuda(device) else torch.float32


def make_handle(spec: SAM2Spec, free_vram: int | None = None) -> SAM2Handle:
    """Recognise the checkpoint and resolve the dtype without building the model (``free_vram``: unused, SAM2
    always runs on its device)."""
    shapes = read_shapes(spec.path)
    arch = recognise(shapes, f"'{Path(spec.path).name}'")
    dtype = resolve_dtype(spec.dtype, spec.device)
    n = sum(math.prod(s) for s in shapes.values())
    return SAM2Handle(spec=spec, arch=arch, dtype=dtype_name(dtype),
                      weight_bytes=n * _itemsize(weight_dtype(dtype, spec.device)))


def need_bytes(handle: SAM2Handle, free_vram: int | None = None) -> int:
    """VRAM to make room for: the weights and the activations of one 1024² image."""
    return handle.weight_bytes + (768 << 20 if handle.arch.size == "large" else 512 << 20)


def summary(handle: SAM2Handle, model: SAM2Model | None = None) -> str:
    return with_notes(f"{Path(handle.spec.path).name}: {handle.arch.label}, {handle.dtype}, {handle.spec.device}",
                      model)


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class SAM2Model:
    """A built SAM2Base with its image predictor (registry entry: resident_bytes, device, close())."""

    sam: Any
    predictor: Any
    handle: SAM2Handle
    dtype: torch.dtype
    device: torch.device
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    _embedded: tuple | None = field(default=None, repr=False)  # key of the image the predictor holds

    @property
    def resident_bytes(self) -> int:
        if self.sam is None:
            return 0
        return sum(t.numel() * t.element_size() for t in list(self.sam.parameters()) + list(self.sam.buffers()))

    def autocast(self):
        """bf16/fp16 run under autocast (the predictor feeds fp32 images and prompts); fp32 runs as is."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def close(self) -> None:
        self.predictor, self.sam, self._embedded = None, None, None


def build_model(arch: SAM2Arch, state_dict: Mapping[str, torch.Tensor], name: str = "the checkpoint"):
    """SAM2Base from the sam2 package's YAML config for ``arch``, holding ``state_dict`` (no random init)."""
    from accelerate import init_empty_weights
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Read the YAML directly rather than through hydra's global config search: another custom node may have
    # initialised hydra for its own configs. Same config and overrides as sam2.build_sam.build_sam2.
    cfg = OmegaConf.load(arch.config_path)
    cfg.model.sam_mask_decoder_extra_args = dict(_POSTPROCESSING)
    OmegaConf.resolve(cfg)
    with init_empty_weights(include_buffers=False):
        sam = instantiate(cfg.model, _recursive_=True)
    expected = sam.state_dict()
    report = weights.mismatch_report({k: v.shape for k, v in expected.items()}, state_dict)
    if report:
        raise ModelFileError(f"every weight of {arch.label} ({arch.config_name})", f"{name} with {report}",
                             "The file is incomplete or a modified model; use the original checkpoint.")
    sam.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
    return sam


def load(handle: SAM2Handle) -> SAM2Model:
    """Build the model ``handle`` describes on its device and dtype."""
    spec, arch = handle.spec, handle.arch
    device = torch.device(spec.device)
    dtype = resolve_dtype(handle.dtype, device)
    t0 = time.perf_counter()
    name = f"'{Path(spec.path).name}'"
    log.info("Atelier: loading %s from %s (%s on %s)", arch.label, spec.path, dtype_name(dtype), device)
    state = read_state_dict(spec.path)
    found = recognise({k: tuple(v.shape) for k, v in state.items()}, name)
    if found != arch:  # the file changed since the loader looked at it
        raise ModelFileError(f"{arch.label} (what the loader read from {name})", f"now {found.label}",
                             "The file was replaced after the loader read it; queue the prompt again.")
    sam = build_model(arch, state, name)
    del state
    sam = sam.to(device=device, dtype=weight_dtype(dtype, device)).eval()
    predictor = SAM2ImagePredictor(sam)  # mask_threshold 0, no hole filling: needs no CUDA extension
    model = SAM2Model(sam=sam, predictor=predictor, handle=handle, dtype=dtype, device=device)
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: %s ready in %.1f s", arch.label, model.load_seconds)
    return model


STAGE = Stage(group="sam2", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompts:
    """Parsed prompts, in image pixels. Each box is one object (with every point added to it); without boxes all
    points together are one object."""

    points: tuple[tuple[float, float], ...] = ()
    negative_points: tuple[tuple[float, float], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def n_objects(self) -> int:
        return len(self.boxes) if self.boxes else (1 if self.points else 0)

    def objects(self) -> list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
        """(point_coords N×2, point_labels N, box 4) per object, as SAM2ImagePredictor.predict takes them."""
        coords = labels = None
        if self.points or self.negative_points:
            coords = np.array(list(self.points) + list(self.negative_points), dtype=np.float32).reshape(-1, 2)
            labels = np.array([1] * len(self.points) + [0] * len(self.negative_points), dtype=np.int32)
        if not self.boxes:
            return [(coords, labels, None)]
        return [(coords, labels, np.array(b, dtype=np.float32)) for b in self.boxes]


_POINTS_FORMAT = '[{"x": 120, "y": 80}, ...] or [[120, 80], ...] (pixels)'
_BOXES_FORMAT = "[[x0, y0, x1, y1], ...] (pixels, top-left and bottom-right corners)"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _load_json(text: Any, name: str, fmt: str) -> Any:
    if text is None:
        return []
    if not isinstance(text, str):
        return text  # already parsed (a list from another node)
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{name} as JSON: {fmt}", f"text that is not valid JSON ({e.msg} at character {e.pos}: "
                                                   f"{_snippet(text)})",
                         "Check the brackets, commas and quotes (JSON needs double quotes), or leave it empty.") from e
    except RecursionError:
        raise InputError(f"{name} as JSON: {fmt}", "brackets nested too deep to read",
                         "Write a flat list of points or boxes; nothing here nests deeper than two levels.") from None


def _snippet(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def parse_points(text: Any, name: str = "points") -> list[tuple[float, float]]:
    """Points as JSON ``[{"x": .., "y": ..}, ...]`` (ComfyUI SAM3 nodes, KJNodes' points editor) or
    ``[[x, y], ...]``, in pixels. Empty text, ``[]`` or ``null`` = no points."""
    data = _load_json(text, name, _POINTS_FORMAT)
    if data is None:
        return []
    if isinstance(data, dict) or (isinstance(data, list) and len(data) == 2 and all(_number(v) is not None
                                                                                      for v in data)):
        data = [data]  # a single point
    if not isinstance(data, list):
        raise InputError(f"{name} as a JSON list: {_POINTS_FORMAT}", f"a JSON {type(data).__name__}",
                         "Wrap the points in [ ].")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            x, y = _number(item.get("x")), _number(item.get("y"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            x, y = _number(item[0]), _number(item[1])
        else:
            x = y = None
        if x is None or y is None:
            raise InputError(f"each entry of {name} as {{\"x\": number, \"y\": number}} or [x, y]",
                             f"entry {i}: {json.dumps(item)[:80]}", f"Write the points as {_POINTS_FORMAT}.")
        out.append((x, y))
    return out


def parse_boxes(text: Any, name: str = "boxes") -> list[tuple[float, float, float, float]]:
    """Boxes as JSON ``[[x0, y0, x1, y1], ...]`` in pixels (one object per box); a single ``[x0, y0, x1, y1]`` too.
    Empty text, ``[]`` or ``null`` = no boxes."""
    data = _load_json(text, name, _BOXES_FORMAT)
    if data is None:
        return []
    if isinstance(data, list) and len(data) == 4 and all(_number(v) is not None for v in data):
        data = [data]  # a single box
    if not isinstance(data, list):
        raise InputError(f"{name} as a JSON list: {_BOXES_FORMAT}", f"a JSON {type(data).__name__}",
                         "Wrap the boxes in [ ].")
    out = []
    for i, item in enumerate(data):
        vals = [_number(v) for v in item] if isinstance(item, (list, tuple)) and len(item) == 4 else None
        if vals is None or any(v is None for v in vals):
            raise InputError(f"each entry of {name} as [x0, y0, x1, y1] (four numbers)",
                             f"entry {i}: {json.dumps(item)[:80]}", f"Write the boxes as {_BOXES_FORMAT}.")
        x0, y0, x1, y1 = vals
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"each box of {name} with x1 > x0 and y1 > y0 (top-left, then bottom-right corner)",
                             f"box {i}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}]",
                             "Give the top-left corner first, then the bottom-right one.")
        out.append((x0, y0, x1, y1))
    return out


def parse_prompts(points: Any = "", negative_points: Any = "", boxes: Any = "") -> Prompts:
    """Parse the three prompt inputs; there must be something to segment."""
    p = Prompts(points=tuple(parse_points(points, "points")),
                negative_points=tuple(parse_points(negative_points, "negative_points")),
                boxes=tuple(parse_boxes(boxes, "boxes")))
    if p.n_objects == 0:
        got = "no points and no boxes" + (" (only negative points)" if p.negative_points else "")
        raise InputError("at least one point (one object made of all points) or one box (one object per box)",
                         got, f'Click the object: points {_POINTS_FORMAT}, or draw boxes {_BOXES_FORMAT}.')
    return p


def check_inside(prompts: Prompts, width: int, height: int) -> None:
    """Every point and box lies on the image (0 ≤ x ≤ width, 0 ≤ y ≤ height, in pixels)."""
    for name, pts in (("points", prompts.points), ("negative_points", prompts.negative_points)):
        for i, (x, y) in enumerate(pts):
            if not (0 <= x <= width and 0 <= y <= height):
                raise InputError(f"{name} inside the {width}×{height} image (0 ≤ x ≤ {width}, 0 ≤ y ≤ {height}, "
                                 "in pixels)", f"point {i} at ({x:g}, {y:g})",
                                 "Points are pixel coordinates of this image; if they were picked on another size "
                                 "of it, pick them again on this one.")
    for i, (x0, y0, x1, y1) in enumerate(prompts.boxes):
        if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
            raise InputError(f"boxes inside the {width}×{height} image (0 ≤ x ≤ {width}, 0 ≤ y ≤ {height}, "
                             "in pixels)", f"box {i}: [{x0:g}, {y0:g}, {x1:g}, {y1:g}]",
                             "Boxes are pixel coordinates of this image; draw the box again on this image.")


# ------------------------------------------------------------------------------------------------ segment


def _image_key(arr: np.ndarray) -> tuple:
    return arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def set_image(model: SAM2Model, image_hwc: np.ndarray) -> None:
    """Embed one image (HWC float32 in [0, 1]); kept until another image is set, so re-running the same image
    with other prompts skips the image encoder."""
    if model.predictor is None:
        raise released("SAM2 model")
    key = _image_key(image_hwc)
    if model._embedded == key:
        return
    model._embedded = None
    with torch.inference_mode(), model.autocast():
        model.predictor.set_image(image_hwc)
    model._embedded = key


def predict_object(predictor, coords: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None,
                   multimask: bool, autocast=None) -> tuple[np.ndarray, float]:
    """One object's mask (H×W bool) and score on the predictor's current image; with ``multimask`` the
    best-scoring of SAM's three masks."""
    with torch.inference_mode(), (autocast or contextlib.nullcontext()):
        masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                             multimask_output=multimask)
    best = int(np.argmax(scores)) if multimask else 0
    return masks[best] > 0, float(scores[best])


def segment(model: SAM2Model, image: torch.Tensor, prompts: Prompts, multimask: bool = False,
            progress: Progress | None = None) -> torch.Tensor:
    """Masks of every object in every image: MASK ``[images × objects, H, W]``, 1 = object.

    Order: image-major. Mask ``i * n_objects + j`` is object ``j`` (box ``j``, or the points' object) in image
    ``i``; with one image that is simply one mask per object. The same prompts apply to every image of the
    batch. ``progress`` steps once per object (a Stop point between objects).
    """
    progress = progress or NullProgress()
    image = check_image(image)
    b, h, w, _ = image.shape
    check_inside(prompts, w, h)
    objects = prompts.objects()
    out = torch.zeros((b * len(objects), h, w), dtype=torch.float32)
    for i in range(b):
        arr = np.ascontiguousarray(image[i].detach().clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False))
        set_image(model, arr)
        for j, (coords, labels, box) in enumerate(objects):
            mask, score = predict_object(model.predictor, coords, labels, box, multimask, model.autocast())
            out[i * len(objects) + j] = torch.from_numpy(mask.astype(np.float32))
            log.debug("Atelier: SAM2 image %d object %d: score %.3f, %d px", i, j, score, int(mask.sum()))
            progress.step(1)
    return out
