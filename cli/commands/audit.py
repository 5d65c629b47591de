"""`edgefleet audit [--since 1h|ISO] [--action A] [--verify]`: the append-only log of operator actions and
rollout decisions, and a check of its hash chain (edgefleet.audit_chain) done here, by the CLI."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from edgefleet.audit_chain import ACTION, ACTION_RULE, AuditEntry, verify
from edgefleet.cli.client import Operator
from edgefleet.cli.exits import CliError, UsageError
from edgefleet.cli.output import Column, columns, emit, print_json, rfc3339, when
from edgefleet.v1 import operator_pb2

PAGE = 1000  # the server's largest answer
_AGO = re.compile(r"(\d{1,9})([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_ms(text: str, now_s: float | None = None) -> int:
    """`30m`, `1h`, `2d` ago, or an ISO 8601 time (UTC when it names no offset), as ms since the epoch.
    Raises UsageError saying the forms."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    now_s = time.time() if now_s is None else now_s
    if ago:
        return max(0, int((now_s - int(ago.group(1)) * _SECONDS[ago.group(2)]) * 1000))
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"bad --since {text[:40]!r}: give a duration ago (45s, 30m, 1h, 2d) or an ISO time "
            "(2026-12-01T10:00:00Z)"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return max(0, int(at.timestamp() * 1000))


def _entry(e: Any) -> AuditEntry:
    return AuditEntry(
        e.seq, e.at_unix_ms, e.actor, e.action, e.subject, e.details_json, e.previous_sha256, e.sha256
    )


def _row(e: AuditEntry) -> dict[str, Any]:
    try:
        details = json.loads(e.details_json)
    except ValueError:
        details = e.details_json  # shown as it is; --verify says whether it was tampered with
    return {
        "seq": e.seq,
        "at": rfc3339(e.at_ms),
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "details": details,
        "sha256": e.sha256,
    }


def _details_text(details: Any) -> str:
    if not isinstance(details, str):
        # JSON writes control characters as \u001b itself; the rest (bidi overrides...) `escape` shows
        details = json.dumps(details, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    text = details
    return text if len(text) <= 120 else text[:117] + "..."


def cmd_audit(args: argparse.Namespace) -> None:
    if args.action and not ACTION.fullmatch(args.action):
        raise UsageError(f"bad --action {args.action[:80]!r}: {ACTION_RULE}")
    if not 1 <= args.limit <= PAGE:
        raise UsageError(f"--limit must be 1..{PAGE}")
    since = since_ms(args.since) if args.since else 0
    op = Operator(args)
    if args.verify:
        _verify(args, op)
        return
    request = operator_pb2.ListAuditRequest(since_unix_ms=since, action=args.action, limit=args.limit)
    reply = op.call("ListAudit", request)
    emit(
        args,
        [_row(_entry(e)) for e in reply.entries],
        columns(
            "seq",
            Column("at", show=when),
            "actor",
            "action",
            "subject",
            Column("details", show=_details_text),
        ),
        empty="(no audit entries"
        + (" of that kind" if args.action else "")
        + (" since then" if since else "")
        + ")",
    )


def _verify(args: argparse.Namespace, op: Operator) -> None:
    """Reads the whole log page by page and checks its chain and that it ends at the server's head."""
    entries: list[AuditEntry] = []
    while True:
        # From the seq after the last one read (a gap then shows as a missing entry), until the head.
        after = entries[-1].seq if entries else 0
        reply = op.call("ListAudit", operator_pb2.ListAuditRequest(from_seq=after + 1, limit=PAGE))
        entries.extend(_entry(e) for e in reply.entries)
        if not reply.entries or entries[-1].seq >= reply.head_seq:
            break
    problem = verify(entries, reply.head_seq, reply.head_sha256)
    if args.json:
        print_json(
            {
                "intact": not problem,
                "entries": len(entries),
                "head_sha256": reply.head_sha256,
                "problem": problem or None,
            }
        )
    if problem:
        raise CliError(f"the audit log was tampered with: {problem}")
    if not args.json:
        print(f"audit log intact: {len(entries)} entries, head {reply.head_sha256[:16]}...")
