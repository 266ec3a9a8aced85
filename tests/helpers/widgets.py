"""Update classes for tests. They record every execute in a JSONL file, so that
several real OS processes can be checked against the input totals."""

from __future__ import annotations

import os
from typing import Any

import orjson

from phonon_cli import ConflictFreeUpdate, Update

OUT = os.environ.get("PHONON_TEST_OUT", "")


def record(update: Update) -> None:
    line = orjson.dumps({"resource": update.resource, "doc": update.doc, "pid": os.getpid()})
    with open(os.environ.get("PHONON_TEST_OUT", OUT), "ab") as f:
        f.write(line + b"\n")


class WidgetUpdate(Update):
    """The seed's merge, with its ``self.doc += v`` typo fixed."""

    def merge(self, other: Update) -> None:
        for k, v in other.doc.items():
            if k in self.doc:
                self.doc[k] += v
            else:
                self.doc[k] = v

    def execute(self) -> None:
        record(self)


class CountingUpdate(ConflictFreeUpdate):
    def execute(self) -> None:
        record(self)


class SeenUpdate(WidgetUpdate):
    """Keeps an attribute of its own, to exercise ``state``/``clear``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def clear(self) -> None:
        super().clear()
        self.seen = []

    def merge(self, other: Update) -> None:
        super().merge(other)
        assert isinstance(other, SeenUpdate)
        self.seen = sorted(set(self.seen) | set(other.seen))


class SlowCounting(ConflictFreeUpdate):
    """Takes a while to write each batch, so a test can signal a worker mid-drain."""

    @classmethod
    def execute_many(cls, updates):  # type: ignore[no-untyped-def]
        import time

        time.sleep(float(os.environ.get("PHONON_TEST_SLOW_S", "0.5")))
        for update in updates:
            record(update)
        return []

    def execute(self) -> None:
        record(self)
