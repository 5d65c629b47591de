"""The rollout engine's audit hook: any object with `async record(actor, action, subject, details)`.

edgefleet.server.audit (the audit log) provides one; without it the server logs every entry.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

log = logging.getLogger("edgefleet.server.rollouts")


class AuditRecorder(Protocol):
    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None: ...


class LogRecorder:
    """The audit hook when none is given: the server log."""

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        log.info("audit: %s %s %s %s", actor, action, subject, json.dumps(details, sort_keys=True)[:2000])
