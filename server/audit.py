"""The audit log: every operator action (push, publish, deploy, rollback, revoke, label change, token,
key change) and, from the rollout engine, every rollout action and gate decision, with who did it (the
operator's certificate name), what, when and the evidence.

    servicer (knows the caller) -> AuditLog.record(actor, action, subject, details) -> FleetStore.add_audit
                                   (appends one entry to a hash chain: edgefleet.audit_chain)

Entries are only ever appended: the store offers insert and list, and no RPC changes or removes one.
Actions are dotted nouns and verbs ("deployment.create", "rollout.abort"); a listing filtered by "rollout"
shows every "rollout.*". An action is recorded once it has succeeded; a refused one changed nothing. The
entry is a transaction of its own after the action's: should the database fail between the two, the
operator is answered UNAVAILABLE for an action that was done (and `edgefleet deployments` shows it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from edgefleet.audit_chain import ACTION, ACTION_RULE, canonical_details
from edgefleet.errors import InvalidRequestError
from edgefleet.server.storage.interfaces import FleetStore
from edgefleet.server.storage.records import AuditPage, now_ms

log = logging.getLogger("edgefleet.server")

MAX_LISTED = 1000
MAX_SUBJECT_CHARS = 512
MAX_ACTOR_CHARS = 128

# The actions the operator service records (the rollout engine adds its own "rollout.*").
TOKEN_CREATE = "token.create"
MODEL_PUSH = "model.push"
TARGETS_PUBLISH = "targets.publish"
KEYS_CHANGE = "keys.change"
DEPLOYMENT_CREATE = "deployment.create"
DEPLOYMENT_ROLLBACK = "deployment.rollback"
DEVICE_REVOKE = "device.revoke"
DEVICE_LABEL = "device.label"


class AuditLog:
    def __init__(self, store: FleetStore):
        self.store = store

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        """Appends one entry. `details` is the evidence (JSON-like values; anything else is kept as text).
        Raises ValueError for an action that is not a dotted lowercase name (a programming error)."""
        if not ACTION.fullmatch(action):
            raise ValueError(f"audit action {action!r} is not a dotted lowercase name")
        entry = await asyncio.to_thread(
            self.store.add_audit,
            now_ms(),
            actor[:MAX_ACTOR_CHARS],
            action,
            subject[:MAX_SUBJECT_CHARS],
            canonical_details(details),
        )
        log.info("audit %d: %s %s %s", entry.seq, actor, action, subject)

    async def entries(self, since_ms: int, action: str, from_seq: int, limit: int) -> AuditPage:
        """Raises InvalidRequestError for a negative bound or a malformed action filter."""
        if since_ms < 0 or from_seq < 0 or limit < 0:
            raise InvalidRequestError("since, from_seq and limit must not be negative")
        if action and not ACTION.fullmatch(action):
            raise InvalidRequestError(f"bad action filter {action[:80]!r}: {ACTION_RULE}")
        limit = min(limit or 100, MAX_LISTED)
        return await asyncio.to_thread(self.store.list_audit, since_ms, action, from_seq, limit)


def signing_keyids(metadata: bytes) -> list[str]:
    """The key ids that signed a TUF metadata file (sorted); [] for none or for bytes that are not one."""
    try:
        signatures = json.loads(metadata).get("signatures") or []
        return sorted({str(s["keyid"]) for s in signatures if isinstance(s, dict) and "keyid" in s})
    except (ValueError, AttributeError, TypeError):
        return []
