"""How model bytes travel on the wire, shared by the server (encode) and the device (decode).

Encodings:

* ``identity``: the bytes as they are.
* ``zstd``: one zstd frame (level 3) that declares its content size and carries a checksum.
* ``shuffle4+zstd``: the bytes cut into independent ``SHUFFLE_BLOCK`` blocks, each block's 4-byte
  elements split into byte planes (all first bytes, then all second bytes, ...; a tail shorter than 4
  bytes stays as is), then one zstd frame as above. Float32 weights compress much better this way
  because their sign/exponent bytes are alike while their low mantissa bytes are noise. Blocks are
  independent so the device can unshuffle while it streams, holding one block at a time.

The device decodes with `BoundedDecoder`, which never produces more than the signed length. The zstd
frame must declare exactly that content size and a window no larger. libzstd does not stop a frame that
decodes past its declared size, and 4 bytes of a zstd block can decode to 128 KiB, so the decoder reads
the block headers itself and hands libzstd at most one block per call: a decompression bomb is cut within
one block (128 KiB) of the signed length, and the decoder never holds more than about ``max_output`` plus
one block.
"""

from __future__ import annotations

import numpy as np
import zstandard

from edgefleet.errors import HashMismatchError, IncompatibleError

IDENTITY = "identity"
ZSTD = "zstd"
SHUFFLE4_ZSTD = "shuffle4+zstd"
ENCODINGS = (IDENTITY, ZSTD, SHUFFLE4_ZSTD)

ZSTD_LEVEL = 3
SHUFFLE_BLOCK = 64 * 1024
_ELEMENT = 4
_ZSTD_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX: bytes needed to always parse a frame header
_ZSTD_MIN_WINDOW = 1 << 10
_BLOCK_HEADER = 3
_RLE_BLOCK = 1
_CHECKSUM = 4


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise IncompatibleError(f"unknown wire encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")


def _shuffle_block(block: bytes) -> bytes:
    whole = len(block) - len(block) % _ELEMENT
    planes = np.frombuffer(block, np.uint8, whole).reshape(-1, _ELEMENT).T
    return planes.tobytes() + block[whole:]


def _unshuffle_block(block: bytes) -> bytes:
    whole = len(block) - len(block) % _ELEMENT
    elements = np.frombuffer(block, np.uint8, whole).reshape(_ELEMENT, -1).T
    return elements.tobytes() + block[whole:]


def _zstd(data: bytes) -> bytes:
    # One-shot compression writes the content size into the frame header, which the decoder requires.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(data)


def encode(data: bytes, encoding: str) -> bytes:
    _check_encoding(encoding)
    if encoding == IDENTITY:
        return bytes(data)
    if encoding == ZSTD:
        return _zstd(data)
    blocks = (data[i : i + SHUFFLE_BLOCK] for i in range(0, len(data), SHUFFLE_BLOCK))
    return _zstd(b"".join(_shuffle_block(block) for block in blocks))


def best_encoding(data: bytes) -> tuple[str, bytes]:
    """The smallest encoding of `data`; on a tie the simplest (identity, then zstd)."""
    encoded = [(encoding, encode(data, encoding)) for encoding in ENCODINGS]
    return min(encoded, key=lambda pair: len(pair[1]))


