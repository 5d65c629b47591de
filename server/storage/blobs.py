"""Model files on the local filesystem, content-addressed by sha256 (`<root>/ab/abcd...`).

Uploads are written durably (temp file, fsync, rename, fsync of the folder), so a crash during an upload
leaves no half file under a real name; a start clears what such a crash left in `tmp/`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefleet.durable import commit_file
from edgefleet.errors import HashMismatchError, InvalidRequestError
from edgefleet.server.storage.interfaces import BlobStore, BlobWriter


class FilesystemBlobWriter(BlobWriter):
    def __init__(self, store: FilesystemBlobStore, max_bytes: int):
        self._store = store
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self.length = 0
        folder = store.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.length += len(chunk)
        if self.length > self._max:
            raise InvalidRequestError(f"upload is larger than the {self._max}-byte limit")
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self, expected_sha256: str = "") -> str:
        digest = self._hash.hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise HashMismatchError(f"upload hashes to {digest}, the header said {expected_sha256}")
        self._file.close()
        final = self._store.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        commit_file(self._tmp, final)
        return digest

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path, max_bytes: int = 2 * 2**30):
        self.root = Path(root)
        self.max_bytes = max_bytes
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "tmp").glob("*.part"):  # left by a crash mid-upload
            stale.unlink(missing_ok=True)

    def begin_write(self) -> FilesystemBlobWriter:
        return FilesystemBlobWriter(self, self.max_bytes)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidRequestError("bad sha256")
        return self.root / sha256[:2] / sha256

    def read(self, sha256: str, offset: int, chunk_size: int) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk

    def put_bytes(self, data: bytes) -> str:
        writer = self.begin_write()
        try:
            writer.write(data)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise
