"""Wire encodings: exact round trips, and a decoder that never yields more than the signed length."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import zstandard

from edgefleet import wire
from edgefleet.devtools import modelgen
from edgefleet.errors import HashMismatchError, IncompatibleError

BLOCK = wire.SHUFFLE_BLOCK
# Sizes around the element (4) and block boundaries, none of them a multiple of either except 0 and BLOCK.
SIZES = [0, 1, 3, 5, 4099, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK + 7]


def _decode(encoding: str, data: bytes, max_output: int, chunk: int = 4096) -> bytes:
    decoder = wire.BoundedDecoder(encoding, max_output)
    out = [decoder.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return b"".join(out) + decoder.finish()


def _floats(n: int) -> bytes:
    """Bytes shaped like float32 weights (compressible by shuffling), cut to any length."""
    return np.random.default_rng(n).standard_normal(n // 4 + 1, dtype=np.float32).tobytes()[:n]


@pytest.fixture(scope="module")
def real_model() -> bytes:
    return modelgen.build_large_mlp(300_000)


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(encoding: str, size: int) -> None:
    for data in (os.urandom(size), _floats(size), bytes(size)):
        encoded = wire.encode(data, encoding)
        assert _decode(encoding, encoded, len(data)) == data
        assert _decode(encoding, encoded, len(data), chunk=1 if size < 5000 else 777) == data


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_round_trip_real_model(encoding: str, real_model: bytes) -> None:
    for data in (real_model, real_model + b"xyz"):  # the file, and a length that is no multiple of 4
        assert len(data) % BLOCK
        encoded = wire.encode(data, encoding)
        assert _decode(encoding, encoded, len(data), chunk=1 << 20) == data
        assert _decode(encoding, encoded, len(data), chunk=1000) == data


def test_shuffle_layout() -> None:
    """The format devices rely on: per block, byte planes of 4-byte elements, the tail unchanged, then zstd."""
    data = bytes(range(256)) * (BLOCK // 256) + bytes(range(10))  # one full block and a 10-byte block
    inner = zstandard.ZstdDecompressor().decompress(wire.encode(data, wire.SHUFFLE4_ZSTD))
    full = np.frombuffer(data[:BLOCK], np.uint8).reshape(-1, 4)
    assert inner[:BLOCK] == b"".join(full[:, plane].tobytes() for plane in range(4))
    assert inner[BLOCK:] == bytes([0, 4, 1, 5, 2, 6, 3, 7, 8, 9])


def test_best_encoding(real_model: bytes) -> None:
    assert wire.best_encoding(os.urandom(10_000))[0] == wire.IDENTITY  # nothing to gain
    encoding, encoded = wire.best_encoding(real_model)
    assert encoding == wire.SHUFFLE4_ZSTD  # float32 weights: the planes compress, the raw bytes hardly
    assert len(encoded) == min(len(wire.encode(real_model, e)) for e in wire.ENCODINGS)


def _zeros_frame(n: int, declared: int | None) -> bytes:
    """A zstd frame of n zero bytes (built without holding them), its header declaring `declared` bytes."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj(size=n if declared is not None else -1)
    block = bytes(1 << 20)
    frame = b"".join(compressor.compress(block[: min(len(block), n - i)]) for i in range(0, n, len(block)))
    frame += compressor.flush()
    if declared is None or declared == n:
        return frame
    # Rewrite Frame_Content_Size (RFC 8878, 3.1.1.1): after the magic, the descriptor and the window byte.
    descriptor = frame[4]
    size_field = {1: 2, 2: 4, 3: 8}[descriptor >> 6]
    start = 5 + (0 if descriptor & 0x20 else 1) + (0, 1, 2, 4)[descriptor & 3]
    value = declared - 256 if size_field == 2 else declared
    return frame[:start] + value.to_bytes(size_field, "little") + frame[start + size_field :]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _peak_rss_growth(run: Callable[[], None]) -> int:
    """How far the resident set rose above its starting point while `run` ran (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
    except OSError:
        pytest.skip("measuring peak memory needs a writable /proc/self/clear_refs")
    before = _status("VmRSS")
    run()
    return _status("VmHWM") - before


@pytest.mark.parametrize("encoding", [wire.ZSTD, wire.SHUFFLE4_ZSTD])
def test_bomb_cut_at_signed_length(encoding: str) -> None:
    """1 GiB of zeros in a 33 KB frame whose header lies that it holds only max_output bytes."""
    max_output = 4 << 20
    bomb = _zeros_frame(1 << 30, declared=max_output)
    produced = 0

    def decode() -> None:
        nonlocal produced
        decoder = wire.BoundedDecoder(encoding, max_output)
        with pytest.raises(HashMismatchError):
            for i in range(0, len(bomb), 1024):
                produced += len(decoder.feed(bomb[i : i + 1024]))
            decoder.finish()

    assert _peak_rss_growth(decode) < max_output + (8 << 20)  # the output so far, one block, slack
    assert produced <= max_output


def test_bomb_with_honest_header_refused_before_decoding() -> None:
    decoder = wire.BoundedDecoder(wire.ZSTD, 1 << 20)
    with pytest.raises(HashMismatchError, match="declares 1073741824"):
        decoder.feed(_zeros_frame(1 << 30, declared=1 << 30))


def test_frame_without_declared_size_refused() -> None:
    decoder = wire.BoundedDecoder(wire.ZSTD, 1 << 20)
    with pytest.raises(HashMismatchError, match="declares no size"):
        decoder.feed(_zeros_frame(1 << 20, declared=None))


def test_identity_longer_than_signed_refused() -> None:
    decoder = wire.BoundedDecoder(wire.IDENTITY, 10)
    assert decoder.feed(b"0123456789") == b"0123456789"
    with pytest.raises(HashMismatchError):
        decoder.feed(b"x")


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_truncated_refused(encoding: str, real_model: bytes) -> None:
    encoded = wire.encode(real_model, encoding)
    for cut in (0, 3, len(encoded) // 2, len(encoded) - 1):
        with pytest.raises(HashMismatchError):
            _decode(encoding, encoded[:cut], len(real_model))


@pytest.mark.parametrize("encoding", [wire.ZSTD, wire.SHUFFLE4_ZSTD])
def test_corrupt_refused(encoding: str, real_model: bytes) -> None:
    encoded = wire.encode(real_model, encoding)
    for position in (0, 5, len(encoded) // 2, len(encoded) - 2):
        corrupt = bytearray(encoded)
        corrupt[position] ^= 0x5A
        with pytest.raises(HashMismatchError):
            _decode(encoding, bytes(corrupt), len(real_model))
    with pytest.raises(HashMismatchError, match="after the end"):
        _decode(encoding, encoded + b"\0", len(real_model))


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_wrong_signed_length_refused(encoding: str) -> None:
    data = _floats(1000)
    encoded = wire.encode(data, encoding)
    for signed in (999, 1001):
        with pytest.raises(HashMismatchError):
            _decode(encoding, encoded, signed)


def test_unknown_encoding_refused() -> None:
    with pytest.raises(IncompatibleError, match="gzip"):
        wire.BoundedDecoder("gzip", 10)
    with pytest.raises(IncompatibleError):
        wire.encode(b"abc", "shuffle2+zstd")
