"""Print what landed in an SQLite table: show.py DB TABLE"""

from __future__ import annotations

import sqlite3
import sys

db, table = sys.argv[1], sys.argv[2]
with sqlite3.connect(db) as conn:
    n, clicks, imps = conn.execute(
        f'SELECT count(*), sum(clicks), sum(impressions) FROM "{table}"'
    ).fetchone()
    print(f"{db}: {n} rows in {table}, {clicks} clicks, {imps} impressions in all; the top 5:")
    cursor = conn.execute(f'SELECT * FROM "{table}" ORDER BY impressions DESC LIMIT 5')
    names = [d[0] for d in cursor.description]
    for row in cursor:
        print("  ", ", ".join(f"{k}={v}" for k, v in zip(names, row)))
