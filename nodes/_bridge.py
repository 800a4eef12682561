"""The one module that touches ComfyUI: model folders, progress/Stop, memory management, custom types.

Every other node module stays thin: it converts ComfyUI values with the helpers here and calls the engine.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..atelier import flux_files, folders, guards
from ..atelier.errors import ModelFileError
from ..atelier.memory import free_cuda_bytes
from ..atelier.registry import REGISTRY
from ..atelier.stage import Stage
from ..atelier.types import FluxFillFiles
from ..atelier.weights import file_stamp

log = logging.getLogger("atelier")

# ------------------------------------------------------------------------------------------- custom types

FluxFillPipe = io.Custom("ATELIER_FLUX_FILL")
VLM = io.Custom("ATELIER_VLM")
BgRemover = io.Custom("ATELIER_BG_REMOVER")
SAM2 = io.Custom("ATELIER_SAM2")
FastComposer = io.Custom("ATELIER_FASTCOMPOSER")
Character = io.Custom("ATELIER_CHARACTER")


def _register_folder(name: str, extensions: set[str]) -> None:
    """Our model folders under models/, with explicit extensions (a new key would otherwise match any file).

    A folder core already has (0.30 registers background_removal for its own RemoveBackground node, with the
    torch extensions only) keeps core's paths (extra_model_paths.yaml included) and gets ours added; core's set
    is shared with every other folder, so it is copied, never changed. Core lists the folder while it loads its own
    nodes, before this pack, and keeps that list until the folder changes on disk: the list is dropped so the next
    one includes our extensions (0.30: a u2netp.onnx already there at start was missing from the combo).
    """
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if not extensions <= set(exts):
            folder_paths.folder_names_and_paths[name] = (paths, set(exts) | extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(name, None)


_register_folder("background_removal", {".onnx", ".safetensors", ".pth"})
_register_folder("sam2", {".pt", ".safetensors"})
_register_folder("LLM", {".safetensors", ".json"})
_register_folder("pose", {".tflite"})
_register_folder("depth", {".safetensors", ".json"})
_register_folder("fastcomposer", {".bin", ".safetensors"})  # the released pytorch_model.bin (weights_only load)
_register_folder("ipadapter", {".safetensors", ".bin"})  # h94's IP-Adapter files (no core folder)

AUTO = "auto"
DIFFUSERS_PREFIX = "diffusers/"
SINGLE_PREFIX = "diffusion_models/"

# ------------------------------------------------------------------------------------------------ folders


def _diffusers_folders() -> list[tuple[str, Path]]:
    """(name relative to a models/diffusers root, path) of every folder holding model_index.json (2 levels deep)."""
    return folders.find_model_folders(folder_paths.get_folder_paths("diffusers"),
                                      lambda p: (p / "model_index.json").is_file())


def flux_fill_choices() -> list[str]:
    """The loader's `model` combo: FLUX Fill diffusers folders and single transformer files found on disk."""
    choices = [DIFFUSERS_PREFIX + name for name, path in _diffusers_folders()
               if flux_files.diffusers_pipeline_class(path) == flux_files.FLUX_FILL_PIPELINE]
    for name in folder_paths.get_filename_list("diffusion_models"):
        if name.endswith(".safetensors"):
            path = folder_paths.get_full_path("diffusion_models", name)
            if path and flux_files.is_flux_fill_transformer_file(path):
                choices.append(SINGLE_PREFIX + name)
    return choices


