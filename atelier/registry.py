"""One module-level cache of loaded models, keyed by spec.

Node classes hold no state (ComfyUI clones them per run); every loaded pipeline lives here. The bridge hooks
:func:`ModelRegistry.on_built` to register each entry with ComfyUI's model management, which calls
:func:`ModelRegistry.release` when the user presses Unload, POSTs /free, or a core model needs the memory.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("atelier")


class ModelRegistry:
    def __init__(self) -> None:
        self._entries: dict[Hashable, Any] = {}
        self._groups: dict[Hashable, str] = {}
        self._lock = threading.RLock()
        self.loads = 0  # how many builds ran (tests observe reloads through this)
        self.on_built: Callable[[Hashable, Any], None] | None = None
        self.on_released: Callable[[Hashable], None] | None = None

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            return self._entries.get(key)

    def get_or_build(self, key: Hashable, build: Callable[[], Any], group: str | None = None) -> Any:
        """Return the cached entry for ``key``; build it if missing.

        ``group``: entries of one group are exclusive (another FLUX Fill setting replaces the previous one, the
        way a checkpoint loader replaces its model) so that changing a toggle never holds two pipelines at once.
        """
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            if group is not None:
                for other in [k for k, g in self._groups.items() if g == group and k != key]:
                    self.release(other)
            entry = build()
            self._entries[key] = entry
            if group is not None:
                self._groups[key] = group
            self.loads += 1
        if self.on_built is not None:
            self.on_built(key, entry)
        return entry

    def release(self, key: Hashable) -> bool:
        """Drop an entry and free its memory; True if something was released."""
        with self._lock:
            entry = self._entries.pop(key, None)
            self._groups.pop(key, None)
        if entry is None:
            return False
        close = getattr(entry, "close", None)
        if callable(close):
            close()
        del entry
        _collect()
        if self.on_released is not None:
            self.on_released(key)
        log.info("Atelier: released a loaded model (%s)", _short(key))
        return True

    def release_all(self) -> int:
        with self._lock:
            keys = list(self._entries)
        return sum(self.release(k) for k in keys)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)


def _collect() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is always there in ComfyUI
        pass


def _short(key: Hashable) -> str:
    text = repr(key)
    return text if len(text) < 120 else text[:117] + "..."


REGISTRY = ModelRegistry()
