"""A bounded memo that one accountant object owns (its caches live and die with it).

Every accountant here answers from the events alone, so what it computes for a key never changes and can
be kept; the memo forgets the least recently used entry beyond ``maxsize`` (composed PLD grids are up to
32 MB each). A fresh accountant object starts with empty memos: that is how a benchmark times it cold.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

Value = TypeVar("Value")


class Memo:
    """Values by key, at most ``maxsize`` of them, least recently used forgotten first. Safe to share
    between threads (like ``functools.lru_cache``): two threads missing the same key both compute it."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._values: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Value]) -> Value:
        """The value kept for ``key``, or ``compute()`` kept for next time (an exception keeps nothing)."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]  # type: ignore[return-value]
        value = compute()
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            if len(self._values) > self.maxsize:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)