def file_choices(folder: str) -> list[str]:
    return [AUTO] + [n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors")]


def _auto_pick(folder: str, wanted: tuple[str, ...], avoid: tuple[str, ...] = ()) -> str | None:
    names = [n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors")]
    for w in wanted:
        hits = [n for n in names if w in Path(n).name.lower()]
        preferred = [n for n in hits if not any(a in n.lower() for a in avoid)]
        if preferred or hits:
            return (preferred or hits)[0]
    return None


def _resolve_part(choice: str, folder: str, wanted: tuple[str, ...], what: str, avoid: tuple[str, ...] = ()) -> str:
    name = _auto_pick(folder, wanted, avoid) if choice == AUTO else choice
    if name is None:
        raise ModelFileError(
            f"a {what} file in models/{folder} (looked for names containing {' or '.join(wanted)})",
            "none", f"Put the {what} file in models/{folder}, or pick it in the loader's input.")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ModelFileError(f"the {what} file '{name}' in models/{folder}", "no such file",
                             "Refresh the node (R) and pick a file that exists.")
    return path


def tokenizer_dirs() -> tuple[str, str]:
    """CLIP-L's and T5's tokenizers as shipped in ComfyUI's tree."""
    root = Path(comfy.utils.__file__).parent  # comfy is a namespace package: no comfy.__file__
    return str(root / "sd1_tokenizer"), str(root / "text_encoders" / "t5_tokenizer")


def flux_fill_files(model: str, clip_l: str = AUTO, t5xxl: str = AUTO, vae: str = AUTO) -> FluxFillFiles:
    """Turn the loader's combo values into paths."""
    if model.startswith(DIFFUSERS_PREFIX):
        name = model[len(DIFFUSERS_PREFIX):]
        for found, path in _diffusers_folders():
            if found == name:
                return FluxFillFiles(layout="diffusers", path=str(path))
        raise ModelFileError(f"the diffusers folder '{name}' under models/diffusers", "no such folder",
                             "Refresh the node (R) and pick a model that exists.")
    if model.startswith(SINGLE_PREFIX):
        name = model[len(SINGLE_PREFIX):]
        path = folder_paths.get_full_path("diffusion_models", name)
        if path is None:
            raise ModelFileError(f"'{name}' in models/diffusion_models", "no such file",
                                 "Refresh the node (R) and pick a model that exists.")
        clip_tok, t5_tok = tokenizer_dirs()
        return FluxFillFiles(
            layout="single_file", path=path,
            clip_l=_resolve_part(clip_l, "text_encoders", ("clip_l",), "clip_l"),
            t5xxl=_resolve_part(t5xxl, "text_encoders", ("t5xxl", "t5"), "t5xxl", avoid=("fp8", "scaled")),
            vae=_resolve_part(vae, "vae", ("ae.", "flux", "ae"), "vae"),
            clip_tokenizer=clip_tok, t5_tokenizer=t5_tok)
    raise ModelFileError("a model from the list (diffusers/… or diffusion_models/…)", repr(model),
                         "Put FLUX.1-Fill-dev in models/diffusers or flux1-fill-dev.safetensors in "
                         "models/diffusion_models, then refresh (R).")


def device() -> str:
    return str(mm.get_torch_device())


def free_vram() -> int | None:
    """VRAM Atelier may plan with: ComfyUI's free memory, within torch's per-process cap
    (``set_per_process_memory_fraction``), less what ``--reserve-vram`` keeps for other programs."""
    dev = mm.get_torch_device()
    if dev.type != "cuda":
        return None
    return max(0, min(mm.get_free_memory(dev), free_cuda_bytes(dev)) - mm.extra_reserved_memory())


# --------------------------------------------------------------------------------------------- progress


class ComfyProgress:
    """Atelier's Progress on ComfyUI's ProgressBar; each step is a Stop point (the hook raises when interrupted)."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(1, total))

    def step(self, n: int = 1) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.bar.update(n)


@contextmanager
def comfy_progress(total: int):
    yield ComfyProgress(total)


# -------------------------------------------------------------------------------------- memory management


class _Anchor(torch.nn.Module):
    """What ComfyUI's bookkeeping sees as the model; the real modules live in the registry entry."""


class AtelierModelPatcher(ModelPatcher):
    """Lets ComfyUI's model management see one Atelier pipeline: Unload / POST /free / VRAM pressure release it.

    Atelier's pipelines place their own weights (offload hooks, quantized layers), so this patcher never moves
    tensors: loading only records the pipeline as in use; unloading drops it from Atelier's registry, which frees
    every byte (the next run rebuilds it from its spec).
    """

    def __init__(self, key, size: int, load_device: torch.device):
        super().__init__(_Anchor(), load_device=load_device, offload_device=torch.device("cpu"), size=max(1, size))
        self.atelier_key = key

    def model_size(self):
        return self.size

    def loaded_size(self):
        return self.size if REGISTRY.get(self.atelier_key) is not None else 0

    def current_loaded_device(self):
        return self.load_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0  # all or nothing: ComfyUI then calls detach()

    def detach(self, unpatch_all=True):
        if not unpatch_all:
            # load_models_gpu re-registering this same patcher (is_clone(self)): keep the pipeline
            return self.model
        # This patcher stays in _PATCHERS until the next build replaces it: ComfyUI's record holds it only by
        # weakref, and collecting it here would run ComfyUI's cleanup finalizer in the middle of free_memory.
        _releasing_from_comfy.add(self.atelier_key)
        try:
            REGISTRY.release(self.atelier_key)
        finally:
            _releasing_from_comfy.discard(self.atelier_key)
        return self.model

    def clone(self):  # one pipeline, one patcher
        return self


_PATCHERS: dict = {}
_releasing_from_comfy: set = set()


def _on_built(key, entry) -> None:
    size = getattr(entry, "resident_bytes", 0)
    dev = getattr(entry, "device", mm.get_torch_device())
    patcher = AtelierModelPatcher(key, size, torch.device(dev))
    _PATCHERS[key] = patcher
    mm.load_models_gpu([patcher])


def _on_released(key) -> None:
    if key in _releasing_from_comfy:
        return  # ComfyUI is unloading it and drops its own record
    patcher = _PATCHERS.pop(key, None)  # released by Atelier (another setting replaced it): drop ComfyUI's record
    if patcher is None:
        return
    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            gone = mm.current_loaded_models.pop(i)
            if gone.model_finalizer is not None:
                gone.model_finalizer.detach()
            break


REGISTRY.on_built = _on_built
REGISTRY.on_released = _on_released


def acquire(stage: Stage, handle):
    """The loaded model for ``handle`` of any stage (see :mod:`atelier.stage`): built if missing or released, after
    ComfyUI made room for ``stage.need_bytes``; marked in use when it is already there.

    Models are the engine's objects; they expose ``resident_bytes`` and ``device`` (what ComfyUI should count) and
    ``close()`` (drop every module). See :mod:`atelier.registry`.
    """
    key = handle.spec
    entry = REGISTRY.get(key)
    if entry is None:
        dev = mm.get_torch_device()
        if dev.type == "cuda":
            need = stage.need_bytes(handle, free_vram())
            mm.free_memory(need + mm.minimum_inference_memory(), dev)  # evict core models first, like core loaders
        return REGISTRY.get_or_build(key, lambda: stage.load(handle), group=stage.group)
    patcher = _PATCHERS.get(key)
    if patcher is not None:
        mm.load_models_gpu([patcher])  # marks it in use; frees others if VRAM is short
    return entry


def guard(node_class: type) -> type:
    """Wrap a node's ``execute`` in the checks and translations every node shares (:mod:`atelier.guards`): inputs
    no model can use are refused with an InputError naming them; out-of-memory and other library failures that
    escape a stage become Atelier errors with the fix (after an OOM, ComfyUI's models and ours are unloaded, as
    core does for its own OOMs). Idempotent."""
    if node_class.__dict__.get("_atelier_guarded"):
        return node_class
    run = node_class.__dict__["execute"].__func__
    name = node_class.__name__

    @functools.wraps(run)
    def execute(cls, *args, **kwargs):
        guards.check_inputs(kwargs)
        guards.check_choices(kwargs, combo_options(node_class))
        try:
            return run(cls, *args, **kwargs)
        except Exception as e:
            err = guards.translate(name, kwargs, e)
            if err is None:
                raise
            if not (isinstance(e, MemoryError) or guards.is_out_of_gpu_memory(e)):
                raise err from e
            log.error("Atelier: %s ran out of memory (%s); unloading models", name, e)
        # outside the except block: the traceback (and the tensors its frames hold) is gone before we free
        mm.unload_all_models()
        REGISTRY.release_all()
        mm.soft_empty_cache()
        raise err

    node_class.execute = classmethod(execute)
    node_class._atelier_guarded = True
    return node_class


def combo_options(node_class: type) -> dict:
    """{input: options} of a node's combo inputs, as its schema lists them now (file lists are current)."""
    return {i.id: list(i.options) for i in node_class.define_schema().inputs
            if isinstance(i, io.Combo.Input) and getattr(i, "options", None)}


def load_stage(stage: Stage, spec):
    """What every loader node does: spec → handle (files checked, settings resolved), the model loaded through
    :func:`acquire`, and the loader's summary text. Returns (handle, text)."""
    handle = stage.make_handle(spec, free_vram())
    model = acquire(stage, handle)
    return handle, stage.summary(handle, model)


def images_out(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(0.0, 1.0).float().cpu()


# ------------------------------------------------------------------------------------ background removal


def bg_remover_choices() -> list[str]:
    """The remover loader's `model` combo: .onnx / .safetensors / .pth files in models/background_removal."""
    from ..atelier import masker

    return [n for n in folder_paths.get_filename_list("background_removal")
            if Path(n).suffix.lower() in masker.MODEL_EXTENSIONS]


def bg_remover_path(name: str) -> str:
    path = folder_paths.get_full_path("background_removal", name) if name else None
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths("background_removal"))
        raise ModelFileError(f"the model '{name}' in models/background_removal ({roots})", "no such file",
                             "Put the file there (e.g. u2net.onnx, isnet-general-use.onnx, BiRefNet or RMBG-2.0 "
                             "model.safetensors) and refresh (R).")
    return path


def model_fingerprint(folder: str, name: str):
    """A loader's fingerprint: the chosen file's size and mtime in ``folder``, so that replacing the file under the
    same name reruns the loader."""
    path = folder_paths.get_full_path(folder, name) if name else None
    return (name, file_stamp(path) if path else None)


# ------------------------------------------------------------------------------------------------ SAM2


def sam2_choices() -> list[str]:
    """The SAM2 loader's `model` combo: .pt / .safetensors files under models/sam2 (extra_model_paths too)."""
    return [n for n in folder_paths.get_filename_list("sam2") if n.lower().endswith((".pt", ".safetensors"))]


def sam2_path(name: str) -> str:
    path = folder_paths.get_full_path("sam2", name)
    if path is None:
        raise ModelFileError(f"the SAM2 checkpoint '{name}' in models/sam2", "no such file",
                             "Put sam2.1_hiera_*.pt (or .safetensors) in models/sam2, refresh (R) and pick it.")
    return path


# ------------------------------------------------------------------------------------- pose (BlazePose) and depth

POSE_EXTENSION = ".tflite"


def pose_choices() -> list[str]:
    """The `model` combo of the pose nodes: BlazePose landmark models (.tflite named *landmark*) in models/pose;
    every .tflite when none is named so."""
    names = [n for n in folder_paths.get_filename_list("pose") if n.lower().endswith(POSE_EXTENSION)]
    landmark = [n for n in names if "landmark" in Path(n).name.lower()]
    return landmark or names


def pose_spec(name: str):
    """The pose stage's spec for the chosen landmark file (detector and segmenter found beside it or in any
    models/pose folder)."""
    from ..atelier import pose

    path = folder_paths.get_full_path("pose", name) if name else None
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths("pose"))
        raise ModelFileError(f"BlazePose's '{name}' in models/pose ({roots})", "no such file",
                             "Put pose_landmark_full.tflite, pose_detection.tflite and selfie_segmentation.tflite "
                             "there (python install.py --pose-models extracts them from PyPI's mediapipe==0.10.21) "
                             "and refresh (R).")
    return pose.make_spec(path, roots=folder_paths.get_folder_paths("pose"))


def depth_choices() -> list[str]:
    """The depth node's `model` combo: transformers depth-estimation folders under models/depth (2 levels deep)."""
    from ..atelier import depth

    return [name for name, _ in folders.find_model_folders(folder_paths.get_folder_paths("depth"),
                                                             depth.is_depth_folder)]


def depth_folder(name: str) -> str:
    from ..atelier import depth

    for found, path in folders.find_model_folders(folder_paths.get_folder_paths("depth"), depth.is_depth_folder):
        if found == name:
            return str(path)
    raise ModelFileError(f"the depth model folder '{name}' under models/depth", "no such folder",
                         "Put a Depth Anything V2 / DPT folder (config.json, model.safetensors, "
                         "preprocessor_config.json) in models/depth, then refresh (R) and pick it.")


# ------------------------------------------------------------------------------------------ VLM captioner


def llm_roots() -> list[str]:
    """Every models/LLM folder (extra_model_paths.yaml included): the captioner's model folders live there."""
    return list(folder_paths.get_folder_paths("LLM"))


# ------------------------------------------------------------------------------------ layers (Qwen-Image-Layered)

Layered = io.Custom("ATELIER_LAYERED")


def layered_choices() -> list[str]:
    """The layered loader's `model` combo: diffusers folders whose model_index.json names QwenImageLayeredPipeline."""
    from ..atelier import layers

    return [DIFFUSERS_PREFIX + name for name, path in _diffusers_folders()
            if folders.diffusers_pipeline_class(path) == layers.PIPELINE_CLASS]


def layered_folder(model: str) -> str:
    """The loader's combo value → the folder's path."""
    name = model[len(DIFFUSERS_PREFIX):] if model.startswith(DIFFUSERS_PREFIX) else model
    for found, path in _diffusers_folders():
        if found == name:
            return str(path)
    raise ModelFileError(f"the diffusers folder '{name}' under models/diffusers (a QwenImageLayeredPipeline)",
                         "no such folder", "Put Qwen/Qwen-Image-Layered (the whole folder) in models/diffusers, "
                                           "then refresh (R) and pick it.")


class StopAwareProgress(ComfyProgress):
    """ComfyProgress that can also be asked, between steps, whether the user pressed Stop (token loops)."""

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()


@contextmanager
def stop_aware_progress(total: int):
    yield StopAwareProgress(total)


def output_dir() -> str:
    return folder_paths.get_output_directory()


def input_dir() -> str:
    return folder_paths.get_input_directory()


def temp_dir() -> str:
    return folder_paths.get_temp_directory()


def saved_file(path, folder_type: str) -> dict:
    """{filename, subfolder, type} of a file under ComfyUI's output/temp/input folder (what /view serves)."""
    root = {"output": output_dir(), "temp": temp_dir(), "input": input_dir()}[folder_type]
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    sub, name = os.path.split(rel)
    return {"filename": name, "subfolder": sub.replace(os.sep, "/"), "type": folder_type}


# -------------------------------------------------------------------------------------- previews on nodes

PREVIEW_MAX_SIDE = 1024


def ui_pngs(arrays, prefix: str, max_side: int | None = PREVIEW_MAX_SIDE) -> list[dict]:
    """Temp PNGs for the frontend to show on a node (GET /view?type=temp): one per H×W×3 or H×W×4 uint8 array,
    scaled down (aspect kept) so the longer side is at most ``max_side``. Returns their {filename, subfolder,
    type} entries, in order."""
    from PIL import Image

    folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, temp_dir())
    os.makedirs(folder, exist_ok=True)
    out = []
    for k, arr in enumerate(arrays):
        img = Image.fromarray(arr)
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        name = f"{stem}_{counter:05}_{k + 1:02}.png"
        img.save(os.path.join(folder, name), compress_level=1)
        out.append({"filename": name, "subfolder": subfolder, "type": "temp"})
    return out


