"""Which pending item a free server gets: model affinity.

Items carry an affinity key (their loaders' settings). A server keeps the model of the last item it ran (Atelier's
registry and ComfyUI's cache keep it warm), so it gets, in order of preference:
1. an item with the key it holds;
2. an item of a key that no other live server holds (the largest such group first) — a new model is loaded once;
3. an item of the key with the most pending items per server holding it (helping the busiest group).
Within a key, rows run in table order.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable, Optional


class Queue:
    def __init__(self, items: Iterable = ()):
        self.by_key: "OrderedDict[str, deque]" = OrderedDict()
        for item_id, key in items:
            self.push(item_id, key)

    def push(self, item_id: str, key: str, front: bool = False) -> None:
        q = self.by_key.setdefault(key, deque())
        (q.appendleft if front else q.append)(item_id)

    def __len__(self) -> int:
        return sum(len(q) for q in self.by_key.values())

    def pick(self, held: Optional[str], others: Iterable[Optional[str]]) -> Optional[tuple]:
        """(item_id, key) for a server holding `held` while the other live servers hold `others`; None if empty."""
        keys = [k for k, q in self.by_key.items() if q]
        if not keys:
            return None
        if held in keys:
            key = held
        else:
            others = [o for o in others if o is not None]
            free = [k for k in keys if k not in others]
            if free:
                key = max(free, key=lambda k: len(self.by_key[k]))
            else:
                key = max(keys, key=lambda k: len(self.by_key[k]) / (1 + others.count(k)))
        item_id = self.by_key[key].popleft()
        return item_id, key
