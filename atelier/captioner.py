"""VLM captioner: Qwen2-VL / Qwen2.5-VL / Qwen3-VL from a local Hugging Face folder, generation, reply parsing.

``load(spec)`` builds a :class:`VLMModel` with classes we pick from the folder's ``config.json`` (no remote code,
no downloads); ``caption(model, images, task=...)`` asks it about each image (one reply per image, a progress
step per generated token, so ComfyUI's Stop ends generation within a token). The string work is pure and
tested on its own: :func:`build_instruction` / :func:`build_messages` (what is asked), :func:`parse_analysis`
(the model's reply → the analysis dict, surviving malformed replies) and :func:`analysis_prompt` (the analysis →
a FLUX Fill prompt).

The analysis dict (``AtelierCaption``'s ``analysis`` output, as JSON)::

    {"scene": str, "lighting": str, "light_direction": str, "palette": [str, ...], "mood": str, "camera": str,
     "placement": {"x": float, "y": float, "w": float, "h": float},   # fractions 0–1; x, y = top-left corner
     "found": [keys read from the reply]}                               # the others are defaults
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import folders
from .errors import InputError, ModelFileError, SettingError
from .images import check_image
from .memory import (
    GiB,
    check_quantization,
    dtype_name,
    footprint,
    is_cuda,
    plan_offload,
    resident_vram,
    quant_mode,
    resolve_dtype,
    transformers_quant_config,
)
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

# ------------------------------------------------------------------------------------------------ choices

TASKS: tuple[str, ...] = ("background_analysis", "caption", "inpaint_prompt", "custom")
LANGUAGES: tuple[str, ...] = ("en", "ko")
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
    from .flux_files import read_safetensors_header

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
    fp = footprint(part_sizes(spec.path), spec.quantization, dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram)
    if mode == "sequential":  # our "model" mode already spills whatever does not fit into RAM
        mode = "model"
    if mode == "model" and not quant_mode(spec.quantization).streams:
        mode, why = "none", NF4_NOT_OFFLOADED
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


def _dtype_kwarg() -> str:
    """transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype``."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype, "local_files_only": True, "trust_remote_code": False}
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


# ------------------------------------------------------------------------------------------------ prompting

_ANALYSIS_EN = (
    "Analyse this image as the background into which an object will be composited. Reply with one JSON object "
    "and nothing else, with these keys:\n"
    '"scene": one sentence describing the place,\n'
    '"lighting": the quality and colour temperature of the light,\n'
    '"light_direction": where the main light comes from (left, right, front, back, top, top-left, ...),\n'
    '"palette": a list of 3 to 6 dominant colours,\n'
    '"mood": a few words,\n'
    '"camera": viewpoint, camera height, angle and perspective,\n'
    '"placement": {"x": ..., "y": ..., "w": ..., "h": ...} the best free region where an object could stand, '
    "as fractions 0-1 of the image width and height (x, y = the region's top-left corner)."
)
_ANALYSIS_KO = (
    "이 이미지를 물체를 합성해 넣을 배경으로 분석하세요. 다른 말 없이 JSON 객체 하나로만 답하고, 키 이름은 영어 그대로 "
    "두고 값은 한국어로 쓰세요:\n"
    '"scene": 장소를 설명하는 한 문장,\n'
    '"lighting": 빛의 성질과 색온도,\n'
    '"light_direction": 주 광원의 방향 (왼쪽, 오른쪽, 앞, 뒤, 위, 왼쪽 위 등),\n'
    '"palette": 주요 색 3~6개의 목록,\n'
    '"mood": 분위기를 나타내는 몇 단어,\n'
    '"camera": 시점, 카메라 높이, 각도와 원근,\n'
    '"placement": {"x": ..., "y": ..., "w": ..., "h": ...} 물체를 놓기 가장 좋은 빈 영역을 이미지 너비와 높이에 대한 '
    "0-1 비율로 (x, y = 영역의 왼쪽 위 모서리)."
)
_INSTRUCTIONS = {
    ("background_analysis", "en"): _ANALYSIS_EN,
    ("background_analysis", "ko"): _ANALYSIS_KO,
    ("caption", "en"): "Describe this image in one detailed paragraph for an image-generation model: the main "
                       "subject, the setting, lighting, colours, camera angle and style. Reply with the "
                       "description only.",
    ("caption", "ko"): "이미지 생성 모델에 넣을 수 있도록 이 이미지를 한 문단으로 자세히 설명하세요: 주요 대상, 배경, 조명, "
                       "색감, 카메라 각도, 스타일. 설명만 답하세요.",
    ("inpaint_prompt", "en"): "Write a prompt for an inpainting model that repaints part of this image so that the "
                              "new content blends in: describe the scene, its lighting (direction and colour "
                              "temperature), colours and photographic style in one or two sentences. Reply with "
                              "the prompt only.",
    ("inpaint_prompt", "ko"): "이 이미지의 일부를 다시 그리는 인페인팅 모델용 프롬프트를 쓰세요. 새로 그린 부분이 자연스럽게 "
                              "어울리도록 장면, 조명(방향과 색온도), 색감, 사진 스타일을 한두 문장으로 묘사하세요. "
                              "프롬프트만 답하세요.",
}
_REPLY_IN = {"en": "Answer in English.", "ko": "한국어로 답하세요."}


