"""The audit log's hash chain, pure, shared by the server (which appends) and the CLI (which verifies):

    sha256(entry N) = sha256 of the canonical JSON array
                      [sha256(entry N-1), seq, at_ms, actor, action, subject, details_json]

with 64 zeros before the first entry. Changing, inserting or removing an entry in the database breaks the
chain from there on, and removing the newest ones leaves the chain short of the head the server keeps, so
`edgefleet audit --verify` notices. (Someone who can write the database and recompute every hash after
an edit is not stopped by this: the chain makes tampering detectable, not impossible.)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
MAX_DETAILS_CHARS = 64 * 1024
# Actions are dotted lowercase names ("deployment.create", "rollout.gate"); a filter may name the first parts.
ACTION = re.compile(r"[a-z][a-z0-9_-]{0,19}(\.[a-z][a-z0-9_-]{0,19}){0,2}")  # at most 62 chars
ACTION_RULE = "an action is a dotted lowercase name such as deployment.create, or its first part (deployment)"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at_ms: int
    actor: str
    action: str
    subject: str
    details_json: str  # canonical JSON (`canonical_details`)
    previous_sha256: str
    sha256: str

    @property
    def details(self) -> Any:
        return json.loads(self.details_json)


def _plain(value: Any) -> Any:
    """`value` as JSON can hold it exactly: non-finite floats as strings, tuples and sets as lists, other
    objects as their text (evidence is for reading; nothing is lost by naming it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_details(details: dict[str, Any]) -> str:
    """The details as the chain hashes them; past MAX_DETAILS_CHARS, a note of how big they were and their
    sha256 instead (an entry stays a bounded row)."""
    text = _canonical(_plain(details))
    if len(text) > MAX_DETAILS_CHARS:
        digest = hashlib.sha256(text.encode()).hexdigest()
        text = _canonical({"truncated": True, "chars": len(text), "sha256": digest})
    return text


def entry_hash(
    previous_sha256: str, seq: int, at_ms: int, actor: str, action: str, subject: str, details_json: str
) -> str:
    fields = [previous_sha256, seq, at_ms, actor, action, subject, details_json]
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()


def seal(
    previous_sha256: str, seq: int, at_ms: int, actor: str, action: str, subject: str, details_json: str
) -> AuditEntry:
    """The entry that follows one whose hash is `previous_sha256`."""
    digest = entry_hash(previous_sha256, seq, at_ms, actor, action, subject, details_json)
    return AuditEntry(seq, at_ms, actor, action, subject, details_json, previous_sha256, digest)


def verify(entries: Sequence[AuditEntry], head_seq: int, head_sha256: str) -> str:
    """Checks the whole log (`entries` from seq 1 on, in order) against the head the server keeps: "" when
    intact, else what is wrong and where."""
    previous = GENESIS
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            return f"entry {expected_seq} is missing (the next one is {entry.seq})"
        if entry.previous_sha256 != previous:
            return f"entry {entry.seq} does not follow entry {entry.seq - 1} (its previous hash differs)"
        recomputed = entry_hash(
            previous, entry.seq, entry.at_ms, entry.actor, entry.action, entry.subject, entry.details_json
        )
        if recomputed != entry.sha256:
            return f"entry {entry.seq} was changed after it was written (its hash does not match)"
        previous = entry.sha256
    if len(entries) != head_seq or previous != (head_sha256 if head_seq else GENESIS):
        return f"the log ends at entry {len(entries)} but the server's head is entry {head_seq}: entries were removed"
    return ""
