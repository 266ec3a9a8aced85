"""Print what configs/sessions.toml wrote: show_sessions.py DB"""

from __future__ import annotations

import sqlite3
import sys

with sqlite3.connect(sys.argv[1] if len(sys.argv) > 1 else "sessions.db") as conn:
    n, events = conn.execute("SELECT count(*), sum(events) FROM sessions").fetchone()
    print(f"{n} sessions, {events} events; the five longest:")
    for row in conn.execute(
        "SELECT session_id, events, landing, exit_page, path FROM sessions "
        "ORDER BY events DESC, session_id LIMIT 5"
    ):
        print("  ", row)
    print("products:")
    for row in conn.execute(
        "SELECT product, orders, revenue, round(average), cheapest, buyers, biggest "
        "FROM products ORDER BY revenue DESC"
    ):
        print("  ", row)
