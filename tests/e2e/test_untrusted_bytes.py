"""Attacks on what the agent runs, from outside its process: bytes that do not hash on the wire or in a
resumed download (class 3 of the trust issue), files rewritten between the check and the load (class 1),
planted files at start (class 2), damaged state files (class 5).

Each test names the attack; "never runs" is checked by asking the agent which model answered.
"""

from __future__ import annotations

import os

import numpy as np

from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def _v1_running(fleet: LocalFleet, digits_files: dict, *extra: str, **kwargs) -> AgentProcess:
    agent = fleet.start_agent("cam", fleet.enrollment_token(), *extra, **kwargs)
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    return agent


def _serves(agent: AgentProcess) -> str:
    client = LocalClient(agent.socket)
    try:
        return client.infer([np.zeros((1, 64), np.float32)])[1]
    finally:
        client.close()


def _sha_of(fleet: LocalFleet, version: str) -> str:
    return str(next(m["sha256"] for m in fleet.cli_json("model", "list") if m["version"] == version))


# ---- class 3: transport and tampering faults never blacklist ------------------------------------------------


def test_spliced_resume_of_other_bytes_starts_over_from_byte_0_and_is_not_blacklisted(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """A `.part` file of other bytes (a splice, a relay that injected bytes before a cut): the resumed
    download does not hash, is thrown away, fetched again from byte 0 and installed."""
    agent = _v1_running(fleet, digits_files)
    agent.stop()
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = _sha_of(fleet, "2")
    (agent.state_dir / "downloads" / f"{sha}.part").write_bytes(os.urandom(300))
    fleet.cli("deploy", "digits", "2", "--to", "all")

    agent = fleet.start_agent("cam")
    fleet.wait_running(agent, V2, timeout=90)
    log = agent.log()
    assert f"downloading {V2} from byte 300" in log
    assert f"downloading {V2} from byte 0" in log.split(f"downloading {V2} from byte 300", 1)[1]
    assert V2 not in agent.state()["bad_targets"]
    assert _serves(agent) == V2
