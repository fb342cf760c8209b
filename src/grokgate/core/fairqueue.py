"""A blocking queue that serves groups round-robin, so one request with n=128 cannot starve the others.

Worker threads call `get`; each request puts its jobs as one group. Groups are served in turn: one job
from the first group, then that group goes to the back of the line.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._groups: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0
        self._closed = False

    def put_group(self, key: Hashable, items: Iterable[T]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("queue is closed")
            group = self._groups.setdefault(key, deque())
            before = len(group)
            group.extend(items)
            added = len(group) - before
            self._size += added
            self._cond.notify(added)

    def get(self) -> T | None:
        """Block until a job is available; None once the queue is closed."""
        with self._cond:
            while not self._groups and not self._closed:
                self._cond.wait()
            if not self._groups:
                return None
            key, group = next(iter(self._groups.items()))
            item = group.popleft()
            self._size -= 1
            if group:
                self._groups.move_to_end(key)
            else:
                del self._groups[key]
            return item

    def discard(self, key: Hashable) -> list[T]:
        """Remove a group's jobs that have not started yet, and return them."""
        with self._cond:
            group = self._groups.pop(key, None)
            if not group:
                return []
            self._size -= len(group)
            return list(group)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return self._size
