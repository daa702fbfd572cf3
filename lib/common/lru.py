"""The one least-recently-used cache: thread-safe, bounded by entry count and by the total size of its values."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Evicts the least recently used entries while there are more than ``max_entries`` or their sizes
    (``size_of(value)``, taken once at :meth:`put`; values are not changed in place) add up to more than ``max_size``.

    Args:
        max_entries: most entries (``None``: no count bound).
        max_size: largest total size (``0``: no size bound).
        size_of: a value's size (bytes, say); required with ``max_size``.
        keep_newest: the entry just put stays even if it alone is over ``max_size`` (it is the one being worked
            on); otherwise such an entry is not stored.
    """

    def __init__(
        self,
        max_entries: int | None = None,
        max_size: int = 0,
        size_of: Callable[[V], int] | None = None,
        keep_newest: bool = True,
    ) -> None:
        if max_size and size_of is None:
            raise ValueError("a size bound needs size_of")
        self.max_entries = max_entries
        self.max_size = max_size
        self.size_of = size_of
        self.keep_newest = keep_newest
        self.hits = 0
        self.misses = 0
        self._items: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        size = self.size_of(value) if self.size_of is not None else 0
        with self._lock:
            self._remove(key)
            if self.max_size and size > self.max_size and not self.keep_newest:
                return
            self._items[key] = (value, size)
            self._size += size
            while len(self._items) > 1 and self._over():
                self._remove(next(iter(self._items)))

    def pop(self, key: K) -> None:
        with self._lock:
            self._remove(key)

    def remove_where(self, predicate: Callable[[K], bool]) -> None:
        """Drop the entries whose key satisfies ``predicate``."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    @property
    def size(self) -> int:
        """Total size of the values held."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def _over(self) -> bool:
        too_many = self.max_entries is not None and len(self._items) > self.max_entries
        return too_many or bool(self.max_size and self._size > self.max_size)

    def _remove(self, key: K) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._size -= item[1]
