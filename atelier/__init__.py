"""Atelier's engine: pure Python on top of torch / diffusers / transformers.

Nothing in this package imports ComfyUI (`comfy`, `folder_paths`, ...): the thin nodes in ``nodes/`` translate
ComfyUI values into calls of these modules, and ``nodes/_bridge.py`` owns every ComfyUI hook. Modules import
their heavy dependencies lazily so that ComfyUI boots quickly and the engine's pure parts test without them.
"""

__all__ = ["errors", "types", "images", "progress", "memory", "registry", "flux_files", "fill"]
