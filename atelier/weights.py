"""Weight files, for every stage: safetensors headers, state dicts, file stamps and the key-mismatch report.

Nothing here knows a model: a stage recognises its architecture from what these functions return and words its
own errors (``what`` / ``fix``). Reading is offline and safe: ``.safetensors`` through safetensors, anything else
through ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError, describe_error

WRAPPERS = ("state_dict", "model", "model_state_dict")  # where training checkpoints keep their tensors


def file_stamp(path: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime in ns) of a file, (0, 0) when it cannot be read: a file replaced under the same name gets
    another stamp, so specs and node fingerprints that hold it see a new model."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return (0, 0)
    return (st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------------- headers


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Tensor names -> {dtype, shape, data_offsets} from a .safetensors header, without reading the tensors.

    Cached per (path, size, mtime); a header whose length or tensor offsets run past the end of the file (a partial
    download) is a ModelFileError.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ModelFileError("a .safetensors file", f"'{path}' that cannot be read ({e})",
                             "Check the path; the file may have been moved or deleted.") from e
    return _read_header(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=512)
def _read_header(path: str, size: int, mtime: int) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100_000_000 or n > size:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        spans = sorted((int(m["data_offsets"][0]), int(m["data_offsets"][1]), k) for k, m in header.items()
                       if k != "__metadata__")
        ends = [end for _, end, _ in spans]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"tensor data ends at byte {8 + n + max(ends)} but the file has {size}")
        at = 0
        for start, end, key in spans:  # what safetensors itself requires: tensors back to back, none overlapping
            if start != at or end < start:
                raise ValueError(f"the header's offsets for '{key}' ({start}–{end}) overlap or leave a gap")
            at = end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise ModelFileError("a .safetensors file", f"'{path}' that cannot be read ({e})",
                             "Re-download the file; partial downloads are the usual cause.") from e
    header.pop("__metadata__", None)
    return header


# ------------------------------------------------------------------------------------------------ state dicts


def _torch_load(path: str, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e).lower():  # the legacy (pre-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        raise


def read_state_dict(path: str | os.PathLike, *, what: str | None = None, fix: str | None = None,
                    mmap: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint on the CPU: ``.safetensors``, or a ``.pt`` / ``.pth`` / ``.ckpt`` read with
    ``weights_only=True`` (``mmap``: memory-mapped where the format allows). Training wrappers ({"state_dict": …},
    {"model": …}, {"model_state_dict": …}) are unwrapped; entries that are not tensors (epoch counters …) are left
    out. A file that cannot be read or holds no tensors is a ModelFileError with ``what`` (default: a readable
    checkpoint) and ``fix``."""
    path = str(path)
    name = Path(path).name
    what = what or f"a readable checkpoint in '{name}'"
    fix = fix or "The file is damaged or incomplete; download it again."
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = _torch_load(path, mmap)
    except Exception as e:  # noqa: BLE001 - safetensors/pickle errors are many: any of them is a file problem
        raise ModelFileError(what, f"'{name}' that cannot be read ({describe_error(e)})", fix) from e
    while isinstance(state, Mapping) and any(isinstance(state.get(w), Mapping) for w in WRAPPERS):
        state = next(state[w] for w in WRAPPERS if isinstance(state.get(w), Mapping))
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(state, Mapping) else {}
    if not tensors:
        held = f"a {type(state).__name__}" + (" without tensors" if isinstance(state, Mapping) else "")
        raise ModelFileError(what, f"'{name}' holding {held}", fix)
    return tensors


# ------------------------------------------------------------------------------------------- key mismatches


def mismatch_report(expected: Mapping[str, Sequence[int]], found: Mapping[str, Any],
                    optional: Iterable[str] = ()) -> str:
    """What keeps ``found`` (name → tensor or shape) from loading strictly into a model whose state dict has
    ``expected`` (name → shape): "2 missing: a, b; 1 unexpected: c; 1 wrong shape: d (2,) (expected (1,))", at
    most four names each; "" when everything fits. Names ending in one of ``optional`` may be missing."""
    optional = tuple(optional)
    want = {k: tuple(v) for k, v in expected.items()}

    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = [k for k in want if k not in found and not (optional and k.endswith(optional))]
    unexpected = [k for k in found if k not in want]
    wrong = [f"{k} {shape(found[k])} (expected {want[k]})" for k in want if k in found and shape(found[k]) != want[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{', …' if len(items) > 4 else ''}")
    return "; ".join(parts)
