"""The audit log in SQL (`SqlFleetStore.add_audit` / `list_audit`): append one sealed entry, list a page.
Only these two statements touch `audit_log`; nothing updates or deletes an entry."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from edgefleet import audit_chain
from edgefleet.audit_chain import AuditEntry
from edgefleet.server.storage import schema as t
from edgefleet.server.storage.records import AuditPage


def append(
    conn: sa.Connection, at_ms: int, actor: str, action: str, subject: str, details_json: str
) -> AuditEntry:
    """In the caller's transaction: the next entry, sealed onto the newest, and the head moved to it."""
    head = t.audit_head.c
    # A write first: it takes the head's row lock (PostgreSQL) or the write lock (SQLite) before the head
    # is read, so no two appends seal onto the same entry (servers sharing one database included).
    conn.execute(t.audit_head.update().where(head.id == 1).values(seq=head.seq))
    newest = conn.execute(sa.select(head.seq, head.sha256).where(head.id == 1)).one()
    entry = audit_chain.seal(newest.sha256, newest.seq + 1, at_ms, actor, action, subject, details_json)
    conn.execute(t.audit_log.insert().values(_values(entry)))
    conn.execute(t.audit_head.update().where(head.id == 1).values(seq=entry.seq, sha256=entry.sha256))
    return entry


def page(conn: sa.Connection, since_ms: int, action: str, from_seq: int, limit: int) -> AuditPage:
    """As `FleetStore.list_audit`, in the caller's transaction."""
    a = t.audit_log.c
    # The head first, and no entry past it: under READ COMMITTED (PostgreSQL) each statement sees the
    # newest commits, and a page must agree with the head it is answered with.
    head = conn.execute(sa.select(t.audit_head).where(t.audit_head.c.id == 1)).one()
    query = sa.select(t.audit_log).where(a.at_ms >= since_ms, a.seq <= head.seq).limit(limit)
    if action:
        query = query.where(sa.or_(a.action == action, a.action.startswith(action + ".", autoescape=True)))
    if from_seq:
        query = query.where(a.seq >= from_seq).order_by(a.seq)
    else:
        query = query.order_by(a.seq.desc())
    found = [_entry(r) for r in conn.execute(query)]
    return AuditPage(sorted(found, key=lambda e: e.seq), head.seq, head.sha256)


def _values(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "at_ms": entry.at_ms,
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "details": entry.details_json,
        "previous_sha256": entry.previous_sha256,
        "sha256": entry.sha256,
    }


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        row.seq, row.at_ms, row.actor, row.action, row.subject, row.details, row.previous_sha256, row.sha256
    )
