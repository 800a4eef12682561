"""Background removal: the rembg family of ONNX models through onnxruntime, BiRefNet / RMBG-2.0 through torch.

``load(spec)`` builds a :class:`BgRemoverModel` from one file; ``remove(model, image, ...)`` returns the object on
black (IMAGE) and its alpha (MASK). Both are plain functions over torch tensors in ComfyUI's conventions, tested
without ComfyUI.

ONNX models (u²-net, u²-net-p, u²-net human seg, silueta, ISNet general / anime, BiRefNet and BRIA RMBG-2.0
exports) reproduce rembg's own pre- and post-processing for that model (``rembg/sessions/*.py``, rembg 2.0.x):
the same LANCZOS resizes through Pillow, the same division by the image's brightest value, the same mean/std,
the same first output, min-max normalisation and 8-bit mask, so a file gives the masks rembg gives.

``.safetensors`` / ``.pth`` BiRefNet and RMBG-2.0 checkpoints are built by :mod:`atelier.birefnet` (our own
architecture code, no remote code) and run in torch: resize to ``resolution``, ImageNet mean/std, sigmoid of the
last prediction, resize back.

Extension points are tables: a remover family (name hints, graph signature, input size, mean/std, sigmoid) is one
row of :data:`FAMILIES`; a torch architecture (module, recognise, build, pre/post-processing) is one row of
:data:`TORCH_ARCHS`.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AtelierError, InputError, ModelFileError, SettingError, describe_error
from .images import check_image, to_bchw, to_uint8
from .memory import GiB, dtype_name, is_cuda, resolve_dtype
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes
from .weights import file_stamp, read_state_dict

log = logging.getLogger("atelier")

ONNX_EXTENSIONS = (".onnx",)
TORCH_EXTENSIONS = (".safetensors", ".pth")
MODEL_EXTENSIONS = ONNX_EXTENSIONS + TORCH_EXTENSIONS
DEVICES: tuple[str, ...] = ("auto", "cpu")
MULTIPLE = 32  # models whose input size is free take sides that are multiples of this (5 stride-2 stages)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Graph:
    """What an ONNX graph shows of itself: its image input's name and fixed side (None when dynamic or not square)
    and how many outputs it has."""

    input_name: str
    side: int | None
    outputs: int


@dataclass(frozen=True)
class Family:
    """One kind of background-removal model: how it is recognised and how it wants its input (numbers from rembg's
    sessions). Adding a family is one row of :data:`FAMILIES`.

    ``names``: (rank, regular expression searched in the lower-case file name); the rules of every family are tried
    by rank, the first match names the family (so "birefnet-dis" is BiRefNet before "dis" makes it ISNet).
    ``hint``: how file names announce it, for the rename advice. ``graph``: (rank, test of the :class:`Graph`) for
    files whose name says nothing, tried by rank the same way.
    """

    key: str
    label: str
    size: int  # rembg's input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sigmoid: bool  # the first output is logits (rembg applies a sigmoid before min-max)
    rembg: str  # the rembg session(s) whose processing this reproduces
    names: tuple[tuple[int, str], ...] = ()
    hint: str = ""
    graph: tuple[int, Callable[[Graph], bool]] | None = None


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("u2net", "U²-Net (u2net, u2netp, u2net_human_seg, silueta)", 320, IMAGENET_MEAN, IMAGENET_STD, False,
           "u2net, u2netp, u2net_human_seg, silueta, u2net_custom",
           names=((60, r"u2net|silueta"),), hint="u2net / u2netp / silueta (U²-Net)",
           graph=(10, lambda g: g.side == 320)),
    Family("isnet-general", "ISNet general use (DIS)", 1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), False,
           "isnet-general-use, dis_custom",
           names=((30, r"^(?=.*(rmbg|bria))(?=.*1[._-]?4)"), (50, r"isnet|(^|[^a-z0-9])dis([^a-z0-9]|$)")),
           hint="isnet (ISNet general), rmbg-1.4 (ISNet-based)",
           graph=(40, lambda g: g.side == 1024 and g.outputs >= 2)),  # six side outputs (+ feature maps)
    Family("isnet-anime", "ISNet anime", 1024, IMAGENET_MEAN, (1.0, 1.0, 1.0), False, "isnet-anime",
           names=((10, r"anime"),), hint="anime (ISNet anime)"),
    Family("birefnet", "BiRefNet", 1024, IMAGENET_MEAN, IMAGENET_STD, True, "birefnet-*",
           names=((20, r"birefnet"),), hint="birefnet",
           graph=(20, lambda g: g.input_name == "input_image")),
    Family("bria-rmbg", "BRIA RMBG-2.0 (ONNX)", 1024, IMAGENET_MEAN, IMAGENET_STD, False, "bria-rmbg",
           names=((40, r"rmbg|bria"),), hint="rmbg-2.0 / bria (RMBG-2.0)",
           graph=(30, lambda g: g.input_name == "pixel_values")),
)}
FAMILY_CHOICES: tuple[str, ...] = ("auto", *FAMILIES)



def name_hint() -> str:
    """How file names announce each family (the advice when a file cannot be recognised)."""
    return ", ".join(f.hint for f in FAMILIES.values() if f.hint)

# files of the same formats that are not background removers: (pattern in the lower-case name, what it is, use)
_NOT_REMOVERS = (
    (r"cloth", "u2net_cloth_seg: three garment masks", "Use u2net / isnet / BiRefNet for background removal."),
    (r"(^|[^a-z0-9])sam([^a-z0-9]|$)", "a Segment Anything model: needs points or boxes",
     "Use Atelier's SAM2 nodes for prompted segmentation."),
)


def family_from_name(file_name: str) -> str | None:
    """The family a file name announces (rembg's and the model authors' usual names), or None."""
    n = Path(file_name).name.lower()
    for pattern, what, fix in _NOT_REMOVERS:
        if re.search(pattern, n):
            raise ModelFileError("a background-removal model (one foreground mask)",
                                 f"'{Path(file_name).name}' ({what})", fix)
    rules = sorted((rank, pattern, f.key) for f in FAMILIES.values() for rank, pattern in f.names)
    return next((key for _, pattern, key in rules if re.search(pattern, n)), None)


def family_from_graph(input_name: str, input_shape: list[Any], n_outputs: int) -> str | None:
    """The family an ONNX graph's signature shows (input name and size, output count), or None if unclear.

    Known signatures: u²-net family exports take 320×320 ('input.1', 7 outputs); ISNet takes 1024×1024 with six
    side outputs (and sometimes its feature maps); BiRefNet's export names its input 'input_image'; BRIA's RMBG-2.0
    export names it 'pixel_values'.
    """
    h, w = _fixed_hw(input_shape)
    graph = Graph(input_name=input_name, side=h if h == w else None, outputs=n_outputs)
    rules = sorted(((f.graph[0], f.key, f.graph[1]) for f in FAMILIES.values() if f.graph), key=lambda r: r[:2])
    return next((key for _, key, test in rules if test(graph)), None)


def _fixed_hw(shape: list[Any]) -> tuple[int | None, int | None]:
    if len(shape) != 4:
        return None, None
    h, w = shape[2], shape[3]
    return (h if isinstance(h, int) and h > 0 else None), (w if isinstance(w, int) and w > 0 else None)


# -------------------------------------------------------------------------------------------- spec, handle


@dataclass(frozen=True)
class BgRemoverSpec:
    """Everything that decides how a remover is built; equal specs share one loaded model.

    ``device`` is where it runs; ``memory_device`` (ComfyUI's device; default: ``device``) is whose memory
    manager owns it, so that Unload / POST /free release a model that runs on the CPU of a GPU machine too.
    ``stamp`` (size, mtime) makes a file replaced under the same name a new model.
    """

    path: str
    family: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"
    stamp: tuple[int, int] = (0, 0)
    memory_device: str = ""


@dataclass(frozen=True)
class BgRemoverHandle:
    """What the loader node outputs (ATELIER_BG_REMOVER): the spec and the backend its file needs. What kind of
    model it is (family, input size) is read from the file when it is loaded (:class:`BgRemoverModel`)."""

    spec: BgRemoverSpec
    backend: str  # onnxruntime / torch


def make_spec(path: str, family: str = "auto", dtype: str = "auto", device: str = "cpu",
              memory_device: str | None = None) -> BgRemoverSpec:
    check_file(path)
    if family not in FAMILY_CHOICES:
        raise SettingError(f"family one of {', '.join(FAMILY_CHOICES)}", repr(family), "Pick one of the listed values.")
    resolve_dtype(dtype, device)  # raises on an unknown dtype
    return BgRemoverSpec(path=str(path), family=family, dtype=dtype, device=str(device), stamp=file_stamp(path),
                         memory_device=str(memory_device or device))


def check_file(path: str) -> None:
    name = Path(path).name
    if not os.path.isfile(path):
        raise ModelFileError(f"the background-removal model file '{name}'", "no such file",
                             "Put the model in models/background_removal and refresh (R).")
    if Path(path).suffix.lower() not in MODEL_EXTENSIONS:
        raise ModelFileError(f"a background-removal model ({', '.join(MODEL_EXTENSIONS)})", f"'{name}'",
                             "Use an .onnx model of the rembg family or a BiRefNet / RMBG-2.0 .safetensors file.")


def make_handle(spec: BgRemoverSpec, free_vram: int | None = None) -> BgRemoverHandle:
    """Check the file and pick the backend its format needs; nothing is loaded."""
    check_file(spec.path)
    onnx = Path(spec.path).suffix.lower() in ONNX_EXTENSIONS
    return BgRemoverHandle(spec=spec, backend="onnxruntime" if onnx else "torch")


def need_bytes(handle: BgRemoverHandle, free_vram: int | None = None) -> int:
    """Bytes to free on the GPU before loading (weights + 1024² activations); 0 when it will run on the CPU."""
    spec = handle.spec
    if not is_cuda(spec.device):
        return 0
    if handle.backend == "onnxruntime" and not _onnx_cuda_available():
        return 0
    return file_stamp(spec.path)[0] + int(1.5 * GiB)


def summary(handle: BgRemoverHandle, model: BgRemoverModel | None = None) -> str:
    name = Path(handle.spec.path).name
    if model is None:
        return f"{name}: via {handle.backend}"
    size = f"{model.resolution}×{model.resolution}" + (" (fixed)" if model.fixed_size is not None else " (default)")
    return with_notes(f"{name}: {model.family.label} via {model.backend}, input {size}", model)


# ---------------------------------------------------------------------------------------------- the models


@dataclass
class BgRemoverModel(abc.ABC):
    """A loaded remover. Subclasses run one image and return its mask at the image's size.

    ``run_device``: where it computes. ``device`` and ``resident_bytes``: what ComfyUI's memory management counts
    (the spec's memory device; bytes held on a GPU, 0 when it runs on the CPU).
    """

    spec: BgRemoverSpec
    family: Family
    backend: str
    run_device: torch.device
    resolution: int
    fixed_size: int | None = None
    resident_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return Path(self.spec.path).name

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.memory_device or self.spec.device)

    def check_resolution(self, resolution: int) -> int:
        """The input side to run at: ``resolution``, or the model's default for 0."""
        resolution = int(resolution)
        if resolution == 0:
            return self.resolution
        if self.fixed_size is not None and resolution != self.fixed_size:
            raise InputError(
                f"resolution 0 or {self.fixed_size} for '{self.name}' (its ONNX graph takes only "
                f"{self.fixed_size}×{self.fixed_size} input)", str(resolution),
                "Set resolution to 0 (the model's default).")
        if resolution < MULTIPLE or resolution % MULTIPLE:
            raise InputError(f"resolution 0 (the model's default, {self.resolution}) or a multiple of {MULTIPLE}",
                             str(resolution), f"Try {max(MULTIPLE, round(resolution / MULTIPLE) * MULTIPLE)}.")
        return resolution

    @abc.abstractmethod
    def predict(self, image: torch.Tensor, resolution: int) -> torch.Tensor:
        """One image (HWC float in [0, 1]) → its alpha (HW float in [0, 1]) at the same size."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the session / module so its memory can go."""


def load(handle: BgRemoverHandle) -> BgRemoverModel:
    spec = handle.spec
    check_file(spec.path)
    t0 = time.perf_counter()
    if handle.backend == "onnxruntime":
        model: BgRemoverModel = _load_onnx(spec)
    else:
        model = _load_torch(spec)
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: background remover ready in %.1f s: %s, %s via %s on %s, input %d%s%s",
             model.load_seconds, model.name, model.family.label, model.backend, model.run_device, model.resolution,
             " (fixed)" if model.fixed_size else "", "".join(f"; {n}" for n in model.notes))
    return model


STAGE = Stage(group="bg_remover", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------- ONNX


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise SettingError("the Python package onnxruntime for .onnx background-removal models",
                           "an environment without it", "pip install onnxruntime (or onnxruntime-gpu).") from e
    return onnxruntime


def _onnx_cuda_available() -> bool:
    try:
        return "CUDAExecutionProvider" in _onnxruntime().get_available_providers()
    except SettingError:
        return False


@dataclass
class OnnxRemover(BgRemoverModel):
    session: Any = None
    input_name: str = ""
    output_name: str = ""

    def predict(self, image: torch.Tensor, resolution: int) -> torch.Tensor:
        if self.session is None:
            raise released("background remover")
        rgb = to_uint8(image)
        x = rembg_input(rgb, resolution, self.family.mean, self.family.std)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        mask = rembg_mask(out, self.family.sigmoid, (rgb.shape[1], rgb.shape[0]))
        if mask is None:
            log.warning("Atelier: %s returned the same value everywhere: empty mask", self.name)
            return torch.zeros(rgb.shape[:2])
        return torch.from_numpy(mask.astype(np.float32) / 255.0)

    def close(self) -> None:
        self.session = None


def _load_onnx(spec: BgRemoverSpec) -> OnnxRemover:
    ort = _onnxruntime()
    name = Path(spec.path).name
    notes: list[str] = []
    providers: list[Any] = ["CPUExecutionProvider"]
    want_cuda = is_cuda(spec.device)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda:
        if has_cuda:
            index = torch.device(spec.device).index or 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            notes.append("runs on the CPU: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu "
                         "for the GPU)")
    if spec.dtype != "auto":
        notes.append(f"dtype {spec.dtype} ignored: an ONNX model runs in its graph's precision")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # threads sleep between operators instead of spinning: ComfyUI's process shares the CPU (same results)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(spec.path, sess_options=opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        raise ModelFileError(f"an ONNX model that onnxruntime can read in '{name}'",
                             f"a file it rejects ({describe_error(e)})",
                             "The file is damaged, incomplete or not ONNX; download it again or pick another "
                             "file.") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or not outputs:
        raise ModelFileError(f"a background-removal ONNX model in '{name}' (one image input [1, 3, H, W])",
                             f"inputs {[(i.name, i.shape) for i in inputs]}",
                             "Use a model of the rembg family (u2net, isnet, BiRefNet, RMBG-2.0).")
    inp = inputs[0]
    if inp.type not in ("tensor(float)",):
        raise ModelFileError(f"an ONNX model with a float32 image input in '{name}'", f"input type {inp.type}",
                             "Use the float32-input export of the model (rembg's files are).")
    family_key = spec.family if spec.family != "auto" else None
    how = "chosen"
    if family_key is None:
        family_key, how = family_from_name(name), "from its name"
    if family_key is None:
        family_key, how = family_from_graph(inp.name, list(inp.shape), len(outputs)), "from its graph"
    if family_key is None:
        raise ModelFileError(
            f"an ONNX model Atelier can recognise in '{name}'",
            f"input '{inp.name}' {list(inp.shape)} with {len(outputs)} output(s), and a file name that names no "
            "known model", f"Rename the file so its name says what it is: {name_hint()}.")
    family = FAMILIES[family_key]
    h, w = _fixed_hw(list(inp.shape))
    fixed = None
    if h is not None or w is not None:
        if h != w or h is None:
            raise ModelFileError(f"an ONNX model with a square input in '{name}'", f"input {list(inp.shape)}",
                                 "Export the model with a square (or dynamic) input size.")
        fixed = h
        if fixed != family.size:
            notes.append(f"the graph's input is {fixed}×{fixed} (rembg's {family.key} is {family.size})")
    device = torch.device(spec.device) if want_cuda and "CUDAExecutionProvider" in session.get_providers() \
        else torch.device("cpu")
    if want_cuda and has_cuda and device.type == "cpu":
        notes.append("runs on the CPU: onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries)")
    log.info("Atelier: %s is %s (%s)", name, family.label, how)
    return OnnxRemover(spec=spec, family=family, backend="onnxruntime", run_device=device,
                       resolution=fixed or family.size, fixed_size=fixed,
                       resident_bytes=file_stamp(spec.path)[0] if device.type == "cuda" else 0, notes=notes,
                       session=session, input_name=inp.name, output_name=outputs[0].name)


def rembg_input(rgb: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """rembg's ``BaseSession.normalize``: LANCZOS resize, divide by the brightest value, (x - mean) / std.

    Same operations in the same precision (Pillow on uint8, then float64 numpy, float32 at the end).
    """
    from PIL import Image

    im = Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.LANCZOS)
    a = np.array(im)
    a = a / max(np.max(a), 1e-6)
    x = (a - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return np.expand_dims(x.transpose((2, 0, 1)), 0).astype(np.float32)


def rembg_mask(output: np.ndarray, sigmoid: bool, size: tuple[int, int]) -> np.ndarray | None:
    """rembg's post-processing of the first output: [sigmoid], min-max, 8-bit, LANCZOS to ``size`` (w, h).

    None when the prediction is constant (rembg would divide by zero).
    """
    from PIL import Image

    pred = output[:, 0, :, :]
    if sigmoid:
        pred = 1 / (1 + np.exp(-pred))
    ma, mi = np.max(pred), np.min(pred)
    if not np.isfinite(ma) or not np.isfinite(mi) or ma - mi <= 0:
        return None
    pred = np.squeeze((pred - mi) / (ma - mi))
    # Deliberate copy of images.to_uint8's job: rembg truncates (no rounding) here, and its masks are the reference
    mask = Image.fromarray((pred.clip(0, 1) * 255).astype(np.uint8))
    return np.asarray(mask.resize(size, Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------------------------ torch


@dataclass
class TorchRemover(BgRemoverModel):
    module: Any = None
    dtype: torch.dtype = torch.float32
    arch: TorchArch | None = None

    def predict(self, image: torch.Tensor, resolution: int) -> torch.Tensor:
        if self.module is None:
            raise released("background remover")
        return self.arch.predict(self.module, image, resolution, self.run_device, self.dtype)

    def close(self) -> None:
        self.module = None


def birefnet_alpha(module: torch.nn.Module, image: torch.Tensor, resolution: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """BiRefNet / RMBG-2.0 on one HWC image: resize to ``resolution`` (bilinear, antialiased), ImageNet
    mean/std, the last prediction's sigmoid, bilinear back to the image's size. Returns HW float on the CPU."""
    import torch.nn.functional as F

    h, w = image.shape[0], image.shape[1]
    x = to_bchw(image[None].float()).to(device)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = ((x - mean) / std).to(dtype)
    with torch.inference_mode():
        out = module(x)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    prob = out.float().sigmoid()
    prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return prob[0, 0].clamp(0.0, 1.0).cpu()


@dataclass(frozen=True)
class TorchArch:
    """An architecture that ``.safetensors`` / ``.pth`` checkpoints run with in torch. Adding one is one row of
    :data:`TORCH_ARCHS` (plus its module).

    ``module``: the Atelier module with its code, imported when a checkpoint needs it; in it, ``recognise`` (the
    checkpoint's key names → bool) and ``build`` (state dict → module in eval mode, strict). ``family``: its row of
    :data:`FAMILIES` (label, input side). ``predict``: one HWC image → its HW alpha. ``files``: the checkpoints it
    runs, as users know them; ``onnx``: ONNX exports to use instead when the module is missing.
    """

    family: str
    module: str
    recognise: str
    build: str
    predict: Callable[[torch.nn.Module, torch.Tensor, int, torch.device, torch.dtype], torch.Tensor]
    label: str
    files: str
    onnx: str


TORCH_ARCHS: dict[str, TorchArch] = {a.family: a for a in (
    TorchArch("birefnet", "birefnet", "is_birefnet_state_dict", "build_birefnet", birefnet_alpha,
              "BiRefNet / RMBG-2.0", "BiRefNet's or RMBG-2.0's model.safetensors",
              "BiRefNet-general-epoch_244.onnx, bria-rmbg-2.0.onnx"),
)}


def _arch_module(arch: TorchArch, name: str):
    """The Atelier module of ``arch``, imported when a checkpoint needs it."""
    try:
        return importlib.import_module(f".{arch.module}", __package__)
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.{arch.module}", None):
            raise
        raise ModelFileError(
            f"Atelier's {FAMILIES[arch.family].label} architecture (atelier/{arch.module}.py) to run '{name}'",
            "an Atelier without it", f"Update Atelier, or use an ONNX export of the model (e.g. {arch.onnx}) in "
            "models/background_removal.") from e


def _load_torch(spec: BgRemoverSpec) -> TorchRemover:
    name = Path(spec.path).name
    state = read_state_dict(spec.path)
    keys = list(state)
    for arch in TORCH_ARCHS.values():
        code = _arch_module(arch, name)
        if getattr(code, arch.recognise)(keys):
            break
    else:
        archs = TORCH_ARCHS.values()
        raise ModelFileError(f"a {' or '.join(a.label for a in archs)} checkpoint with the official key names in "
                             f"'{name}'", f"{len(keys)} tensors named like {', '.join(keys[:3])}",
                             f"Use {' or '.join(a.files for a in archs)} as published, or an .onnx model.")
    family = FAMILIES[arch.family]
    if spec.family not in ("auto", family.key):
        raise SettingError(f"family auto or {family.key} for the checkpoint '{name}'", repr(spec.family),
                           f"This .safetensors/.pth file is a {family.label}-architecture model.")
    device = torch.device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    try:
        module = getattr(code, arch.build)(state)
    except AtelierError:
        raise
    except Exception as e:  # noqa: BLE001 - shape mismatches and the like: name the file
        raise ModelFileError(f"a {arch.label} checkpoint whose tensors fit the architecture in '{name}'",
                             describe_error(e), f"Use {arch.files} as published.") from e
    del state
    module = module.eval().to(device=device, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return TorchRemover(spec=spec, family=family, backend="torch", run_device=device, resolution=family.size,
                        resident_bytes=size if device.type == "cuda" else 0, notes=[f"dtype {dtype_name(dtype)}"],
                        module=module, dtype=dtype, arch=arch)


# --------------------------------------------------------------------------------------------------- run


def remove(model: BgRemoverModel, image: torch.Tensor, resolution: int = 0, mask_threshold: float = 0.0,
           progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the main object out of each image. IMAGE BHWC in; (object on black IMAGE BHWC, alpha MASK BHW) out.

    ``resolution`` 0 = the model's own input size. ``mask_threshold`` 0 = soft alpha; above 0 the mask is 1 where
    alpha ≥ threshold and 0 elsewhere. One progress step (a Stop point) per image.
    """
    progress = progress or NullProgress()
    image = check_image(image)
    side = model.check_resolution(resolution)
    threshold = float(mask_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise InputError("mask_threshold between 0 (soft alpha) and 1", str(mask_threshold), "Try 0.5.")
    masks = []
    for i in range(image.shape[0]):
        alpha = model.predict(image[i], side)
        masks.append(alpha)
        progress.step(1)
    mask = torch.stack(masks).float()
    if threshold > 0.0:
        mask = (mask >= threshold).float()
    return image * mask.unsqueeze(-1), mask
