"""Model folders on disk, for every stage: finding them under ComfyUI's model roots and checking a diffusers
pipeline folder before anything is loaded (the error lists every missing file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from .errors import ModelFileError


def find_model_folders(roots: Iterable[str | os.PathLike], is_model: Callable[[Path], bool]) -> list[tuple[str, Path]]:
    """(name relative to its root, path) of every folder up to two levels under ``roots`` for which ``is_model``
    holds (``Model`` or ``Org/Model``); a model folder is not searched further, a name found twice is listed once."""
    found: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if not child.is_dir():
                continue
            candidates = [(child.name, child)]
            if not is_model(child):
                try:
                    candidates = [(f"{child.name}/{g.name}", g) for g in sorted(child.iterdir()) if g.is_dir()]
                except OSError:
                    continue
            for name, path in candidates:
                if name not in seen and is_model(path):
                    seen.add(name)
                    found.append((name, path))
    return found


def diffusers_pipeline_class(folder: str | os.PathLike) -> str | None:
    """``_class_name`` of a diffusers folder's model_index.json, or None when it has none (or it is unreadable)."""
    try:
        with open(Path(folder) / "model_index.json", encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None


def check_diffusers_folder(folder: str | os.PathLike, pipeline_class: str, parts: dict[str, tuple[str, ...]],
                           what: str, source: str) -> None:
    """Raise a ModelFileError naming what is missing or wrong in a ``pipeline_class`` folder.

    ``parts``: subfolder → the files it needs (glob patterns; "a|b": either will do). ``what`` names the model for
    people ("FLUX.1 Fill"), ``source`` where its files come from ("black-forest-labs/FLUX.1-Fill-dev")."""
    folder = Path(folder)
    cls = diffusers_pipeline_class(folder)
    if cls is None:
        raise ModelFileError(f"a diffusers folder with model_index.json in '{folder}'", "no readable model_index.json",
                             f"Put the whole {what} folder ({source}, every subfolder, as save_pretrained writes "
                             f"it) under models/diffusers.")
    if cls != pipeline_class:
        raise ModelFileError(f"a {pipeline_class} folder", f"a {cls} folder ('{folder.name}')",
                             f"Pick a {what} model ({source}) in the model list.")
    missing = []
    for part, patterns in parts.items():
        for pat in patterns:
            if not any(list((folder / part).glob(alt)) for alt in pat.split("|")):
                missing.append(f"{part}/{pat.replace('|', ' or ')}")
    if missing:
        expected = ", ".join(f"{p}/{'+'.join(f).replace('|', ' or ')}" for p, f in parts.items())
        raise ModelFileError(f"a complete {what} folder (model_index.json, {expected})",
                             f"'{folder}' without {', '.join(missing)}",
                             f"Copy the missing files from {source} (every subfolder) into that folder.")
