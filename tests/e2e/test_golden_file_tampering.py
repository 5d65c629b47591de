"""A golden file that is not the signed bytes never serves as the golden check, on real processes: the
server's copy is rewritten on its disk (what a compromised server or storage can do), the device refuses it
and keeps its model; once the signed bytes are back, the update goes through and is healthy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.devtools import modelgen
from edgefleet.devtools.localfleet import LocalClient, LocalFleet, wait_for

WIDE = 5000  # float features: a 20 KB golden input, over what rides inline in signed metadata


def _golden_blobs(fleet: LocalFleet) -> set[Path]:
    """The server's stored golden files (.npz archives, the only zip files in its blob store)."""
    return {p for p in (fleet.data_dir / "blobs").glob("??/*") if p.read_bytes()[:2] == b"PK"}


def test_a_tampered_golden_file_is_refused_and_the_old_model_keeps_serving(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    for version in (1, 2):
        model = modelgen.build_large_mlp(400_000, seed=version, in_features=WIDE)
        (tmp_path / f"v{version}.tflite").write_bytes(model)
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(tmp_path / "v1.tflite"), "--name", "wide", "--version", "1")
    fleet.cli("deploy", "wide", "1", "--to", "all")
    fleet.wait_running(agent, "wide/1/float32.tflite")
    assert len(list((agent.state_dir / "models").glob("*.npz"))) == 1  # its golden file, kept

    before = _golden_blobs(fleet)
    fleet.cli("model", "push", str(tmp_path / "v2.tflite"), "--name", "wide", "--version", "2")
    [blob] = _golden_blobs(fleet) - before
    signed = blob.read_bytes()
    tampered = bytearray(signed)
    tampered[-30] ^= 0xFF  # same length, other bytes
    blob.write_bytes(bytes(tampered))

    fleet.cli("deploy", "wide", "2", "--to", "all")

    def refused() -> bool:
        events = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "50")
        return any("not the signed golden data" in e["reason"] for e in events)

    wait_for(refused, 60, "the device to refuse the tampered golden file")
    client = LocalClient(agent.socket)
    try:
        _, target = client.infer([np.zeros((1, WIDE), np.float32)])
    finally:
        client.close()
    assert target == "wide/1/float32.tflite"

    blob.write_bytes(signed)
    fleet.wait_running(agent, "wide/2/float32.tflite", timeout=90)


def test_a_golden_file_damaged_at_rest_on_the_device_is_fetched_again_verified(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """Someone rewrites the kept golden file while the agent is down: at start the local copy does not
    verify, so it does not run; the agent fetches the signed bytes again and runs healthily."""
    (tmp_path / "v1.tflite").write_bytes(modelgen.build_large_mlp(400_000, seed=1, in_features=WIDE))
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(tmp_path / "v1.tflite"), "--name", "wide", "--version", "1")
    fleet.cli("deploy", "wide", "1", "--to", "all")
    fleet.wait_running(agent, "wide/1/float32.tflite")
    [kept] = (agent.state_dir / "models").glob("*.npz")
    signed = kept.read_bytes()

    agent.stop()
    kept.write_bytes(signed[:-10] + b"x" * 10)
    agent = fleet.start_agent("cam")

    def fetched_again() -> bool:
        events = fleet.cli_json("events", "--device", agent.device_id(), "--limit", "50")
        return (
            any("unusable" in e["reason"] and "golden" in e["reason"] for e in events)
            and kept.exists()
            and kept.read_bytes() == signed
        )

    wait_for(fetched_again, 60, "the golden file to be refused and fetched again")
    fleet.wait_running(agent, "wide/1/float32.tflite")
