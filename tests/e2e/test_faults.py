"""Faults on real processes: the server killed mid-download, a slow link."""

from __future__ import annotations

from pathlib import Path

from edgefleet.devtools.faultproxy import FaultProxy
from edgefleet.devtools.localfleet import LocalFleet, wait_for
from edgefleet.devtools.modelgen import build_large_mlp


def test_server_killed_mid_download_then_agent_resumes_at_its_offset(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    big = tmp_path / "big.tflite"
    big.write_bytes(build_large_mlp(6 * 2**20, seed=3))
    fleet.cli("model", "push", str(big), "--name", "big", "--version", "1")
    with FaultProxy(fleet.port, bytes_per_second=2 * 2**20) as proxy:
        agent = fleet.start_agent("cam", fleet.enrollment_token(), "--server", proxy.address)
        fleet.cli("deploy", "big", "1", "--to", "all")
        downloads = agent.state_dir / "downloads"

        def partial() -> int:
            parts = list(downloads.glob("*.part"))
            return parts[0].stat().st_size if parts else 0

        wait_for(lambda: partial() > 2**20, 30, "the download to be under way")
        fleet.stop_server(kill=True)
        proxy.cut()
        offset = partial()
        assert 0 < offset < big.stat().st_size
        fleet.start_server()  # same port: the proxy reaches it again
        fleet.wait_running(agent, "big/1/float32.tflite", timeout=60)
    assert f"from byte {offset}" in agent.log() or "resuming" in agent.log()
    resumed = [
        line for line in agent.log().splitlines() if "downloading big/1/float32.tflite from byte" in line
    ]
    assert any(not line.endswith("from byte 0") for line in resumed), resumed
