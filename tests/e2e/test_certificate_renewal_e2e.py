"""A fleet left alone past its certificates' lifetime keeps its devices: a real agent and server, their
clocks moved forward with libfaketime, the agent renewing its short-lived certificate and staying connected
after the original one has expired.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet import pki
from edgefleet.devtools.localfleet import LocalFleet, wait_for

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _clock(offset: str) -> dict[str, str]:
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime (scripts/test installs it)")
def test_a_device_renews_its_certificate_before_expiry_and_stays_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = LocalFleet(tmp_path / "fleet")
    fleet.init_keys()
    fleet.start_server("--device-cert-days", "3")
    try:
        agent = fleet.start_agent("cam", fleet.enrollment_token())
        tls = pki.TlsFiles(agent.state_dir / "tls")
        first_cert, first_key = tls.cert.read_bytes(), tls.key.read_bytes()
        first_expiry = pki.load_cert(first_cert).not_valid_after_utc
        agent.stop()
        fleet.stop_server()

        # 2.5 days on, for both: half a day of a 3-day certificate left, due. The agent renews at start.
        for name, value in _clock("+60h").items():
            monkeypatch.setenv(name, value)
        fleet.start_server("--device-cert-days", "3")
        agent = fleet.start_agent("cam")
        wait_for(lambda: "renewed the device certificate" in agent.log(), 60, "the certificate renewal")
        assert tls.key.read_bytes() != first_key  # a new key, generated on the device
        renewed = pki.load_cert(tls.cert.read_bytes())
        assert renewed.not_valid_after_utc > first_expiry
        assert pki.identity_of(tls.cert.read_bytes()).name == agent.device_id()
        wait_for(lambda: agent.log().count("connected to") >= 2, 60, "a connection with the new certificate")
        agent.stop()
        fleet.stop_server()

        # 4 days on: the first certificate has expired; the renewed one still connects.
        for name, value in _clock("+96h").items():
            monkeypatch.setenv(name, value)
        fleet.start_server("--device-cert-days", "3")
        agent = fleet.start_agent("cam")
        wait_for(lambda: fleet.device(agent)["connected"], 60, "the device to connect after the first expiry")
        assert "Traceback" not in agent.log()
    finally:
        fleet.close()
        for name in ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC"):
            os.environ.pop(name, None)
