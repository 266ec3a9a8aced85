"""distinct_count's HyperLogLog: 1,024 registers, kept sparse in the worker.

A value is hashed to 64 bits (BLAKE2b, a cryptographic hash cut to 8 bytes, so
every bit is uniform whatever the values look like); the top 10 bits pick a
register, and the register keeps the largest rank (1 + leading zeros of the
other 54 bits) it has seen. Registers merge by keeping the larger of each, so a
union of partials is exact whatever the split.

In the worker the registers are a dict ``index -> rank`` holding only those set:
an event updates one entry (O(1), no array of 1,024 to rebuild), and a key with
few values stays small. In Redis and SQL they are 2,048 hex digits, two per
register, which the Lua ``merge_field`` merges digit pair by digit pair.

The estimate is the standard one (Flajolet et al. 2007) with its small-range
correction: below 2.5 x 1,024 and while some register is still zero, linear
counting, ``m ln(m / zeros)``, which is near exact for a few values and about
2 % off (RMS) for hundreds; above, the harmonic-mean estimate, about 3 %
(1.04 / sqrt(1024)). tests/test_fields.py measures both over random sets.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

BITS = 10
"""log2 of the register count."""
REGISTERS = 1 << BITS
assert BITS == 10, "register() has 64 - BITS = 54 written out"

Registers = dict[int, int]
"""Register index -> rank, for the registers that are not zero."""


def register(
    text: str, _blake2b: Any = hashlib.blake2b, _from_bytes: Any = int.from_bytes
) -> tuple[int, int]:
    """The register a value (its canonical JSON text) sets, and the rank it sets.
    (Called once per event: the defaults bind the functions once.)"""
    h = _from_bytes(_blake2b(text.encode(), digest_size=8).digest(), "big")
    return h >> 54, 55 - (h & 0x3FFFFFFFFFFFFF).bit_length()


def add(registers: Registers, text: str) -> None:
    index, rank = register(text)
    if rank > registers.get(index, 0):
        registers[index] = rank


def union(into: Registers, other: Registers) -> Registers:
    """``into`` updated in place with the larger of each register of ``other``."""
    get = into.get
    for index, rank in other.items():
        if rank > get(index, 0):
            into[index] = rank
    return into


def estimate(registers: Registers) -> int:
    m = REGISTERS
    zeros = m - len(registers)
    raw = (0.7213 / (1 + 1.079 / m)) * m * m / (zeros + sum(2.0**-r for r in registers.values()))
    if raw <= 2.5 * m and zeros:
        return round(m * math.log(m / zeros))  # small range: linear counting
    return round(raw)


def to_hex(registers: Registers) -> str:
    dense = bytearray(REGISTERS)
    for index, rank in registers.items():
        dense[index] = rank
    return dense.hex()


def from_hex(text: str) -> Registers:
    return {i: r for i, r in enumerate(bytes.fromhex(text)) if r}
