"""proxy/util/boundedcache.py: a size-capped mapping with least-recently-used eviction."""

from __future__ import annotations

from proxy.util.boundedcache import BoundedCache


def test_evicts_the_least_recently_used_entry() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1      # a is now the most recent
    cache.put("c", 3)               # evicts b
    assert len(cache) == 2 and "b" not in cache
    assert cache.get("a") == 1 and cache.get("c") == 3 and cache.get("b") is None


def test_put_refreshes_recency_and_replaces_the_value() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)              # a is now the most recent
    cache.put("c", 3)               # evicts b
    assert cache.get("a") == 10 and "b" not in cache


def test_pop_and_clear() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    cache.put("a", 1)
    assert cache.pop("a") == 1 and cache.pop("a") is None and len(cache) == 0
    cache.put("b", 2)
    cache.clear()
    assert len(cache) == 0


def test_capacity_zero_keeps_nothing() -> None:
    cache: BoundedCache[str, int] = BoundedCache(0)
    cache.put("a", 1)
    assert len(cache) == 0 and cache.get("a") is None
