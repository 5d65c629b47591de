"""A model's bytes read once into sealed memory: what is hashed is exactly what the worker loads.

    models/<sha>.tflite --read once, hashing as it goes--> memfd --seal (no write, shrink, grow)-->
        length + sha256 of those bytes against the signed target --> the descriptor goes to the worker,
        which loads /proc/self/fd/N

Why not the file, or an open descriptor of it: anyone who can write the models folder could change the file
between the hash check and the load, or rewrite it in place under an open descriptor. Nobody, not even this
process, can change a sealed memfd, so a check of its bytes holds for as long as the worker runs. Every load
takes this one path: an update's candidate, the model at start, a rollback, a worker restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from types import TracebackType

from edgefleet.errors import HashMismatchError

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
CHUNK = 1 << 20


class SealedModel:
    """A sealed memfd holding one model's bytes, their `length` and `sha256`. Close it (or use `with`) once
    the worker has its own copy of the descriptor."""

    def __init__(self, fd: int, length: int, sha256: str):
        self.fd, self.length, self.sha256 = fd, length, sha256

    @classmethod
    def read(cls, path: Path, max_length: int = 2 * 2**30) -> SealedModel:
        """Reads `path` once into a sealed memfd. Raises OSError (no such file), HashMismatchError (longer
        than `max_length`: reading stops there)."""
        fd = os.memfd_create(f"model-{Path(path).name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            digest, length = hashlib.sha256(), 0
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK):
                    length += len(chunk)
                    if length > max_length:
                        raise HashMismatchError(f"{path.name} is longer than the {max_length} bytes signed")
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, length, digest.hexdigest())

    @classmethod
    def verified(cls, path: Path, what: str, length: int, sha256: str) -> SealedModel:
        """`read`, then length and sha256 checked against the signed ones. Raises HashMismatchError (the
        bytes are not the signed ones, or the file is missing)."""
        try:
            sealed = cls.read(path, max_length=length)
        except FileNotFoundError:
            raise HashMismatchError(f"{what}: the local copy is missing") from None
        if sealed.length != length or sealed.sha256 != sha256:
            sealed.close()
            raise HashMismatchError(f"{what}: the local copy is not the signed bytes")
        return sealed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SealedModel:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