def build_instruction(task: str, language: str = "en", instruction: str = "") -> str:
    """The text asked about the image for ``task`` in ``language`` (``custom`` asks ``instruction``)."""
    if language not in LANGUAGES:
        raise InputError("language en or ko", repr(language), "Pick en or ko.")
    if task == "custom":
        text = (instruction or "").strip()
        if not text:
            raise InputError("an instruction for task 'custom'", "an empty instruction",
                             "Write what to ask about the image in 'instruction', or pick another task.")
        return f"{text}\n{_REPLY_IN[language]}"
    if (task, language) not in _INSTRUCTIONS:
        raise InputError(f"task one of {', '.join(TASKS)}", repr(task), "Pick one of the listed tasks.")
    return _INSTRUCTIONS[(task, language)]


def build_messages(task: str, language: str = "en", instruction: str = "") -> list[dict]:
    """One user turn: the image, then the instruction (the chat format of Qwen VL processors)."""
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": build_instruction(task, language, instruction)}]}]


def fallback_chat(messages: list[dict]) -> str:
    """The Qwen VL chat format, for folders whose processor has no (multimodal) chat template."""
    out = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
    for m in messages:
        parts = []
        for c in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
            parts.append("<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image" else c["text"])
        out.append(f"<|im_start|>{m['role']}\n{''.join(parts)}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_chat(processor: Any, messages: list[dict]) -> str:
    """The prompt text through the folder's own chat template; Qwen's format when it has none usable."""
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    if getattr(processor, "chat_template", None):
        try:
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a text-only template choking on image content
            log.info("Atelier: the model's chat template failed (%s); using Qwen's chat format", e)
        else:
            if isinstance(text, list):
                text = text[0]
            if image_token in text:
                return text
            log.info("Atelier: the model's chat template has no image slot; using Qwen's chat format")
    return fallback_chat(messages)


def to_pil(image: torch.Tensor):
    """One HWC float [0, 1] image → an RGB PIL image (LoadImage's uint8 values come back exactly)."""
    from PIL import Image

    arr = (image[..., :3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(arr, "RGB")
    w, h = pil.size
    if w * h > MAX_IMAGE_PIXELS:
        s = math.sqrt(MAX_IMAGE_PIXELS / (w * h))
        pil = pil.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.LANCZOS)
    return pil


def prepare_inputs(processor: Any, pil_image: Any, task: str, language: str = "en", instruction: str = ""):
    """The processor's tensors for one image and one task (what ``model.generate`` receives)."""
    text = render_chat(processor, build_messages(task, language, instruction))
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
    build_instruction(task, language, instruction)  # bad task/language/instruction before any work
    replies = []
    for i in range(images.shape[0]):
        text, n = generate(vlm, to_pil(images[i]), task, language=language, instruction=instruction,
                           max_new_tokens=max_new_tokens, seed=seed + i, temperature=temperature, progress=progress)
        analysis = parse_analysis(text)
        prompt = analysis_prompt(analysis, language, fallback=text) if task == "background_analysis" \
            else clean_reply(text)
        log.info("Atelier: %s %s reply for image %d: %d tokens", vlm.family, task, i, n)
        replies.append(Reply(text=text, prompt=prompt, analysis=analysis, tokens=n))
    return replies


# ------------------------------------------------------------------------------------ parsing (pure strings)

ANALYSIS_KEYS: tuple[str, ...] = ("scene", "lighting", "light_direction", "palette", "mood", "camera", "placement")
DEFAULT_PLACEMENT: dict[str, float] = {"x": 0.3, "y": 0.45, "w": 0.4, "h": 0.5}  # lower middle: where things stand
_SCENE_FALLBACK_CHARS = 1000

_ALIASES: dict[str, tuple[str, ...]] = {
    "scene": ("scene", "description", "summary", "caption", "setting", "scene_description", "background",
              "장면", "배경", "설명"),
    "lighting": ("lighting", "light", "illumination", "light_quality", "lighting_conditions", "조명", "빛"),
    "light_direction": ("light_direction", "lighting_direction", "direction", "light_dir", "direction_of_light",
                        "key_light_direction", "light_source", "light_source_direction", "빛의_방향", "조명_방향",
                        "광원_방향", "광원", "방향"),
    "palette": ("palette", "colour_palette", "color_palette", "colours", "colors", "dominant_colours",
                "dominant_colors", "color_scheme", "colour_scheme", "main_colors", "팔레트", "색상", "색감", "색"),
    "mood": ("mood", "atmosphere", "tone", "feeling", "vibe", "분위기"),
    "camera": ("camera", "perspective", "camera_perspective", "viewpoint", "camera_angle", "angle", "view",
               "point_of_view", "camera_view", "카메라", "시점", "원근"),
    "placement": ("placement", "placement_region", "region", "suggested_placement", "bbox", "box",
                  "placement_box", "object_placement", "free_region", "suggested_region", "배치", "영역"),
}
_KEY_OF = {alias: key for key, aliases in _ALIASES.items() for alias in aliases}
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)


def _norm_key(key: Any) -> str:
    k = str(key).strip().strip("*_`\"' ").lower()
    return re.sub(r"[\s\-/]+", "_", k)


def _canonical(key: Any) -> str | None:
    return _KEY_OF.get(_norm_key(key))


def clean_reply(text: str) -> str:
    """A free-text reply as a prompt: code fences, enclosing quotes and a leading label removed, trimmed."""
    t = (text or "").strip()
    m = _FENCE.search(t)
    if m and t.startswith("```"):
        t = m.group(1).strip()
    t = re.sub(r"^(?:prompt|caption|description|설명|프롬프트)\s*[:：]\s*", "", t, flags=re.I)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'“”":
        t = t[1:-1].strip()
    elif len(t) >= 2 and t[0] == "“" and t[-1] == "”":
        t = t[1:-1].strip()
    return t


def _close_truncated(s: str) -> str:
    """Close the strings, arrays and objects a reply cut off at max_new_tokens left open."""
    stack, in_str, esc, opened = [], False, False, 0
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str, opened = True, i
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    if in_str:
        s = s[:opened]  # a value cut mid-word is not worth keeping
    s = s.rstrip()
    while True:
        before = s
        s = re.sub(r"[,:]\s*$", "", s)  # a dangling comma, or a key whose value never came (dropped with it)
        if stack and stack[-1] == "}":
            s = re.sub(r'([{,])\s*"[^"]*"$', r"\1", s)  # a key without its value
        s = s.rstrip()
        if s == before:
            break
    s = re.sub(r",$", "", s)
    return s + "".join(reversed(stack))


def _repair(s: str) -> str:
    s = s.replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'")
    if '"' not in s:
        s = s.replace("'", '"')
    s = re.sub(r"//[^\n\"]*$", "", s, flags=re.M)  # // comments at line ends
    s = re.sub(r"([{,]\s*)([A-Za-z_\uac00-\ud7a3][\w \-\uac00-\ud7a3]*?)\s*:", r'\1"\2":', s)  # unquoted keys
    s = re.sub(r"\bTrue\b", "true", s)
    s = re.sub(r"\bFalse\b", "false", s)
    s = re.sub(r"\bNone\b", "null", s)
    s = re.sub(r",\s*([}\]])", r"\1", s)  # trailing commas
    return s


def _json_objects(text: str) -> list[dict]:
    """Every JSON object found in ``text``, strict first, then repaired, then with truncation closed."""
    decoder = json.JSONDecoder()
    bodies = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    found: list[dict] = []
    for body in bodies:
        starts = [i for i, ch in enumerate(body) if ch == "{"]
        for i in starts:
            try:
                obj, _ = decoder.raw_decode(body[i:])
            except ValueError:
                continue
            if isinstance(obj, dict):
                found.append(obj)
                break
        if found:
            return found
    for body in bodies:
        i = body.find("{")
        if i < 0:
            continue
        j = body.rfind("}")
        chunk = body[i:j + 1] if j > i else body[i:]
        for candidate in (_repair(chunk), _close_truncated(_repair(body[i:])), _close_truncated(body[i:])):
            try:
                obj, _ = decoder.raw_decode(candidate)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return [obj]
    return []


_LINE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?[*_\"'`]*([A-Za-z\uac00-\ud7a3][A-Za-z\uac00-\ud7a3 _\-/]{0,40}?)"
                   r"[*_\"'`]*\s*[:=：]\s*(.*?)\s*,?\s*$")


def _from_lines(text: str) -> dict[str, Any]:
    """``key: value`` / ``"key": "value"`` / ``- **Key**: value`` lines, for replies that are not JSON."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        key = _canonical(m.group(1))
        if key is None or key in out:
            continue
        value = m.group(2).strip()
        if value[:1] in "\"'" and value and value.count(value[0]) == 1:
            continue  # a quoted value cut off at max_new_tokens
        if key == "placement":
            value = _placement_from_text(text[text.find(line):])
            if value is None:
                continue
        elif key == "palette" and value.startswith("["):
            try:
                value = json.loads(_close_truncated(_repair(value)))
            except ValueError:
                value = value.strip("[]")
        elif key == "palette" and not value:  # a YAML-style list on the next lines
            rest = text[text.find(line) + len(line):].splitlines()
            value = []
            for item in rest:
                bullet = re.match(r"^\s*[-*•]\s+(.+?)\s*$", item)
                if not bullet:
                    if item.strip():
                        break
                    continue
                value.append(bullet.group(1))
        if isinstance(value, str) and value in ("", "{", "["):
            continue
        out[key] = value
    if "placement" not in out:
        region = _placement_from_text(text, need_context=True)
        if region is not None:
            out["placement"] = region
    return out


_NUM = r"(-?\d+(?:\.\d+)?)\s*(%?)"


def _placement_from_text(text: str, need_context: bool = False) -> dict | list | None:
    """x/y/w/h numbers (or a [x, y, w, h] list) after a placement key, from text that is not valid JSON."""
    if need_context:
        m = re.search(r"(placement|region|bbox|배치)", text, re.I)
        if not m:
            return None
        text = text[m.start():]
    lst = re.match(r"[^\[\n{]*?[:=：]\s*\[\s*" + r"\s*,\s*".join([_NUM] * 4), text)
    if lst:
        return [float(lst.group(k)) * (0.01 if lst.group(k + 1) else 1) for k in (1, 3, 5, 7)]
    region: dict[str, float] = {}
    window = text[:400]
    for name, value, pct in re.findall(r"[\"']?\b(x|y|w|h|width|height|left|top)\b[\"']?\s*[:=]\s*" + _NUM,
                                       window, re.I):
        key = {"width": "w", "height": "h", "left": "x", "top": "y"}.get(name.lower(), name.lower())
        region.setdefault(key, float(value) * (0.01 if pct else 1))
    return region or None


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_as_text(v) for v in value if _as_text(v))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_as_text(v)}" for k, v in value.items() if _as_text(v))
    return str(value).strip().strip("\"'").strip()


def _palette(value: Any) -> list[str]:
    if isinstance(value, str):
        items = re.split(r"\s*(?:,|;|/|\band\b|\n|·|、)\s*", value.strip().strip("[]"))
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, dict):
                name = v.get("name") or v.get("colour") or v.get("color") or v.get("hex") or next(iter(v.values()), "")
                hexv = v.get("hex")
                items.append(f"{name} ({hexv})" if hexv and hexv != name else str(name))
            else:
                items.append(_as_text(v))
    elif isinstance(value, dict):
        items = [_as_text(v) if not isinstance(k, str) or k.isdigit() else str(k) for k, v in value.items()]
    else:
        items = []
    out = []
    for item in items:
        item = item.strip().strip("\"'.").strip()
        if item and item.lower() not in (x.lower() for x in out):
            out.append(item)
    return out[:8]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*" + _NUM + r"\s*", v)
        if m:
            return float(m.group(1)) * (0.01 if m.group(2) else 1)
    return None


def normalise_placement(value: Any) -> dict[str, float] | None:
    """{x, y, w, h} in 0–1 (top-left corner + size) from a dict, a [x, y, w, h] list or corners; None if unusable.

    Percentages (values up to 100) are scaled; pixel values cannot be (the image size is unknown) and give None.
    """
    nums: dict[str, float] = {}
    if isinstance(value, dict):
        low = {_norm_key(k): v for k, v in value.items()}
        for key, names in (("x", ("x", "left", "x0", "x_min", "xmin")), ("y", ("y", "top", "y0", "y_min", "ymin")),
                           ("w", ("w", "width")), ("h", ("h", "height")),
                           ("x1", ("x1", "right", "x_max", "xmax")), ("y1", ("y1", "bottom", "y_max", "ymax"))):
            for n in names:
                if n in low and _number(low[n]) is not None:
                    nums[key] = _number(low[n])
                    break
    elif isinstance(value, (list, tuple)) and len(value) == 4 and all(_number(v) is not None for v in value):
        x, y, a, b = (_number(v) for v in value)
        nums = {"x": x, "y": y, "w": a, "h": b}
        if (x + a > 1.0001 or y + b > 1.0001) and a > x and b > y and max(x, y, a, b) <= 1.0001:
            nums = {"x": x, "y": y, "x1": a, "y1": b}  # [x0, y0, x1, y1] corners
    else:
        return None
    if "w" not in nums and "x1" in nums and "x" in nums:
        nums["w"] = nums["x1"] - nums["x"]
    if "h" not in nums and "y1" in nums and "y" in nums:
        nums["h"] = nums["y1"] - nums["y"]
    vals = [nums[k] for k in ("x", "y", "w", "h") if k in nums]
    if not vals:
        return None
    if max(vals) > 1.0001:
        if max(vals) > 100.0001:
            return None  # pixels
        nums = {k: v / 100.0 for k, v in nums.items()}
    w = min(1.0, max(0.01, nums.get("w", DEFAULT_PLACEMENT["w"])))
    h = min(1.0, max(0.01, nums.get("h", DEFAULT_PLACEMENT["h"])))
    x = min(max(0.0, nums.get("x", (1.0 - w) / 2)), 1.0 - w)
    y = min(max(0.0, nums.get("y", DEFAULT_PLACEMENT["y"])), 1.0 - h)
    return {"x": round(x, 4), "y": round(y, 4), "w": round(w, 4), "h": round(h, 4)}


def _pairs(obj: Mapping) -> dict[str, Any]:
    """Our keys from a decoded JSON object (aliases, nested {"analysis": {...}} wrappers)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = _canonical(k)
        if key is not None and key not in out:
            out[key] = v
    if not out:
        for v in obj.values():
            if isinstance(v, Mapping):
                nested = _pairs(v)
                if nested:
                    return nested
    if "light_direction" not in out and isinstance(out.get("lighting"), Mapping):
        light = {_norm_key(k): v for k, v in out["lighting"].items()}
        if "direction" in light:
            out["light_direction"] = light["direction"]
    return out


def parse_analysis(text: str) -> dict:
    """The model's reply → the analysis dict (see the module docstring). Never raises.

    Reads the first JSON object (code fences, text around it, single quotes, trailing commas, unquoted keys and a
    reply cut off mid-object are all tolerated), then ``key: value`` lines for whatever is still missing. Fields
    not found get defaults (empty text, no colours, a lower-middle placement); ``found`` lists the others. When
    nothing is found, ``scene`` is the reply itself so the text is not lost.
    """
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    raw: dict[str, Any] = {}
    for obj in _json_objects(text):
        for k, v in _pairs(obj).items():
            raw.setdefault(k, v)
    for k, v in _from_lines(text).items():
        raw.setdefault(k, v)

    result: dict[str, Any] = {"scene": "", "lighting": "", "light_direction": "", "palette": [], "mood": "",
                              "camera": "", "placement": dict(DEFAULT_PLACEMENT)}
    found = []
    for key in ANALYSIS_KEYS:
        if key not in raw:
            continue
        if key == "palette":
            value = _palette(raw[key])
        elif key == "placement":
            value = normalise_placement(raw[key])
        elif key == "lighting" and isinstance(raw[key], Mapping):
            light = {_norm_key(k): v for k, v in raw[key].items()}
            value = _as_text({k: v for k, v in light.items() if k != "direction"}) or _as_text(raw[key])
        else:
            value = _as_text(raw[key])
        if value:
            result[key] = value
            found.append(key)
    if not found:
        result["scene"] = clean_reply(text)[:_SCENE_FALLBACK_CHARS]
    result["found"] = found
    return result


_GLUE = {
    "en": {"light": "{} lighting", "from": "light coming from the {}", "mood": "{} mood",
           "palette": "colour palette of {}"},
    "ko": {"light": "{} 조명", "from": "{}에서 오는 빛", "mood": "{} 분위기", "palette": "색감: {}"},
}
_UNKNOWN = {"", "unknown", "none", "n/a", "na", "null", "알 수 없음", "없음"}


def analysis_prompt(analysis: Mapping, language: str = "en", fallback: str = "") -> str:
    """A FLUX Fill prompt that matches the analysed scene (scene, light, mood, colours, camera), or the cleaned
    ``fallback`` reply when the analysis holds none of them."""
    glue = _GLUE.get(language, _GLUE["en"])
    parts = []

    def add(value: str) -> None:
        value = value.strip().rstrip(".").strip()
        if value and value.lower() not in _UNKNOWN:
            parts.append(value)

    add(str(analysis.get("scene") or ""))
    lighting = str(analysis.get("lighting") or "").strip()
    if lighting.lower() not in _UNKNOWN:
        add(lighting if re.search(r"light|조명|빛", lighting, re.I) else glue["light"].format(lighting))
    direction = str(analysis.get("light_direction") or "").strip().rstrip(".")
    if direction.lower() not in _UNKNOWN:
        add(direction if re.search(r"light|빛|광", direction, re.I) else glue["from"].format(direction))
    mood = str(analysis.get("mood") or "").strip().rstrip(".")
    if mood.lower() not in _UNKNOWN:
        add(mood if re.search(r"mood|분위기", mood, re.I) else glue["mood"].format(mood))
    palette = [str(c) for c in analysis.get("palette") or [] if str(c).strip()]
    if palette:
        joined = ", ".join(palette[:-1]) + (" and " if language == "en" else ", ") + palette[-1] \
            if len(palette) > 1 else palette[0]
        add(glue["palette"].format(joined))
    add(str(analysis.get("camera") or ""))
    if not parts:
        return clean_reply(fallback)
    return ", ".join(parts)


def analysis_json(analysis: Mapping) -> str:
    return json.dumps(analysis, ensure_ascii=False)