# ------------------------------------------------------------------------------------------- FastComposer

NONE = "none"


def fastcomposer_choices() -> list[str]:
    """The loader's `model` combo: .bin / .safetensors files under models/fastcomposer."""
    return [n for n in folder_paths.get_filename_list("fastcomposer") if n.lower().endswith((".bin", ".safetensors"))]


def sd15_base_choices() -> list[str]:
    """The loader's `base` combo: none, or a .safetensors checkpoint in models/checkpoints (an SD1.5)."""
    return [NONE] + [n for n in folder_paths.get_filename_list("checkpoints") if n.endswith(".safetensors")]


def _file_path(folder: str, name: str, what: str, hint: str) -> str:
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        raise ModelFileError(f"{what} '{name}' in models/{folder}", "no such file", hint)
    return path


def fastcomposer_spec(model: str, base: str, **settings):
    """The loader's inputs → a FastComposer spec (files resolved, ComfyUI's CLIP tokenizer, ComfyUI's device)."""
    from ..atelier import fastcomposer

    path = _file_path("fastcomposer", model, "the FastComposer checkpoint",
                      "Put FastComposer's pytorch_model.bin in models/fastcomposer (renaming it is fine), refresh "
                      "(R) and pick it.")
    base_path = None if base in (None, "", NONE) else _file_path(
        "checkpoints", base, "the SD1.5 checkpoint", "Refresh (R) and pick a file that exists, or none.")
    return fastcomposer.make_spec(path, tokenizer_dirs()[0], base_path, device=device(), **settings)


