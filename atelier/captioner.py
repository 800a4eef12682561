"""VLM captioner: Qwen2-VL / Qwen2.5-VL / Qwen3-VL from a local Hugging Face folder, and generation.

``load(handle)`` builds a :class:`VLMModel` with classes we pick from the folder's ``config.json`` (no remote code,
no downloads); ``caption(model, images, task=...)`` asks it about each image (one reply per image, a progress
step per generated token, so ComfyUI's Stop ends generation within a token). The string work is pure and lives
apart, tested on its own: :mod:`atelier.prompts` (what is asked, in each language, and the chat format) and
:mod:`atelier.analysis` (the model's reply → the analysis dict, surviving malformed replies).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import analysis, folders, prompts
from .errors import InputError, ModelFileError, SettingError
from .images import check_image, to_uint8
from .memory import (
    GiB,
    check_quant_dtype,
    check_quant_offload,
    check_quantization,
    dtype_name,
    footprint,
    is_cuda,
    plan_offload,
    quant_mode,
    resident_vram,
    resolve_dtype,
    transformers_dtype_kwarg,
    transformers_quant_config,
)
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

# ------------------------------------------------------------------------------------------------ choices

VLM_OFFLOADS: tuple[str, ...] = ("auto", "none", "model")

# config.json model_type -> (model class, processor class, family) — all from transformers itself
FAMILIES: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2-VL"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2.5-VL"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3-VL"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3-VL-MoE"),
}
_MIN_TRANSFORMERS = {"qwen2_vl": "4.45", "qwen2_5_vl": "4.49", "qwen3_vl": "4.57", "qwen3_vl_moe": "4.57"}

# Images above this many pixels are downscaled before the processor sees them: Qwen's default pixel budget would
# turn a 4K picture into thousands of visual tokens, for no better caption.
MAX_IMAGE_PIXELS = 1024 * 1024
# VRAM kept free for the vision tower's activations and the KV cache when planning the offload
VLM_ACTIVATION_RESERVE = int(1.5 * GiB)

# ---------------------------------------------------------------------------------------------- spec/handle


@dataclass(frozen=True)
class VLMSpec:
    """What the loader chose; equal specs share one loaded model (the registry key)."""

    path: str
    quantization: str = "none"
    offload: str = "auto"
    dtype: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class VLMHandle:
    """What ``AtelierVLMLoader`` outputs (ATELIER_VLM): the spec and what the loader resolved. No model inside."""

    spec: VLMSpec
    model_type: str
    offload: str  # resolved: none / model
    dtype: str  # resolved: bf16 / fp16 / fp32

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type][2]


# ------------------------------------------------------------------------------------------------- folders


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_model_type(folder: str | Path) -> str | None:
    """``model_type`` of a folder's config.json when it is one of the VLM families we know, else None."""
    cfg = _read_json(Path(folder) / "config.json")
    if not cfg:
        return None
    mt = cfg.get("model_type")
    return mt if mt in FAMILIES else None


def _transformers_has(*names: str) -> bool:
    try:
        import transformers
    except ImportError:  # pragma: no cover - a dependency of the pack
        return False
    for name in names:
        try:
            getattr(transformers, name)
        except (AttributeError, ImportError, RuntimeError):
            return False
    return True


def supported_model_types() -> list[str]:
    """The families the installed transformers can run (Qwen3-VL needs transformers >= 4.57)."""
    return [mt for mt, (model_cls, proc_cls, _) in FAMILIES.items() if _transformers_has(model_cls, proc_cls)]


