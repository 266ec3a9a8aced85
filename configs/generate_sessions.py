"""Deterministic web-shop events on stdout: generate_sessions.py COUNT [SESSIONS] [SEED]

Each event has ``session_id``, ``user_id``, ``ts`` (epoch ms), ``event_type``
(view, add_to_cart, checkout) and ``page``; a checkout also has ``product`` and
``amount`` (cents). Sessions interleave, as they would on a real site; a session
that checked out may go on browsing (its row then combines both parts).
"""

from __future__ import annotations

import json
import random
import sys

PAGES = ["/", "/search", "/shoes", "/shirts", "/hats", "/cart", "/help"]
PRODUCTS = ["shoe-1", "shoe-2", "shirt-1", "shirt-2", "hat-1"]


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    sessions = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    ts = 1_700_000_000_000
    out = sys.stdout
    for _ in range(count):
        ts += rng.randrange(0, 50)  # ties happen: several events in one ms
        s = rng.randrange(sessions)
        roll = rng.random()
        event = {
            "session_id": f"s{s}",
            "user_id": f"u{s % (sessions // 3 or 1)}",
            "ts": ts,
            "event_type": "checkout" if roll < 0.03 else "add_to_cart" if roll < 0.1 else "view",
            "page": "/cart" if roll < 0.1 else rng.choice(PAGES),
        }
        if event["event_type"] == "checkout":
            event["product"] = rng.choice(PRODUCTS)
            event["amount"] = rng.randrange(500, 20_000)
        out.write(json.dumps(event) + "\n")


if __name__ == "__main__":
    main()
