"""Device labels in SQL: writing a device's label rows, and a label requirement as a query condition, so
that `SqlFleetStore.devices_matching` answers a label selector with one query instead of a scan."""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from edgefleet.selectors import Requirement
from edgefleet.server.storage import schema as t


def insert(conn: sa.Connection, device_id: str, labels: Mapping[str, str]) -> None:
    if labels:
        rows = [{"device_id": device_id, "key": k, "value": v} for k, v in labels.items()]
        conn.execute(t.device_labels.insert(), rows)


def condition(requirement: Requirement) -> sa.ColumnElement[bool]:
    """SQL for one label requirement: an EXISTS on the device's label rows (NOT EXISTS for the negative
    forms, so that a device without the key matches them, as in kubectl)."""
    row = t.device_labels.alias().c  # an alias per requirement: each is its own EXISTS
    on_key = [row.device_id == t.devices.c.id, row.key == requirement.key]
    if requirement.operator in ("=", "!=", "in", "notin"):
        on_key.append(row.value.in_(requirement.values))
    found = sa.exists().where(*on_key)
    return found if requirement.operator in ("=", "in", "exists") else ~found
