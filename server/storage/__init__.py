"""Where the server keeps its state, split by role:

- `records`: the records, as dataclasses with typed values;
- `interfaces`: `FleetStore` (records) and `BlobStore` (model files), the only names the logic layer uses;
- `sql` + `schema`: `SqlFleetStore`, SQLite or PostgreSQL through SQLAlchemy Core, with schema migrations
  (`sql_labels`: label selectors as queries; `sql_audit`: the append-only audit log);
- `memory`: `MemoryFleetStore`, the same contract in this process's memory;
- `blobs`: `FilesystemBlobStore`, model files content-addressed by sha256.

`open_store(url)` picks the FleetStore from a URL.
"""

from __future__ import annotations

from edgefleet.errors import InvalidRequestError
from edgefleet.server.storage.interfaces import FleetStore


def open_store(url: str) -> FleetStore:
    """`sqlite:///PATH`, `postgresql://user@host/db` or `memory://` (nothing kept after the process ends).
    Raises InvalidRequestError for other schemes, SchemaMismatchError for a database of a newer edgefleet."""
    if url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        from edgefleet.server.storage.sql import SqlFleetStore

        return SqlFleetStore(url)
    if url == "memory://":
        from edgefleet.server.storage.memory import MemoryFleetStore

        return MemoryFleetStore()
    raise InvalidRequestError(
        f"unsupported database url {url!r}: use sqlite:///PATH, postgresql://... or memory://"
    )