def fastcomposer_fingerprint(model: str, base: str | None):
    """Size and mtime of the chosen files: replacing one under the same name reruns the loader."""
    return (model_fingerprint("fastcomposer", model),
            model_fingerprint("checkpoints", base if base and base != NONE else None))
# ---------------------------------------------------------------------------------- realtime character (SD1.5)

FULL = "full"
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")


def _files(folder: str, extensions=(".safetensors",)) -> list[str]:
    return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(extensions)]


def sd15_model_choices() -> list[str]:
    """Checkpoints in models/checkpoints (SDXL files are refused when loading, with a clear error) and
    SD1.5 diffusers folders (model_index.json naming a StableDiffusion pipeline) under models/diffusers."""
    from ..atelier import sd15_files

    return _files("checkpoints", CHECKPOINT_EXTENSIONS) + [
        DIFFUSERS_PREFIX + name for name, path in _diffusers_folders()
        if folders.diffusers_pipeline_class(path) in sd15_files.SD15_PIPELINES]


def _named(found: list[tuple[str, Path]], name: str) -> str | None:
    return next((str(path) for n, path in found if n == name), None)


def sd15_model_path(choice: str) -> str:
    path = (_named(_diffusers_folders(), choice[len(DIFFUSERS_PREFIX):]) if choice.startswith(DIFFUSERS_PREFIX)
            else folder_paths.get_full_path("checkpoints", choice))
    if path:
        return path
    raise ModelFileError(f"the SD1.5 model '{choice}' (models/checkpoints or models/diffusers)", "no such file",
                         "Put an SD1.5 checkpoint in models/checkpoints, refresh (R) and pick it.")


