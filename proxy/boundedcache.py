"""A size-capped mapping that evicts the least recently used entry.

    cache: BoundedCache[str, Entry] = BoundedCache(10_000)
    entry = cache.get(key)          # None when absent; a hit becomes the most recent entry
    cache.put(key, entry)           # evicts the least recently used one beyond the capacity
    cache.pop(key)

`get` sits on the request path: it is one method call around the ordered
dict's own C lookup and move. A capacity of 0 keeps nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
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

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.capacity:
            data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def clear(self) -> None:
        self._data.clear()
