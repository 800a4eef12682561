"""Checks and translations at the node boundary, the same for every stage.

* :func:`check_inputs`: what core's min/max/combo validation lets through but no model should see: a NaN or
  infinite number (``float("nan")`` passes ``min <= x <= max`` checks), text with a lone UTF-16 surrogate (what a
  broken emoji copy leaves; tokenizers fail with a TypeError), JSON text nested absurdly deep (Python's json
  parser fails with a RecursionError).
* :func:`translate`: a library exception that escaped a stage, as an :class:`~atelier.errors.AtelierError` with
  expected / got / fix: out of GPU memory (naming the loader toggles that need less), out of host memory, too
  deep recursion. ``None`` for anything else (it travels unchanged; Stop's interrupt exception among them).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .analysis import json_brackets
from .errors import AtelierError, InputError, SettingError, describe_error

MAX_NESTING = 64  # JSON inputs (points, boxes, keypoints, keyframes) are 2–4 levels deep

# the loader toggles that trade speed for memory: (name, value that needs less, how to say it)
MEMORY_TOGGLES: tuple[tuple[str, Any, str], ...] = (
    ("offload", ("model", "sequential"), "offload 'model' (or 'sequential', the least VRAM)"),
    ("quantization", None, "quantization 'nf4' or 'int8' (weights in 4 or 8 bits)"),
    ("vae_tiling", True, "vae_tiling on (decode large images in tiles)"),
    ("vae_slicing", True, "vae_slicing on (decode a batch one image at a time)"),
    ("attention_slicing", True, "attention_slicing on"),
)
LOWER_RESOLUTION = "a lower resolution (a smaller image, width/height or resolution input, or fewer images per batch)"


def check_inputs(inputs: Mapping[str, Any]) -> None:
    """Raise an InputError naming the first input whose value no model can use (see the module doc)."""
    for name, value in inputs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"a finite number for '{name}'", repr(value),
                             f"Type a number in '{name}' (NaN and infinity are not numbers a model can use).")
        if isinstance(value, str):
            check_text(name, value)


# combo inputs that list model files: the loaders resolve these themselves (inside their models/ folder) and say
# what they found there ("no such file", "a FluxPipeline folder"), which teaches more than the list would
FILE_CHOICES = frozenset({"model", "clip_l", "t5xxl", "vae", "controlnet", "ip_adapter", "clip_vision", "fast_lora",
                          "base", "lora", "redux", "siglip"})


def check_choices(inputs: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """Each combo input's value is one of its options ({input: options}); ComfyUI 0.3.75 does not check V3 combos
    at validation, so an API client's typo would otherwise reach the node (a 'tpu' device ran on the CPU)."""
    for name, allowed in options.items():
        value = inputs.get(name)
        if name in FILE_CHOICES or value is None or not allowed or value in allowed:
            continue
        listed = ", ".join(map(str, list(allowed)[:12])) + (", …" if len(allowed) > 12 else "")
        raise InputError(f"{name} one of {listed}", repr(value)[:200], "Pick one of the listed values.")


def check_text(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"'{name}' as Unicode text", f"a lone UTF-16 surrogate {text[e.start]!r} at character "
                         f"{e.start} (half of an emoji or of another character outside the basic plane)",
                         f"Retype or re-paste the text of '{name}'; the character at {e.start} was cut in "
                         "half when it was copied.") from None
    head = text.lstrip()[:1]
    if head in ("[", "{") and nesting_depth(text) > MAX_NESTING:
        raise InputError(f"'{name}' as JSON nested at most {MAX_NESTING} levels deep",
                         f"brackets nested {nesting_depth(text)} levels deep",
                         f"Write '{name}' as a flat list (e.g. [[x, y], ...]); nothing Atelier reads nests deeper.")


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside JSON strings."""
    depth = best = 0
    for _, ch in json_brackets(text)[0]:
        if ch in "[{":
            depth += 1
            best = max(best, depth)
        else:
            depth = max(0, depth - 1)
    return best


def is_out_of_gpu_memory(e: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(e, oom):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def settings_of(inputs: Mapping[str, Any]) -> dict:
    """The memory toggles the node was given: its own inputs (a loader) or the spec of a handle it was given."""
    found: dict = {}
    sources: list = [inputs]
    for value in inputs.values():
        spec = getattr(value, "spec", None)
        if spec is not None:
            sources.append(vars(spec) if hasattr(spec, "__dict__") else {
                f: getattr(spec, f) for f in getattr(spec, "__dataclass_fields__", {})})
        resolved = getattr(value, "offload", None)
        if isinstance(resolved, str):
            found.setdefault("offload", resolved)  # the mode the loader resolved ("auto" → none/model/...)
    for src in sources:
        for name, _, _ in MEMORY_TOGGLES:
            if name in src and name not in found:
                found[name] = src[name]
    return found


def memory_fixes(settings: Mapping[str, Any]) -> list[str]:
    """The toggles that would need less memory than the current settings, most effective first."""
    fixes = []
    for name, better, say in MEMORY_TOGGLES:
        if name not in settings:
            continue
        now = settings[name]
        if name == "offload" and now in better:
            if now == "model":
                fixes.append("offload 'sequential' (the least VRAM)")
            continue
        if name == "quantization" and now not in (None, "none"):
            continue
        if isinstance(better, bool) and bool(now) == better:
            continue
        fixes.append(f"{say} (now {now!r})" if not isinstance(now, bool) else say)
    return fixes + [LOWER_RESOLUTION]


def out_of_memory(node: str, inputs: Mapping[str, Any], error: BaseException, device: str = "GPU") -> SettingError:
    fixes = memory_fixes(settings_of(inputs))
    where = "on the loader " if any(not isinstance(v, (str, int, float, bool)) and getattr(v, "spec", None)
                                    for v in inputs.values()) else ""
    return SettingError(f"enough {device} memory for {node} at these settings",
                        f"out of {device} memory ({describe_error(error)})",
                        f"Change {where}one of: " + "; ".join(fixes) + ". ComfyUI freed the half-loaded models; "
                        "run again after the change.")


def translate(node: str, inputs: Mapping[str, Any], e: BaseException) -> AtelierError | None:
    """An AtelierError for a library exception that escaped ``node``, or None when it should travel unchanged."""
    if isinstance(e, AtelierError):
        return None
    if is_out_of_gpu_memory(e):
        return out_of_memory(node, inputs, e)
    if isinstance(e, MemoryError):
        return out_of_memory(node, inputs, e, device="host (RAM)")
    if isinstance(e, RecursionError):
        texts = [n for n, v in inputs.items() if isinstance(v, str) and v.lstrip()[:1] in ("[", "{")]
        return InputError(f"inputs nested at most {MAX_NESTING} levels deep",
                          f"input(s) {', '.join(texts) or 'of this node'} nested too deep to read (RecursionError)",
                          "Write them as flat JSON lists.")
    return None