def _controlnet_folders() -> list[tuple[str, Path]]:
    return folders.find_model_folders(folder_paths.get_folder_paths("controlnet"),
                                      lambda p: (p / "config.json").is_file())


def controlnet_choices() -> list[str]:
    """ControlNet files (.safetensors / .pth) and diffusers ControlNet folders (config.json) in models/controlnet."""
    folder_names = [name + "/" for name, _ in _controlnet_folders()]
    files = [n for n in _files("controlnet", (".safetensors", ".pth"))
             if not any(n.replace(os.sep, "/").startswith(f) for f in folder_names)]
    return files + folder_names


def controlnet_path(choice: str) -> str:
    path = (_named(_controlnet_folders(), choice[:-1]) if choice.endswith("/")
            else folder_paths.get_full_path("controlnet", choice))
    if path:
        return path
    raise ModelFileError(f"the ControlNet '{choice}' in models/controlnet", "no such file or folder",
                         "Put control_v11p_sd15_openpose in models/controlnet, refresh (R) and pick it.")


def optional_file_choices(folder: str, first: str, extensions=(".safetensors",), contains: str = "") -> list[str]:
    return [first] + [n for n in _files(folder, extensions) if contains in n.lower()]


def optional_file_path(choice: str, folder: str, off: str) -> str | None:
    if choice == off:
        return None
    path = folder_paths.get_full_path(folder, choice)
    if path is None:
        raise ModelFileError(f"'{choice}' in models/{folder}", "no such file", "Refresh (R) and pick a file that exists.")
    return path


