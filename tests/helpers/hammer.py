"""A worker for the multi-process tests: random events on a small key space,
through a small LRU cache with random early evictions.

Usage: hammer.py URL NAMESPACE KIND EVENTS KEYS CACHE SEED
Writes what it put in ("in" lines) and what it executed ("out" lines, via the
update class) to PHONON_TEST_OUT.
"""

from __future__ import annotations

import os
import random
import sys

import orjson
from widgets import CountingUpdate, WidgetUpdate

from phonon_cli import LruCache, Process


def main() -> None:
    url, namespace, kind, events, keys, cache_size, seed = sys.argv[1:8]
    cls = CountingUpdate if kind == "sums" else WidgetUpdate
    rng = random.Random(int(seed))
    process = Process(url, namespace=namespace, heartbeat_interval=0.5)
    cache = LruCache(max_entries=int(cache_size))
    totals: dict[str, dict[str, int]] = {}
    for _ in range(int(events)):
        key = f"k{rng.randrange(int(keys))}"
        field = rng.choice(["clicks", "impressions"])
        n = rng.randint(1, 5)
        t = totals.setdefault(f"w:{key}", {})
        t[field] = t.get(field, 0) + n
        cached = cache.get(key)
        if cached is not None:
            cached.refresh(cls(process, key, collection="w", doc={field: n}, acquire=False))
        else:
            cache.set(key, cls(process, key, collection="w", doc={field: n}))
        if rng.random() < 0.05 and cache.size():
            cache.expire(rng.choice(cache.keys()))
    cache.expire_all()
    process.stop()
    with open(os.environ["PHONON_TEST_OUT"], "ab") as f:
        f.write(orjson.dumps({"in": totals}) + b"\n")


if __name__ == "__main__":
    main()
