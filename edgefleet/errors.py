"""The error tree shared by the server, the agent and the CLI.

EdgefleetError
├── ArtifactError            the thing itself is bad: never retry the same bytes
│   ├── SignatureError       metadata not signed by trusted keys, expired, or a rollback
│   ├── HashMismatchError    bytes differ from the signed length or sha256
│   ├── ModelError           does not load, tensors differ from what is declared, wrong golden output
│   └── IncompatibleError    built for another runtime or hardware class
├── TransportError           the network or the server failed: retry later with backoff
├── InvalidRequestError      a caller sent something malformed (maps to INVALID_ARGUMENT)
├── NotFoundError            (NOT_FOUND)
├── ConflictError            state changed underneath the caller (FAILED_PRECONDITION)
└── AccessDeniedError        the caller may not do this (PERMISSION_DENIED)
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""


class ArtifactError(EdgefleetError):
    """The artifact or its metadata is bad; fetching the same bytes again will not help."""


class SignatureError(ArtifactError):
    pass


class HashMismatchError(ArtifactError):
    pass


class ModelError(ArtifactError):
    pass


class IncompatibleError(ArtifactError):
    pass


class DowngradeRefusedError(SignatureError):
    """Going back to an older model needs an operator's signature; the server's word is not enough."""


class TransportError(EdgefleetError):
    """The server or the network failed; worth retrying with backoff."""


class MetadataExpiredError(TransportError):
    """Refused now, but nothing is marked bad: fresh metadata (or a corrected clock) fixes it."""


class MetadataRefusedError(TransportError):
    """The metadata is refused (unsigned, a rollback, malformed); the model it names is not proven bad, so
    nothing is marked: reported, and tried again later."""


class InvalidRequestError(EdgefleetError):
    pass


class NotFoundError(EdgefleetError):
    pass


class ConflictError(EdgefleetError):
    pass


class AccessDeniedError(EdgefleetError):
    pass