def clip_vision_path(choice: str, ip_adapter: str | None) -> str | None:
    """The CLIP vision file: the chosen one, or for ``auto`` the ViT-H (ViT-bigG for vit-G adapters) by name."""
    if ip_adapter is None:
        return None
    if choice != AUTO:
        return optional_file_path(choice, "clip_vision", AUTO)
    bigg = "vit-g" in Path(ip_adapter).name.lower()
    wanted = ("bigg", "vit-g") if bigg else ("vit-h", "h-14", "h14")
    return _resolve_part(AUTO, "clip_vision", wanted, "CLIP vision (IP-Adapter image encoder)")


def sd1_tokenizer() -> str:
    return tokenizer_dirs()[0]


def prompt_server_routes():
    """aiohttp's RouteTableDef of ComfyUI's server, or None (no server: scripts, engine tests, other front ends)."""
    try:
        import server
    except ImportError:
        return None
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return getattr(instance, "routes", None)


def pose_function(name: str, min_confidence: float = 0.5):
    """IMAGE → OpenPose maps with the pose stage (BlazePose, models/pose), or None when that stage is not
    installed or ``name`` is empty / "none" (the frames are then used as pose maps as they are)."""
    if not name or name == NONE or "pose_spec" not in globals():
        return None
    from ..atelier import pose as pose_engine

    handle = pose_engine.make_handle(globals()["pose_spec"](name), None)

    def run(image):
        model = acquire(pose_engine.STAGE, handle)
        maps, _, _ = pose_engine.pose_maps(model, image, min_confidence, "")
        return maps

    return run


