"""The stage contract: the one life cycle every Atelier model stage spells the same way.

A *stage* is one kind of model (FLUX Fill, Qwen-Image-Layered, the VLM captioner, a background remover, SAM2, and
every later one). Its engine module defines two frozen dataclasses and one :class:`Stage`:

* a **spec**: what the user chose on the loader node (paths, quantization, offload, dtype, device …). It is
  hashable: it is the key of the loaded model in :data:`atelier.registry.REGISTRY`;
* a **handle**: the spec plus what was resolved from it (offload mode, dtype, what the files are). Handles travel
  between nodes; they never hold a model, so ComfyUI's Unload button can drop the model while ComfyUI's output
  cache still holds the handle (the next use rebuilds it);
* ``STAGE = Stage(group=…, make_handle=…, need_bytes=…, load=…, summary=…)``:

  ============  ==============================================  ==================================================
  member        signature                                       does
  ============  ==============================================  ==================================================
  group         ``str``                                         registry group: one loaded model per group (another
                                                                setting replaces the previous one)
  make_handle   ``(spec, free_vram: int | None) -> handle``     checks the files, resolves offload/dtype; loads
                                                                nothing
  need_bytes    ``(handle, free_vram: int | None) -> int``      VRAM to make room for before loading
  load          ``(handle) -> model``                           builds the model: the registry entry, with
                                                                ``resident_bytes``, ``device``, ``notes``, ``close()``
  summary       ``(handle, model | None) -> str``               one line for the loader node (+ the model's notes)
  ============  ==============================================  ==================================================

Scripts and engine tests get a model with :func:`get`; ComfyUI nodes with ``nodes._bridge.acquire(STAGE, handle)``,
which first lets ComfyUI make room for :attr:`Stage.need_bytes` and registers the model with its memory manager.
``tests/engine/test_stage_contract.py`` runs every stage of :data:`STAGE_MODULES` through the contract.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import SettingError
from .registry import REGISTRY


@dataclass(frozen=True)
class Stage:
    """How one kind of model is checked, sized, built and described (see the module docstring)."""

    group: str
    make_handle: Callable[[Any, int | None], Any]
    need_bytes: Callable[[Any, int | None], int]
    load: Callable[[Any], Any]
    summary: Callable[[Any, Any], str]

    def __post_init__(self) -> None:
        if not self.group or not self.group.replace("_", "").isalnum():
            raise ValueError(f"a stage group is a short identifier, got {self.group!r}")


# The stages, by group → the engine module (relative to this package) that defines ``STAGE``. A new stage adds one
# row; the contract test and the bridge's documentation read this table. Modules are imported on demand, so an
# optional package a stage needs (sam2, ai-edge-litert …) is only imported when that stage is used.
STAGE_MODULES: dict[str, str] = {
    "flux_fill": "fill",
    "layered": "layers",
    "vlm": "captioner",
    "bg_remover": "masker",
    "sam2": "segmenter",
    "pose": "pose",
    "depth": "depth",
    "fastcomposer": "fastcomposer",
    "character": "character",
    "tryon": "tryon",
    "redux": "flux_tryon",
}


def stage_of(group: str) -> Stage:
    """The :class:`Stage` registered under ``group`` in :data:`STAGE_MODULES`."""
    module = importlib.import_module(f".{STAGE_MODULES[group]}", __package__)
    stage = module.STAGE
    if stage.group != group:
        raise ValueError(f"atelier.{STAGE_MODULES[group]}.STAGE.group is {stage.group!r}, the table says {group!r}")
    return stage


def get(stage: Stage, handle: Any) -> Any:
    """The loaded model for ``handle`` from the registry: built now if it was never loaded or was released."""
    return REGISTRY.get_or_build(handle.spec, lambda: stage.load(handle), group=stage.group)


def with_notes(line: str, model: Any = None) -> str:
    """A summary line followed by the loaded model's notes (one per line), the way every loader shows them."""
    notes = getattr(model, "notes", None) or []
    return line + "".join(f"\n{n}" for n in notes)


def released(what: str) -> SettingError:
    """The error a model object raises when it is used after ComfyUI released it (Unload, /free)."""
    return SettingError(f"a loaded {what}", "one that was released (Unload models or /free)",
                        "Queue the prompt again: the loader rebuilds it.")
