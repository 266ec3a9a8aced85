"""The one clock: integer epoch milliseconds.

Injected (``Process(clock=...)``) so that tests move time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000