def live_pose_choices() -> list[str]:
    """The pose models the live panel can use (empty without the pose stage)."""
    choices = globals().get("pose_choices")
    return list(choices()) if choices else []
# ------------------------------------------------------------------------------------------------ try-on

TryOnPipe = io.Custom("ATELIER_TRYON")
Redux = io.Custom("ATELIER_REDUX")
# what a LoRA node hands on: the pipe type it got (ComfyUI's type check accepts any overlap of "A,B" with "A")
LoraPipe = io.Custom("ATELIER_TRYON,ATELIER_FLUX_FILL")
CHECKPOINT_PREFIX = "checkpoints/"

def tryon_model_choices() -> list[str]:
    """SDXL checkpoints (every .safetensors in models/checkpoints: the loader tells SD1.5 and others apart with a
    clear error) and diffusers folders whose model_index.json names an SDXL pipeline."""
    from ..atelier import sdxl_files

    choices = [DIFFUSERS_PREFIX + name for name, path in _diffusers_folders()
               if folders.diffusers_pipeline_class(path) in sdxl_files.SDXL_PIPELINES]
    choices += [CHECKPOINT_PREFIX + n for n in folder_paths.get_filename_list("checkpoints")
                if n.lower().endswith(".safetensors")]
    return choices


def _listed(folder: str, exts: tuple[str, ...], first: str) -> list[str]:
    return [first] + [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(exts)]


def tryon_controlnet_choices() -> list[str]:
    """The try-on loader's `controlnet` combo: none or an SDXL ControlNet file in models/controlnet."""
    return _listed("controlnet", (".safetensors",), NONE)


def ipadapter_choices() -> list[str]:
    return _listed("ipadapter", (".safetensors", ".bin"), NONE)


