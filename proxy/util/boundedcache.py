"""A size-capped mapping that evicts the least recently used entry.

    cache: BoundedCache[str, Entry] = BoundedCache(10_000)
    entry = cache.get(key)          # None when absent; a hit becomes the most recent entry
    cache.put(key, entry)           # evicts the least recently used one beyond the capacity
    cache.pop(key)
    key, entry = cache.oldest()     # the least recently used, for callers that expire by age

`get` sits on the request path: it is one method call around the ordered
dict's own C lookup and move. Where recency does not matter (caches of
header blocks that repeat message after message), `getter(touch=False)` hands
out the dict's own lookup, and eviction is then oldest-inserted first. A
capacity of 0 keeps nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    __slots__ = ("capacity", "_data", "_get", "_touch")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self._get = self._data.get
        self._touch = self._data.move_to_end

    def get(self, key: K) -> V | None:
        value = self._get(key)
        if value is not None:
            self._touch(key)
        return value

    def getter(self, *, touch: bool) -> Callable[[K], V | None]:
        """The lookup for a hot path to keep: `get`, or with touch=False the dict's own C lookup."""
        return self.get if touch else self._get

    def put(self, key: K, value: V) -> bool:
        """Stores `value`; True when that evicted the least recently used entry."""
        if self.capacity <= 0:
            return False
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.capacity:
            data.popitem(last=False)
            return True
        return False

    def oldest(self) -> tuple[K, V] | None:
        for key, value in self._data.items():
            return key, value
        return None

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def clear(self) -> None:
        self._data.clear()