class BoundedDecoder:
    """Streaming decoder that yields exactly `max_output` bytes or raises HashMismatchError.

    ``feed(chunk)`` returns the decoded bytes available so far and ``finish()`` the rest; both raise
    `HashMismatchError` as soon as the stream would decode past `max_output`, and ``finish()`` also
    when the output is short or the stream is truncated or corrupt.
    """

    def __init__(self, encoding: str, max_output: int) -> None:
        _check_encoding(encoding)
        if max_output < 0:
            raise ValueError(f"max_output must be >= 0, got {max_output}")
        self.encoding = encoding
        self.max_output = max_output
        self.produced = 0
        self._input = bytearray()  # zstd bytes received and not yet handed to libzstd
        self._zstd: zstandard.ZstdDecompressionObj | None = None  # set once the frame header checks out
        self._fed = 0  # zstd bytes handed to libzstd
        self._part_end = 0  # where the frame part being handed over (header, block, checksum) ends
        self._last_block = False
        self._checksum_bytes = 0
        self._decoded = 0  # bytes libzstd produced
        self._pending = bytearray()  # decompressed bytes of the shuffle block not yet complete

    def feed(self, chunk: bytes) -> bytes:
        if self.encoding == IDENTITY:
            return self._emit(bytes(chunk))
        data = self._decompress(chunk)
        if self.encoding == ZSTD:
            return self._emit(data)
        return self._emit(self._unshuffle(data, final=False))

    def finish(self) -> bytes:
        tail = b""
        if self.encoding != IDENTITY:
            if self._zstd is None or not self._zstd.eof:
                raise HashMismatchError("stream truncated: the zstd frame does not end")
            if self.encoding == SHUFFLE4_ZSTD:
                tail = self._emit(self._unshuffle(b"", final=True))
        if self.produced != self.max_output:
            raise HashMismatchError(f"decoded {self.produced} bytes, the signed length is {self.max_output}")
        return tail

    def _emit(self, data: bytes) -> bytes:
        if self.produced + len(data) > self.max_output:
            raise HashMismatchError(f"stream decodes past the signed length of {self.max_output} bytes")
        self.produced += len(data)
        return data

    def _decompress(self, chunk: bytes) -> bytes:
        self._input += chunk
        out = []
        while self._input:
            if self._zstd is not None and self._zstd.eof:
                raise HashMismatchError("unexpected bytes after the end of the zstd frame")
            if self._fed == self._part_end and not self._next_part():
                break  # wait for the rest of a header
            piece = bytes(self._input[: self._part_end - self._fed])
            del self._input[: len(piece)]
            self._fed += len(piece)
            assert self._zstd is not None  # set once the frame header was read, above
            try:
                data = self._zstd.decompress(piece)
            except zstandard.ZstdError as e:
                raise HashMismatchError(f"corrupt zstd stream: {e}") from e
            self._decoded += len(data)
            if self._decoded > self.max_output:  # checked per block, so a bomb stops here
                raise HashMismatchError(f"stream decodes past the signed length of {self.max_output} bytes")
            out.append(data)
        return b"".join(out)

    def _next_part(self) -> bool:
        """Find where the next frame part ends; False while too few bytes are buffered to tell."""
        if self._zstd is None:
            return self._open_frame()
        if self._last_block:
            self._part_end = self._fed + self._checksum_bytes
            return True
        if len(self._input) < _BLOCK_HEADER:
            return False
        # Block header (RFC 8878, 3.1.1.2): bit 0 last block, bits 1-2 type, bits 3-23 size.
        header = int.from_bytes(self._input[:_BLOCK_HEADER], "little")
        self._last_block = bool(header & 1)
        content = 1 if (header >> 1) & 3 == _RLE_BLOCK else header >> 3  # RLE blocks hold one byte
        self._part_end = self._fed + _BLOCK_HEADER + content
        return True

    def _open_frame(self) -> bool:
        try:
            size = zstandard.frame_header_size(self._input)
            params = zstandard.get_frame_parameters(self._input)
        except zstandard.ZstdError as e:
            if len(self._input) < _ZSTD_HEADER_MAX:
                return False
            raise HashMismatchError(f"corrupt zstd frame header: {e}") from e
        if params.content_size != self.max_output:
            declared = (
                "no size" if params.content_size == zstandard.CONTENTSIZE_UNKNOWN else params.content_size
            )
            raise HashMismatchError(f"zstd frame declares {declared}, the signed length is {self.max_output}")
        # A window larger than the output is never needed; refusing it bounds libzstd's own buffers.
        window = max(self.max_output, _ZSTD_MIN_WINDOW)
        self._zstd = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
        self._checksum_bytes = _CHECKSUM if params.has_checksum else 0
        self._part_end = size
        return True

    def _unshuffle(self, data: bytes, *, final: bool) -> bytes:
        self._pending += data
        whole = len(self._pending) if final else len(self._pending) - len(self._pending) % SHUFFLE_BLOCK
        out = b"".join(
            _unshuffle_block(bytes(self._pending[i : min(i + SHUFFLE_BLOCK, whole)]))
            for i in range(0, whole, SHUFFLE_BLOCK)
        )
        del self._pending[:whole]
        return out