def clip_vision_choices() -> list[str]:
    return _listed("clip_vision", (".safetensors",), AUTO)


def lora_choices() -> list[str]:
    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def _full(folder: str, name: str, what: str) -> str:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ModelFileError(f"the {what} '{name}' in models/{folder}", "no such file",
                             "Refresh the node (R) and pick a file that exists.")
    return path


def tryon_files(model: str, controlnet: str, ip_adapter: str, clip_vision: str):
    """The try-on loader's combo values -> atelier.tryon.TryOnFiles (a ControlNet file inside a folder with
    config.json means that folder; clip_vision auto = the first encoder in models/clip_vision the adapter fits)."""
    from ..atelier import ip_adapter as ipa
    from ..atelier.tryon import TryOnFiles

    if model.startswith(DIFFUSERS_PREFIX):
        name = model[len(DIFFUSERS_PREFIX):]
        path = next((str(p) for n, p in _diffusers_folders() if n == name), None)
        if path is None:
            raise ModelFileError(f"the diffusers folder '{name}' under models/diffusers", "no such folder",
                                 "Refresh the node (R) and pick a model that exists.")
        layout = "diffusers"
    elif model.startswith(CHECKPOINT_PREFIX):
        path, layout = _full("checkpoints", model[len(CHECKPOINT_PREFIX):], "checkpoint"), "single_file"
    else:
        raise ModelFileError("a model from the list (checkpoints/… or diffusers/…)", repr(model),
                             "Put an SDXL checkpoint in models/checkpoints (or a diffusers SDXL folder in "
                             "models/diffusers), then refresh (R).")
    cn = None
    if controlnet and controlnet != NONE:
        cn = _full("controlnet", controlnet, "ControlNet")
        if (Path(cn).parent / "config.json").is_file() and Path(cn).name.startswith("diffusion_pytorch_model"):
            cn = str(Path(cn).parent)
    ip = clip = None
    if ip_adapter and ip_adapter != NONE:
        ip = _full("ipadapter", ip_adapter, "IP-Adapter")
        if clip_vision and clip_vision != AUTO:
            clip = _full("clip_vision", clip_vision, "CLIP vision encoder")
        else:
            names = [n for n in folder_paths.get_filename_list("clip_vision") if n.lower().endswith(".safetensors")]
            clip = ipa.auto_clip(ipa.read(ip), [folder_paths.get_full_path("clip_vision", n) for n in names])
            if clip is None:
                raise ModelFileError(f"a CLIP vision encoder in models/clip_vision that fits '{Path(ip).name}'",
                                     f"none among {names or 'no files'}",
                                     "Put CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (h94/IP-Adapter "
                                     "models/image_encoder/model.safetensors, renamed) in models/clip_vision.")
    return TryOnFiles(layout=layout, path=path, controlnet=cn, ip_adapter=ip, clip_vision=clip,
                      tokenizer=tokenizer_dirs()[0] if layout == "single_file" else None)


def lora_path(name: str) -> str:
    return _full("loras", name, "LoRA")


def lora_fingerprint(name: str):
    path = folder_paths.get_full_path("loras", name) if name else None
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return (name, st.st_size, st.st_mtime_ns) if st else (name, None)


def style_model_choices() -> list[str]:
    return [n for n in folder_paths.get_filename_list("style_models") if n.lower().endswith(".safetensors")]


def style_model_path(name: str) -> str:
    return _full("style_models", name, "FLUX Redux file")


def siglip_path(name: str) -> str:
    """The SigLIP file for Redux: the chosen one, or (auto) the first name containing sigclip / siglip."""
    if name and name != AUTO:
        return _full("clip_vision", name, "SigLIP encoder")
    found = _auto_pick("clip_vision", ("sigclip", "siglip"))
    if found is None:
        raise ModelFileError("a SigLIP encoder in models/clip_vision (a name containing sigclip or siglip)", "none",
                             "Put sigclip_vision_patch14_384.safetensors in models/clip_vision, or pick it.")
    return _full("clip_vision", found, "SigLIP encoder")
