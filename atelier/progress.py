"""How long loops report progress and notice Stop without knowing about ComfyUI."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """One unit of work done. Implementations may raise to stop the loop (ComfyUI's Stop button does)."""

    def step(self, n: int = 1) -> None: ...


class NullProgress:
    """Progress that goes nowhere: engine tests and scripts."""

    def __init__(self) -> None:
        self.done = 0

    def step(self, n: int = 1) -> None:
        self.done += n
