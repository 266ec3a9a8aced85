"""Deterministic widget events on stdout: generate_events.py COUNT [KEYS] [SEED] [BAD_EVERY]

KEYS distinct (parent, target) pairs; every BAD_EVERY-th line (0: never) is malformed.
"""

from __future__ import annotations

import random
import sys


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    keys = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    bad_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    out = sys.stdout
    for i in range(count):
        if bad_every and i % bad_every == bad_every - 1:
            out.write('{"parent_post_id": 1, "event_type": "clicks"\n')  # truncated
            continue
        k = rng.randrange(keys)
        kind = "clicks" if rng.random() < 0.1 else "impressions"
        out.write(
            f'{{"parent_post_id": {k // 100}, "target_post_id": {k}, "event_type": "{kind}"}}\n'
        )


if __name__ == "__main__":
    main()
