"""A wrong trust root, met as a new operator meets it: refused before the enrollment token is spent, said
clearly, and recoverable (start again with the right root.json, or `--reset-trust-root` once enrolled).

Real server and agent processes; the wrong root is another fleet's genuine, self-signed root.json.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet import signing
from edgefleet.agent.exits import EXIT_CONFIG_CANNOT_WORK
from edgefleet.devtools.localfleet import LocalFleet, wait_for


def test_enrolling_with_another_fleets_root_is_refused_and_the_token_survives(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    other = signing.init_keys(tmp_path / "other-fleet")
    token = fleet.enrollment_token(uses=1)
    wrong = fleet.start_agent("cam", token, "--trust-root", str(other.trust_root), wait=False)
    wait_for(lambda: wrong.process.poll() is not None, 30, "the agent with the wrong root to stop")
    assert wrong.process.returncode == EXIT_CONFIG_CANNOT_WORK, wrong.log()[-2000:]
    assert "not this fleet's root.json" in wrong.log(), wrong.log()[-2000:]
    assert "Traceback" not in wrong.log()
    assert fleet.devices() == []
    # The same token, the right root (the default of start_agent): the device enrolls.
    right = fleet.start_agent("cam", token)
    assert right.device_id()
    assert [d["name"] for d in fleet.devices()] == ["cam"]


def test_reset_trust_root_repins_and_clears_the_metadata_cache(fleet: LocalFleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    agent.stop()
    metadata = agent.state_dir / "metadata"
    (metadata / "timestamp.json").write_bytes(b"{}")  # stands for a cache built under the old root
    other = signing.init_keys(tmp_path / "other-fleet")
    agent = fleet.start_agent("cam", "", "--trust-root", str(other.trust_root), "--reset-trust-root")
    assert (metadata / "pinned-root.json").read_bytes() == Path(other.trust_root).read_bytes()
    assert not (metadata / "timestamp.json").exists()
    assert "re-pinned the trust root" in agent.log()
