"""Every error edgefleet raises on purpose, filed by who is at fault. This module is the one list.

EdgefleetError                      retryable  marks_bad
├── ArtifactError                   no         yes   the signed artifact itself is bad
│   ├── ModelError                  no         yes   does not load, tensors differ, wrong golden output
│   ├── IncompatibleError           no         no    built for another runtime or hardware class
│   └── SignatureError              no         yes   its signed fields are malformed
│       ├── UnsignedTargetError     yes        no    not in the signed metadata: the assignment is wrong, not it
│       └── DowngradeRefusedError   no         no    older than what ran; needs an operator's signed permission
├── MetadataError                   yes        no    the signed metadata as a whole is refused for now
│   ├── MetadataRefusedError        yes        no    unsigned, a rollback, malformed: fresh metadata may fix it
│   └── MetadataExpiredError        yes        no    expired: fresh metadata, or a corrected clock, fixes it
├── TransportError                  yes        no    the network, the server or its database failed
│   └── HashMismatchError           yes        no    bytes received differ from the signed length or sha256
├── InvalidRequestError             no         no    a caller sent something malformed (INVALID_ARGUMENT)
├── NotFoundError                   no         no    (NOT_FOUND)
├── ConflictError                   no         no    state changed underneath the caller (FAILED_PRECONDITION)
└── AccessDeniedError               no         no    the caller may not do this (PERMISSION_DENIED)

`retryable`: the same request may succeed later (back off and try again). `marks_bad`: the failure is a
property of the signed artifact, so the version is never tried again. Callers decide by these two
properties, never by the order of `except` clauses.

Only what verified bytes do marks a version bad (they fail their golden check or tensor contract, crash or
hang the interpreter). Bytes that do not hash, and a target the server assigns but nobody signed, say that
the server or the network is wrong: if they marked the version bad, a compromised server or network could
make devices refuse legitimate versions for good. A target whose signed fields say it cannot run here is
refused each time from those fields, not remembered: a server assigning many such variants must not push a
version that really failed off the device's bounded list of bad ones.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    retryable = False
    marks_bad = False


class ArtifactError(EdgefleetError):
    """The signed artifact is bad; fetching the same bytes again will not help."""

    marks_bad = True


class ModelError(ArtifactError):
    pass


class IncompatibleError(ArtifactError):
    """Not for this runtime or hardware: refused every time from what is signed, never listed as bad."""

    marks_bad = False


class SignatureError(ArtifactError):
    pass


class UnsignedTargetError(SignatureError):
    """The server assigned a target that the signed metadata does not name. Nothing is marked (anyone on the
    path can name targets); fresh metadata may name it, so it is retried with backoff."""

    retryable = True
    marks_bad = False


class DowngradeRefusedError(SignatureError):
    """Going back to an older model needs an operator's signature; the server's word is not enough. Nothing
    is marked: a new signature (a rollback order) lifts it."""

    marks_bad = False


class MetadataError(EdgefleetError):
    """The signed metadata is refused for now; the model it names is not proven bad, so nothing is marked."""

    retryable = True


class MetadataRefusedError(MetadataError):
    """Unsigned, a rollback, malformed: reported, and tried again later."""


class MetadataExpiredError(MetadataError):
    """Fresh metadata (or a corrected clock) fixes it."""


class TransportError(EdgefleetError):
    """The server or the network failed; worth retrying with backoff."""

    retryable = True


class HashMismatchError(TransportError):
    """The bytes that arrived (or lie on disk) are not the signed ones: fetched again from byte 0, reported,
    never a reason to mark the version bad. A server answers an upload that does not hash with
    INVALID_ARGUMENT (`rpc_status`): there the caller sent the wrong bytes."""


class InvalidRequestError(EdgefleetError):
    pass


class NotFoundError(EdgefleetError):
    pass


class ConflictError(EdgefleetError):
    pass


class AccessDeniedError(EdgefleetError):
    pass
