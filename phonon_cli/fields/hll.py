"""distinct_count's HyperLogLog: 1,024 registers, kept sparse until they fill up.

A value is hashed to 64 bits (BLAKE2b, a cryptographic hash cut to 8 bytes, so
every bit is uniform whatever the values look like); the top 10 bits pick a
register, and the register keeps the largest rank (1 + leading zeros of the
other 54 bits) it has seen. Registers merge by keeping the larger of each, so a
union of partials is exact whatever the split.

In the worker a key's first ``TEXTS_MAX`` distinct values are kept as they are,
a set of their JSON texts: an event adds one member, with no hash to compute,
and a value seen again costs nothing more. From the next distinct value on, or
when the key leaves the worker (its text, its executed value), they are
registers, a dict ``index -> rank`` holding only those set: an event updates one
entry (O(1), no array of 1,024 to rebuild). The registers are the same either
way, so the estimate is too. As text (in Redis, and in SQL's ``NAME__hll`` column)
they take whichever of two forms is shorter, so a key with 20 values ships 101
characters rather than 2,048:

- sparse: ``s`` then, per register set, in index order, 3 hex digits of its
  index and 2 of its rank (``s00a03`` is register 10 at rank 3), while fewer
  than ``SPARSE_MAX`` + 1 registers are set;
- dense: 2,048 hex digits, two per register, from ``SPARSE_MAX`` + 1 on.

The form is a function of the registers alone, so equal registers are equal
text, wherever they were merged: the Lua ``merge_field`` (store/scripts.py)
writes the same text as ``encode``. ``decode`` reads both forms.

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
SPARSE_MAX = 409
"""The most registers the sparse form holds: 1 + 5 x 409 = 2,046 characters, the
last count shorter than the 2,048 of the dense form. (scripts.py's Lua has it too.)"""

Registers = dict[int, int]
"""Register index -> rank, for the registers that are not zero."""
State = set[str] | Registers
"""What a worker holds: the texts of the values seen (at most ``TEXTS_MAX``), or registers."""
TEXTS_MAX = 32
"""The most values kept as texts before they become registers."""

HASH = hashlib.blake2b(digest_size=8)
"""An empty 8-byte BLAKE2b: copied per value, which costs half of building one
with its keyword argument (the hash is most of an event's distinct_count)."""


def register(
    text: str, _copy: Any = HASH.copy, _from_bytes: Any = int.from_bytes
) -> tuple[int, int]:
    """The register a value (its canonical JSON text) sets, and the rank it sets.
    (Called once per event: the defaults bind the functions once.)"""
    h = _copy()
    h.update(text.encode())
    x = _from_bytes(h.digest(), "big")
    return x >> 54, 55 - (x & 0x3FFFFFFFFFFFFF).bit_length()


def add(registers: Registers, text: str) -> None:
    index, rank = register(text)
    if rank > registers.get(index, 0):
        registers[index] = rank


def registers(state: State) -> Registers:
    """The registers of a state (a new dict for texts, else the very registers)."""
    if not isinstance(state, set):
        return state
    found: Registers = {}
    copy, from_bytes = HASH.copy, int.from_bytes
    for text in state:  # register() written out: up to TEXTS_MAX of them per key
        h = copy()
        h.update(text.encode())
        x = from_bytes(h.digest(), "big")
        index, rank = x >> 54, 55 - (x & 0x3FFFFFFFFFFFFF).bit_length()
        if rank > found.get(index, 0):
            found[index] = rank
    return found


def union(into: State, other: State) -> State:
    """``into`` combined with ``other``: updated in place, or replaced by registers
    when it held texts and the two together are more than ``TEXTS_MAX`` values."""
    if isinstance(into, set) and isinstance(other, set):
        into |= other
        return into if len(into) <= TEXTS_MAX else registers(into)
    regs = registers(into)
    if isinstance(other, set):
        for text in other:
            add(regs, text)
        return regs
    get = regs.get
    for index, rank in other.items():
        if rank > get(index, 0):
            regs[index] = rank
    return regs


POWERS = [2.0**-r for r in range(64 - BITS + 2)]
"""2^-rank for every rank: the estimate's sum looks them up."""


def estimate(registers: Registers) -> int:
    m = REGISTERS
    zeros = m - len(registers)
    raw = (
        (0.7213 / (1 + 1.079 / m))
        * m
        * m
        / (zeros + sum(map(POWERS.__getitem__, registers.values())))
    )
    if raw <= 2.5 * m and zeros:
        return round(m * math.log(m / zeros))  # small range: linear counting
    return round(raw)


INDEX_HEX = [f"{i:03x}" for i in range(REGISTERS)]
RANK_HEX = [f"{r:02x}" for r in range(64 - BITS + 2)]
"""The digits of every index and rank, looked up rather than formatted per register."""
HEX_INDEX = {text: i for i, text in enumerate(INDEX_HEX)}
HEX_RANK = {text: r for r, text in enumerate(RANK_HEX)}


def encode(registers: Registers) -> str:
    """The registers as text: sparse while few are set, else dense (module docstring).

    A key's registers are encoded twice as it leaves: for Redis (its payload),
    then for SQL (``NAME__hll``). The last texts made are remembered with the
    registers they are of and a stamp of them, their count and the sum of their
    ranks: registers only ever gain an index or raise a rank, so any change
    since changes the stamp."""
    stamp = (len(registers), sum(registers.values()))
    made = _ENCODED.get(id(registers))
    if made is not None and made[0] is registers and made[1] == stamp:
        return made[2]
    if stamp[0] <= SPARSE_MAX:
        index, rank = INDEX_HEX, RANK_HEX
        text = "s" + "".join([index[i] + rank[registers[i]] for i in sorted(registers)])
    else:
        dense = bytearray(REGISTERS)
        for i, r in registers.items():
            dense[i] = r
        text = dense.hex()
    global _held
    if _held + stamp[0] > HELD_MAX:
        _ENCODED.clear()
        _held = 0
    _ENCODED[id(registers)] = (registers, stamp, text)  # holding them: the id stays theirs
    _held += stamp[0]
    return text


HELD_MAX = 1 << 15
"""The most registers (of all the texts) ``encode`` remembers, a few MB at most:
thousands of leaving keys' worth at a few dozen values each."""
_ENCODED: dict[int, tuple[Registers, tuple[int, int], str]] = {}
_held = 0


def decode(text: str) -> Registers:
    """The registers of either form (a dense one as any version wrote it).

    Raises:
        ValueError, KeyError: not the text of registers.
    """
    if text[:1] == "s":
        index, rank = HEX_INDEX, HEX_RANK
        return {index[text[j : j + 3]]: rank[text[j + 3 : j + 5]] for j in range(1, len(text), 5)}
    return {i: r for i, r in enumerate(bytes.fromhex(text)) if r}
