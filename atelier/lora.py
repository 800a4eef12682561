"""LoRAs on a cached pipeline (SDXL try-on, FLUX Fill): diffusers' own ``load_lora_weights`` / ``set_adapters``.

A pipe handle carries its LoRA list (:class:`LoraRef`: file + strength); the base model stays in the registry under
its spec. Before each run :func:`sync` makes the loaded pipeline carry exactly that list: files that left the list
are deleted as adapters, new files are loaded (each checked: a LoRA for another base model is a clear error listing
what did not match), and the strengths are set with ``set_adapters``. Changing a strength loads nothing.

Key formats: whatever diffusers reads (kohya/ComfyUI ``lora_unet_…``/``lora_te1_…``, diffusers/PEFT ``lora_A``/
``lora_B``, FLUX's BFL names). Files are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, ModelFileError

log = logging.getLogger("atelier")

STRENGTH_RANGE = (-2.0, 2.0)
_DOWN = re.compile(r"(\.lora_down\.weight|\.lora_A(\.[^.]+)?\.weight|\.lora\.down\.weight|_lora\.down\.weight)$")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA in a pipe's list: the file (with its size and mtime: replacing it reloads it) and its strength."""

    path: str
    strength: float
    size: int
    mtime_ns: int

    @property
    def adapter(self) -> str:
        """The adapter name inside the pipeline (one per file version)."""
        tag = hashlib.sha1(f"{os.path.abspath(self.path)}|{self.size}|{self.mtime_ns}".encode()).hexdigest()[:12]
        return f"atelier_{tag}"


def ref(path: str, strength: float) -> LoraRef:
    """A LoraRef for ``path`` (checked: a readable .safetensors) at ``strength``."""
    if not STRENGTH_RANGE[0] <= strength <= STRENGTH_RANGE[1]:
        raise InputError(f"a LoRA strength between {STRENGTH_RANGE[0]:g} and {STRENGTH_RANGE[1]:g}", f"{strength:g}",
                         "1 is the LoRA as trained; 0 switches it off; negative values push the other way.")
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ModelFileError("a LoRA as .safetensors", f"'{p.name}'",
                             "Atelier reads LoRAs as safetensors only (pickled .pt/.ckpt files can run code).")
    try:
        st = p.stat()
    except OSError as e:
        raise ModelFileError("a LoRA file in models/loras", f"'{path}' ({e})", "Refresh (R) and pick a file that exists.") from e
    return LoraRef(path=str(p), strength=float(strength), size=st.st_size, mtime_ns=st.st_mtime_ns)


def with_lora(handle: Any, lora: LoraRef) -> Any:
    """The same handle with ``lora`` appended to its list (a file already there gets the strengths added)."""
    import dataclasses

    loras = list(getattr(handle, "loras", ()))
    for i, old in enumerate(loras):
        if old.adapter == lora.adapter:
            loras[i] = dataclasses.replace(old, strength=old.strength + lora.strength)
            break
    else:
        loras.append(lora)
    return dataclasses.replace(handle, loras=tuple(loras))


def describe(loras: tuple[LoraRef, ...]) -> str:
    return ", ".join(f"{Path(r.path).stem} ×{r.strength:g}" for r in loras)


# ----------------------------------------------------------------------------------------------- loading


def _read(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise ModelFileError("a LoRA .safetensors file", f"'{Path(path).name}' that cannot be read ({e})",
                             "Re-download the file; partial downloads are the usual cause.") from e


def _layers_in_file(state: dict) -> list[str]:
    return sorted({_DOWN.sub("", k) for k in state if _DOWN.search(k)})


def _injected(pipe, adapter: str) -> int:
    n = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            n += sum(1 for m in module.modules() if adapter in getattr(m, "lora_A", {}))
    return n


def guess_base(keys) -> str:
    """What a LoRA file was trained for, from its key names (for error messages)."""
    text = " ".join(list(keys)[:4000])
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks|transformer_blocks\.\d+\.attn\.add_q_proj", text):
        return "FLUX"
    # kohya names SDXL's UNet layers the SGM way (input_blocks …); its SD1.5 LoRAs use diffusers' (down_blocks …)
    if "lora_te2_" in text or "text_encoder_2." in text or re.search(r"lora_unet_(input|output)_blocks|middle_block", text):
        return "SDXL"
    if "lora_te_" in text or "lora_unet_down_blocks_0_attentions" in text or "down_blocks.0.attentions" in text:
        return "SD1.5"
    return "an unknown model"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_checked(pipe, lora: LoraRef, base: str) -> None:
    """``pipe.load_lora_weights`` for one file under its adapter name; a file whose layers do not all find their
    module (or whose shapes differ) is removed again and raised as a ModelFileError naming what did not match."""
    state = _read(lora.path)
    layers = _layers_in_file(state)
    name = Path(lora.path).name
    if not layers:
        raise ModelFileError("a LoRA file (lora_down/lora_up or lora_A/lora_B weights)", f"'{name}' without any",
                             "Pick a LoRA file; this one holds other weights.")
    capture = _Capture()
    watched = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in watched:
        lg.addHandler(capture)
    problem = None
    try:
        pipe.load_lora_weights(dict(state), adapter_name=lora.adapter)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        problem = str(e).split("\n")[0][:300]
    finally:
        for lg in watched:
            lg.removeHandler(capture)
    injected = 0 if problem else _injected(pipe, lora.adapter)
    # "No LoRA keys associated to <part>" only says a part is untouched; unexpected keys are layers left over
    unmatched = [m for m in capture.messages if re.search(r"unexpected keys|not found in the model", m)]
    if problem is None and injected >= len(layers) and not unmatched:
        log.info("Atelier: LoRA %s loaded (%d layers)", name, injected)
        return
    try:
        pipe.delete_adapters([lora.adapter])
    except Exception:  # noqa: BLE001 - nothing (or half) was loaded
        log.debug("Atelier: removing a LoRA that did not load failed", exc_info=True)
    detail = problem or (unmatched[0][:300] if unmatched else
                         "; ".join(m[:160] for m in capture.messages[:2]) or "no layer of the file found its module")
    raise ModelFileError(
        f"a LoRA for {base} (its layers named and shaped like {base}'s)",
        f"'{name}', which looks like a LoRA for {guess_base(state)}: {injected} of {len(layers)} layers matched "
        f"(unmatched e.g. {', '.join(layers[:3])}; {detail})",
        f"Pick a LoRA trained for {base}, or remove the LoRA node.")


def sync(model: Any, loras: tuple[LoraRef, ...], base: str) -> None:
    """Make the loaded pipeline ``model.pipe`` carry exactly ``loras`` (see the module docstring)."""
    pipe = model.pipe
    loaded: dict[str, LoraRef] = getattr(model, "lora_loaded", None) or {}
    wanted = {r.adapter: r for r in loras}
    gone = [a for a in loaded if a not in wanted]
    if gone:
        pipe.delete_adapters(gone)
        for a in gone:
            loaded.pop(a)
        log.info("Atelier: %d LoRA(s) unloaded from the cached pipeline", len(gone))
    for adapter, r in wanted.items():
        if adapter not in loaded:
            load_checked(pipe, r, base)
            loaded[adapter] = r
    model.lora_loaded = loaded
    if wanted:
        pipe.set_adapters(list(wanted), adapter_weights=[r.strength for r in wanted.values()])
