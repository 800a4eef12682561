"""One tqdm bar for the whole batch: items done, items/s, ETA, failures and every server's state."""
from __future__ import annotations

import sys


class Bar:
    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.failed = 0
        self.states: dict = {}
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="item", dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                            desc="batch")

    def set_states(self, states: dict) -> None:
        if states != self.states:
            self.states = dict(states)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            text = " ".join(f"{k}:{v}" for k, v in self.states.items())
            self.bar.set_postfix_str((f"failed {self.failed} | " if self.failed else "") + text, refresh=False)

    def update(self, server: str, failed: bool = False) -> None:
        self.failed += int(failed)
        if self.bar is not None:
            self._postfix()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