def find_model_folders(roots: Iterable[str | Path], model_types: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """(name relative to its root, path) of every folder up to two levels under ``roots`` whose config.json is a
    supported VLM (``Qwen2.5-VL-3B-Instruct`` or ``Qwen/Qwen2.5-VL-3B-Instruct``). Weights are not checked here:
    a folder still downloading is listed, and loading it says what is missing."""
    wanted = set(supported_model_types() if model_types is None else model_types)
    return folders.find_model_folders(roots, lambda p: folder_model_type(p) in wanted)


def resolve_folder(name: str, roots: Iterable[str | Path]) -> Path:
    """The path of the loader's combo value ``name`` (a folder under one of ``roots``)."""
    roots = [Path(r) for r in roots]
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:  # combo values reach us unchecked
        raise ModelFileError("a model folder name from the list (a folder inside models/LLM)", repr(name),
                             "Pick a model in the loader's list; names that leave models/LLM are not read.")
    for root in roots:
        path = root / name
        if path.is_dir():
            return path
    where = ", ".join(str(r) for r in roots) or "models/LLM"
    raise ModelFileError(f"the model folder '{name}' under models/LLM ({where})", "no such folder",
                         "Put the model's folder (config.json, *.safetensors, tokenizer and preprocessor files) in "
                         "models/LLM, then refresh (R) and pick it.")


EXPECTED_FILES = ("config.json", "model.safetensors (or model-0000X-of-0000N.safetensors + "
                  "model.safetensors.index.json)", "tokenizer.json (or vocab.json + merges.txt)",
                  "tokenizer_config.json", "preprocessor_config.json")


def weight_files(folder: str | Path) -> list[Path]:
    """The folder's safetensors weights: the shards its index lists, or model.safetensors, or every *.safetensors."""
    folder = Path(folder)
    index = _read_json(folder / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def missing_files(folder: str | Path) -> list[str]:
    """What a complete model folder has and this one lacks (names as in EXPECTED_FILES)."""
    folder = Path(folder)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    index = _read_json(folder / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        missing += [f for f in sorted(set(index["weight_map"].values())) if not (folder / f).is_file()]
    elif not list(folder.glob("*.safetensors")):
        missing.append("model.safetensors (or model-0000X-of-0000N.safetensors + model.safetensors.index.json)")
    if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").is_file():
        missing.append("preprocessor_config.json")
    return missing


def check_folder(folder: str | Path) -> str:
    """The folder's model_type if it holds a complete model we can run, else a ModelFileError that teaches."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(f"a model folder at '{folder}'", "no such folder",
                             "Put the model's folder in models/LLM, then refresh (R) and pick it.")
    cfg = _read_json(folder / "config.json")
    mt = cfg.get("model_type") if cfg else None
    if cfg is not None and mt not in FAMILIES:
        raise ModelFileError("a Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder (config.json model_type qwen2_vl, "
                             "qwen2_5_vl or qwen3_vl)", f"model_type {mt!r} in '{folder.name}'",
                             "Pick a Qwen VL model folder (e.g. Qwen2.5-VL-3B-Instruct).")
    missing = missing_files(folder)
    if (folder / "pytorch_model.bin").is_file() or list(folder.glob("pytorch_model-*.bin")):
        fix_bin = " This folder has .bin weights: Atelier reads only .safetensors (the hub's Qwen VL repos ship both)."
    else:
        fix_bin = ""
    if missing:
        raise ModelFileError(
            f"a complete model folder in models/LLM with {', '.join(EXPECTED_FILES)}",
            f"'{folder.name}' without {', '.join(missing)}",
            "Download every file of the model repository (e.g. huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct "
            f"--local-dir models/LLM/Qwen2.5-VL-3B-Instruct) and keep the layout.{fix_bin}")
    model_cls, proc_cls, family = FAMILIES[mt]
    if not _transformers_has(model_cls, proc_cls):
        import transformers

        raise SettingError(f"transformers >= {_MIN_TRANSFORMERS[mt]} for {family} ('{folder.name}')",
                           f"transformers {transformers.__version__}",
                           f"Update transformers (pip install -U \"transformers>={_MIN_TRANSFORMERS[mt]}\") or pick a "
                           "Qwen2-VL / Qwen2.5-VL model.")
    return mt


# --------------------------------------------------------------------------------------------------- sizes


def part_sizes(folder: str | Path) -> dict[str, int]:
    """16-bit bytes of the language model and the vision tower, from the safetensors headers (nothing loaded)."""
    from .weights import read_safetensors_header

    text = vision = 0
    for f in weight_files(folder):
        if not f.is_file():
            continue
        for name, meta in read_safetensors_header(f).items():
            n = math.prod(meta["shape"]) if meta.get("shape") else 1
            if "visual" in name:
                vision += 2 * n
            else:
                text += 2 * n
    return {"transformer": text, "text_encoders": vision}


def resolve(spec: VLMSpec, free_vram: int | None = None):
    """(offload mode, dtype, why, footprint) without loading anything."""
    if spec.offload not in VLM_OFFLOADS:
        raise SettingError("offload one of auto, none, model", repr(spec.offload), "Pick one of the listed values.")
    check_quantization(spec.quantization, spec.device)
    dtype = resolve_dtype(spec.dtype, spec.device)
    check_quant_dtype(spec.quantization, dtype)
    fp = footprint(part_sizes(spec.path), spec.quantization, dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram)
    if mode == "sequential":  # our "model" mode already spills whatever does not fit into RAM
        mode = "model"
    if mode == "model" and not quant_mode(spec.quantization).streams:
        mode, why = "none", NF4_NOT_OFFLOADED
    check_quant_offload(spec.quantization, spec.offload, mode, why)
    return mode, dtype, why, fp


# bitsandbytes' 4-bit weights cannot be streamed from RAM by accelerate (measured: transformers 5.17 + bitsandbytes
# 0.50.2 fail with "Cannot copy out of meta tensor" at the first offloaded layer), so nf4 always stays on the GPU
NF4_NOT_OFFLOADED = ("nf4 weights stay on the GPU: bitsandbytes cannot stream 4-bit layers from RAM "
                     "(nf4 alone needs about a third of the 16-bit VRAM; use int8 + offload model for less)")


def make_handle(spec: VLMSpec, free_vram: int | None = None) -> VLMHandle:
    mt = check_folder(spec.path)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return VLMHandle(spec=spec, model_type=mt, offload=mode, dtype=dtype_name(dtype))


def need_bytes(handle: VLMHandle, free_vram: int | None = None) -> int:
    """VRAM to make room for before loading (ComfyUI evicts its own models first)."""
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp)


def summary(handle: VLMHandle, model: VLMModel | None = None) -> str:
    s = handle.spec
    return with_notes(f"{Path(s.path).name} ({handle.family}): {handle.dtype}, quantization {s.quantization}, "
                      f"offload {handle.offload}", model)


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class VLMModel:
    """A loaded VLM (model + processor) and what was decided while loading it. The registry's entry."""

    model: Any
    processor: Any
    spec: VLMSpec
    model_type: str
    offload: str
    dtype: torch.dtype
    device: torch.device
    resident_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type][2]

    @property
    def input_device(self) -> torch.device:
        """Where the inputs go: the embedding's device (the first GPU part under offload)."""
        try:
            return self.model.get_input_embeddings().weight.device
        except Exception:  # noqa: BLE001 - some wrappers hide it; the model's device is right otherwise
            return self.model.device

    def close(self) -> None:
        """Remove accelerate's dispatch hooks and drop the modules so their memory can go."""
        model, self.model, self.processor = self.model, None, None
        if model is None:
            return
        try:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(model, recurse=True)
        except Exception:  # noqa: BLE001 - best effort: no hooks, or accelerate missing
            log.debug("Atelier: removing VLM hooks failed", exc_info=True)
        del model


def load(handle: VLMHandle, max_gpu_bytes: int | None = None) -> VLMModel:
    """Build the model and its processor in the handle's resolved offload mode. ``max_gpu_bytes`` caps the GPU
    share under offload ``model`` (default: the free VRAM less a reserve for activations)."""
    import transformers

    spec = handle.spec
    mt = check_folder(spec.path)
    _, dtype, why, fp = resolve(spec)
    mode = handle.offload
    device = torch.device(spec.device)
    if not is_cuda(device):
        mode = "none"
    notes: list[str] = []
    if mode == "model" and not quant_mode(spec.quantization).streams:
        mode, why = "none", NF4_NOT_OFFLOADED
    if why == NF4_NOT_OFFLOADED:
        notes.append(why)
    model_cls_name, proc_cls_name, family = FAMILIES[mt]
    t0 = time.perf_counter()
    log.info("Atelier: loading %s from %s (%s, quantization %s, offload %s: %s)", family, spec.path,
             dtype_name(dtype), spec.quantization, mode, why)
    kwargs: dict[str, Any] = {transformers_dtype_kwarg(): dtype, "local_files_only": True, "trust_remote_code": False}
    quant = transformers_quant_config(spec.quantization, dtype)
    resident = fp.total
    if is_cuda(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if mode == "none":
            kwargs["device_map"] = {"": index}
        else:
            budget = max_gpu_bytes
            if budget is None:
                free, _ = torch.cuda.mem_get_info(index)
                budget = max(int(0.5 * GiB), free - VLM_ACTIVATION_RESERVE)
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = {index: int(budget), "cpu": _cpu_budget()}
            resident = min(fp.total, int(budget))
            if quant is not None:
                quant.llm_int8_enable_fp32_cpu_offload = True  # parts left in RAM stay unquantized there
    if quant is not None:
        kwargs["quantization_config"] = quant
    model_cls = getattr(transformers, model_cls_name)
    processor_cls = getattr(transformers, proc_cls_name)
    try:
        model = model_cls.from_pretrained(spec.path, **kwargs).eval()
        processor = processor_cls.from_pretrained(spec.path, local_files_only=True, trust_remote_code=False)
    except OSError as e:
        raise ModelFileError(f"a loadable {family} folder with {', '.join(EXPECTED_FILES)}",
                             f"'{Path(spec.path).name}' that transformers could not read ({e})",
                             "Download the model's files again; a file may be truncated.") from e
    if not is_cuda(device):
        model.to(device)
    if mode == "model":
        notes.append(_placement_note(model))
    vlm = VLMModel(model=model, processor=processor, spec=spec, model_type=mt, offload=mode, dtype=dtype,
                   device=device, resident_bytes=int(resident if is_cuda(device) else fp.total), notes=notes)
    vlm.load_seconds = time.perf_counter() - t0
    log.info("Atelier: %s ready in %.1f s%s", family, vlm.load_seconds, "".join(f"; {n}" for n in notes))
    return vlm


STAGE = Stage(group="vlm", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


def _placement_note(model: Any) -> str:
    """What accelerate's device map did with the weights, in words for the loader's text."""
    placement = getattr(model, "hf_device_map", None) or {}
    if placement:
        in_ram = [k for k, v in placement.items() if str(v) in ("cpu", "disk")]
        if in_ram:
            return (f"offload: {len(in_ram)} of {len(placement)} parts stay in RAM and stream to the GPU each token "
                    "(slower)")
        return "offload: everything fits in the free VRAM, nothing was offloaded"
    devices = {p.device.type for p in model.parameters()}
    if devices <= {"cpu", "meta"}:
        return "offload: none of the model fits in the GPU share; it stays in RAM and runs on the CPU (slow)"
    return "offload: everything fits in the free VRAM, nothing was offloaded"


def _cpu_budget() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.9)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return 64 * GiB

# ------------------------------------------------------------------------------------------------ inputs


def to_pil(image: torch.Tensor):
    """One HWC float [0, 1] image → an RGB PIL image (LoadImage's uint8 values come back exactly)."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image[..., :3]), "RGB")
    w, h = pil.size
    if w * h > MAX_IMAGE_PIXELS:
        s = math.sqrt(MAX_IMAGE_PIXELS / (w * h))
        pil = pil.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.LANCZOS)
    return pad_for_vision(pil)


MIN_SIDE = 28  # Qwen-VL's patch (14) × merge (2): smaller sides are refused by its processor
MAX_ASPECT = 150  # Qwen-VL's processor refuses an aspect ratio of 200 or more


def pad_for_vision(pil):
    """A picture the vision processors accept: a side under MIN_SIDE or a strip longer than MAX_ASPECT : 1 is
    padded (centred, black) rather than refused; the content is not resized."""
    from PIL import Image

    w, h = pil.size
    nw = max(w, MIN_SIDE, -(-h // MAX_ASPECT))
    nh = max(h, MIN_SIDE, -(-nw // MAX_ASPECT))
    if (nw, nh) == (w, h):
        return pil
    canvas = Image.new("RGB", (nw, nh))
    canvas.paste(pil, ((nw - w) // 2, (nh - h) // 2))
    return canvas


def prepare_inputs(processor: Any, pil_image: Any, task: str, language: str = "en", instruction: str = ""):
    """The processor's tensors for one image and one task (what ``model.generate`` receives)."""
    text = prompts.render_chat(processor, prompts.build_messages(task, language, instruction))
    return processor(text=[text], images=[pil_image], return_tensors="pt")

# ------------------------------------------------------------------------------------------------ generation


def _progress_criteria(progress: Progress, counter: list[int]):
    from transformers import StoppingCriteria

    class ProgressStep(StoppingCriteria):
        """Called once per generated token: one progress step, and a Stop point (ComfyUI's hook raises)."""

        def __call__(self, input_ids, scores, **kwargs):
            counter[0] += 1
            progress.step(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return ProgressStep()


def generation_kwargs(model: Any, max_new_tokens: int, temperature: float) -> dict:
    """Our sampling choice on top of the folder's generation config: temperature 0 = greedy (the folder's repetition
    penalty kept), > 0 = sampling at that temperature with top-p 0.9 (Qwen's top_k=1 would make it greedy).

    Passed as ``generate`` keyword arguments, not as a GenerationConfig object: transformers 4.5x replaces every
    value of a passed config that equals a library default (temperature 1.0, top_k 50) with the folder's own.
    """
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=0.9)
    else:
        kw.update(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)  # neutral values: no warnings
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        eos = gen.eos_token_id
        kw["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
    return kw


@dataclass
class Reply:
    """One image's result: the decoded reply, the prompt for FLUX Fill, the analysis, the tokens generated."""

    text: str
    prompt: str
    analysis: dict
    tokens: int


def generate(vlm: VLMModel, pil_image: Any, task: str, *, language: str = "en", instruction: str = "",
             max_new_tokens: int = 512, seed: int = 0, temperature: float = 0.0,
             progress: Progress | None = None) -> tuple[str, int]:
    """Decoded reply and the number of generated tokens, for one PIL image."""
    if vlm.model is None:
        raise released("VLM")
    if max_new_tokens < 1:
        raise InputError("max_new_tokens of at least 1", str(max_new_tokens), "Set max_new_tokens to 512.")
    if temperature < 0:
        raise InputError("temperature of 0 (greedy) or more", str(temperature), "Set temperature to 0.")
    progress = progress or NullProgress()
    inputs = prepare_inputs(vlm.processor, pil_image, task, language, instruction).to(vlm.input_device)
    prompt_len = inputs["input_ids"].shape[1]
    counter = [0]
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([_progress_criteria(progress, counter)])
    kwargs = generation_kwargs(vlm.model, max_new_tokens, temperature)
    cuda = [vlm.input_device.index or 0] if vlm.input_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(int(seed) % (2**64))
        out = vlm.model.generate(**inputs, **kwargs, stopping_criteria=criteria)
    new = out[0, prompt_len:]
    text = vlm.processor.batch_decode(new[None], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return text, int(new.shape[0])


def caption(vlm: VLMModel, images: torch.Tensor, task: str = "background_analysis", *, language: str = "en",
            instruction: str = "", max_new_tokens: int = 512, seed: int = 0, temperature: float = 0.0,
            progress: Progress | None = None) -> list[Reply]:
    """One :class:`Reply` per image of the IMAGE batch (BHWC). Image ``i`` uses the seed ``seed + i``."""
    images = check_image(images)
    prompts.build_instruction(task, language, instruction)  # bad task/language/instruction before any work
    replies = []
    for i in range(images.shape[0]):
        text, n = generate(vlm, to_pil(images[i]), task, language=language, instruction=instruction,
                           max_new_tokens=max_new_tokens, seed=seed + i, temperature=temperature, progress=progress)
        found = analysis.parse_analysis(text)
        prompt = prompts.analysis_prompt(found, language, fallback=text) if task == "background_analysis" \
            else analysis.clean_reply(text)
        log.info("Atelier: %s %s reply for image %d: %d tokens", vlm.family, task, i, n)
        replies.append(Reply(text=text, prompt=prompt, analysis=found, tokens=n))
    return replies
