"""The seed's WidgetUpdate, written against SQLite instead of Django.

Not conflict-free: partials are merged by ``merge`` in the last holder, so
this is the shape to copy when a field is not a plain sum (a max, a set, ...).
"""

from __future__ import annotations

import logging
import sqlite3

from phonon_cli import Update

logger = logging.getLogger(__name__)


class WidgetUpdate(Update):
    def merge(self, other: Update) -> None:
        for k, v in other.doc.items():
            if k in self.doc:
                self.doc[k] += v
            else:
                self.doc[k] = v

    def execute(self) -> None:
        with sqlite3.connect(self.database, timeout=10) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS widgets (parent_post_id, target_post_id, "
                "clicks INTEGER DEFAULT 0, impressions INTEGER DEFAULT 0, "
                "PRIMARY KEY (parent_post_id, target_post_id))"
            )
            db.execute(
                "INSERT INTO widgets VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "clicks = clicks + excluded.clicks, "
                "impressions = impressions + excluded.impressions",
                (
                    self.spec["parent_post_id"],
                    self.spec["target_post_id"],
                    self.doc.get("clicks", 0),
                    self.doc.get("impressions", 0),
                ),
            )
