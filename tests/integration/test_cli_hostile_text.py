"""Text from devices is data, not terminal control: a device's hostile name and event reason go in through
the real RPCs, and the CLI, run as the operator runs it (a subprocess), prints no control byte in its tables
while `--json` keeps the exact text."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet import pki
from edgefleet.devtools.raw_rpc import ENROLL_PATH, call, rpc
from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import common_pb2, device_pb2

CONNECT = rpc("/edgefleet.v1.DeviceService/Connect")
ENROLL = rpc(ENROLL_PATH)
ANSI_REASON = "\x1b[2J\x1b[31mall good\x1b[0m\r\nfake: healthy\x07\x9b1m\u202eevil"
CONTROL_BYTES = {*range(0x00, 0x20), 0x7F} - {ord("\n")}


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:
        yield h


async def edgefleet(harness: Harness, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI as a separate process (the server runs on this loop, so wait in a thread)."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    argv = [sys.executable, "-m", "edgefleet.cli", "--server", harness.address]
    argv += ["--tls-dir", str(harness.data_dir / "operator"), *args]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, env=env, timeout=60)


def assert_no_control_bytes(out: bytes) -> None:
    found = sorted({b for b in out if b in CONTROL_BYTES} | ({0x9B} if "\x9b" in out.decode() else set()))
    assert not found, f"control bytes {found} reached the terminal: {out!r}"


async def test_a_hostile_device_name_is_refused_at_enrollment(harness: Harness) -> None:
    token = await harness.create_token()
    for name in ("\x1b]0;pwned\x07cam", "cam\n1", "c" * 129):
        request = harness.enrollment_request(name, token, pki.new_key())
        outcome = await call(harness.channel(enroll_port=True), ENROLL, [request.SerializeToString()])
        assert outcome.code.name == "INVALID_ARGUMENT", (name, str(outcome))


async def test_an_event_reason_with_ansi_codes_is_escaped_in_tables_and_exact_in_json(
    harness: Harness, tmp_path: Path
) -> None:
    device = await harness.enroll("cam-1")
    message = device_pb2.DeviceMessage(
        event=device_pb2.UpdateEvent(
            target_path="digits/1/float32.tflite",
            stage=common_pb2.UPDATE_STAGE_FAILED,
            reason=ANSI_REASON,
            at_unix_ms=now_ms(),
            sequence=1,  # devices order what they send; an unordered event is ignored as a replay
        )
    )
    assert (await call(device.channel, CONNECT, [message.SerializeToString()])).code.name in (
        "OK",
        "CANCELLED",
    )

    async def events_seen() -> list[dict]:
        for _ in range(50):
            done = await edgefleet(harness, tmp_path, "events", "--json")
            assert done.returncode == 0, done.stderr
            rows = json.loads(done.stdout)
            if rows:
                return rows
            await asyncio.sleep(0.1)
        raise AssertionError("the event never showed up")

    rows = await events_seen()
    assert rows[0]["reason"] == ANSI_REASON  # --json: the exact text
    assert b"\x1b" not in (await edgefleet(harness, tmp_path, "events", "--json")).stdout

    for args in (("events",), ("events", "--device", device.id), ("devices",)):
        table = await edgefleet(harness, tmp_path, *args)
        assert table.returncode == 0, table.stderr
        assert_no_control_bytes(table.stdout)
    table = (await edgefleet(harness, tmp_path, "events")).stdout.decode()
    assert "\\x1b[31mall good\\x1b[0m\\r\\nfake: healthy\\x07\\x9b1m\\u202eevil" in table
