"""A hostile server against a real agent, from outside its process (what was left of the trust issue): a
process holding the server's own TLS identity (`edgefleet.devtools.hostile_server`) that assigns thousands
of targets nobody signed cannot flush a version that really failed off the device's list of bad ones, and
metadata past every bound, or garbage, is refused and retried without blacklisting anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from conftest import v1_running

from edgefleet import model_targets, signing
from edgefleet.cli.client import Operator
from edgefleet.cli.publish import push_model
from edgefleet.devtools.hostile_server import HostileServer
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.modelinfo import Golden
from edgefleet.v1 import device_pb2
from edgefleet.values import ModelRef

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
ZEROS = np.zeros((1, 64), np.float32)
FAKES = 3000
ABSURD = (2**64 - 1, 2**63 - 1, 2**63 - 2)  # past a uint64 + 1, past what a server stores, at it


def _answer(agent: AgentProcess) -> tuple[np.ndarray, str]:
    client = LocalClient(agent.socket)
    try:
        outputs, target = client.infer([ZEROS])
        return outputs[0], target
    finally:
        client.close()


def _fake(i: int) -> ModelRef:
    name = "digits" if i % 2 else f"m{i % 7}"
    path = f"{name}/{100 + i}/float32.tflite"
    sha = hashlib.sha256(path.encode()).hexdigest()
    if i % 500 == 7:  # a few that aim at the device's files: only signed hashes ever name a file there
        path, sha = f"../../{i}/../state.json", "../../state"
    return ModelRef(path, name, str(100 + i), "float32", sha, 1000)


def test_hostile_server_assigning_thousands_of_fake_targets_cannot_flush_a_bad_version(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    agent = v1_running(fleet, digits_files)
    _push_bad_v2(fleet, digits_files["v2"])
    fleet.cli("deploy", "digits", "2", "--to", "all")
    wait_for(lambda: V2 in agent.state().get("bad_targets", []), 90, "v2 to fail its golden check")
    bad_sha = next(m["sha256"] for m in fleet.cli_json("model", "list") if m["version"] == "2")
    agent.stop()

    with HostileServer(
        fleet.address, fleet.data_dir / "tls", agent.state_dir / "tls", tmp_path / "hostile.log"
    ) as hostile:
        agent = fleet.start_agent("cam", "", "--server", hostile.address)
        wait_for(lambda: _answer(agent)[1] == V1, 60, "v1 to serve through the hostile server")
        started = time.monotonic()
        hostile.assign([_fake(i) for i in range(FAKES)])
        last = _fake(FAKES - 1).target_path
        wait_for(lambda: f"update to {last} interrupted" in agent.log(), 120, "the fakes to be tried")
        assert json.loads((agent.state_dir / "state.json").read_text())["current"]["target_path"] == V1
        fakes_s = time.monotonic() - started
        refused_before = agent.log().count(f"not installing {V2}")
        hostile.assign([ModelRef(V2, "digits", "2", "float32", bad_sha, 0)])
        wait_for(
            lambda: agent.log().count(f"not installing {V2}") > refused_before, 60, "v2 to be refused again"
        )
        state = agent.state()
        assert V2 in state["bad_targets"]
        assert not any(_fake(i).target_path in state["bad_targets"] for i in range(FAKES))
        assert hostile.downloads() == []  # neither a fake nor the bad version was ever downloaded
        assert not list((agent.state_dir / "downloads").glob("*.part"))
        assert _answer(agent)[1] == V1
        assert agent.process.poll() is None
        print(f"{FAKES} fake assignments handled in {fakes_s:.1f} s")


def _push_bad_v2(fleet: LocalFleet, model: Path) -> None:
    """A validly signed v2 whose golden output its bytes do not produce: it really fails on every device."""
    operator = Operator(
        argparse.Namespace(
            server=fleet.address,
            tls_dir=str(fleet.data_dir / "operator"),
            insecure_plaintext=False,
            token_file="",
        )
    )

    def corrupt_golden(_path: str, custom: dict) -> None:
        g = Golden.from_json(custom["golden"])
        wrong = Golden(g.inputs, tuple(o[:, ::-1].copy() for o in g.outputs), g.atol, g.rtol)
        custom["golden"] = model_targets.canonical_safe(wrong.to_json())

    push_model(
        operator, model.read_bytes(), "digits", "2", signing.load_signer(fleet.keys / "targets.key"),
        edit_custom=corrupt_golden,
    )  # fmt: skip


def test_hostile_server_serving_oversized_or_garbage_metadata_is_refused_retried_and_never_blacklists(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """Metadata past gRPC's message limit, past the device's bound for the role, or garbage, one after the
    other: each refused and retried while the old model serves; once the server behaves, the version
    installs, never marked bad."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    attacks = [b"{" * 12 * 2**20, b" " * 2**20, os.urandom(4096)]
    with HostileServer(
        fleet.address, fleet.data_dir / "tls", agent.state_dir / "tls", tmp_path / "hostile.log"
    ) as hostile:
        hostile.serve_metadata({"timestamp": attacks[0]})
        agent = fleet.start_agent("cam", "", "--server", hostile.address)
        fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
        fleet.cli("deploy", "digits", "2", "--to", "all")
        for attack in attacks:
            hostile.serve_metadata({"timestamp": attack})
            tries = agent.log().count(f"update to {V2} interrupted")
            wait_for(lambda t=tries: agent.log().count(f"update to {V2} interrupted") > t, 60, "a refusal")
            assert _answer(agent)[1] == V1
        assert V2 not in agent.state()["bad_targets"]
        hostile.serve_metadata({}, forget=["timestamp"])
        fleet.wait_running(agent, V2, timeout=90)
        assert agent.process.poll() is None
        assert "metadata timestamp served by the relay" in hostile.log()


def test_hostile_server_saying_hello_with_an_absurd_sequence_does_not_silence_the_device_for_good(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """Hello tells a device where its sequence must continue; a hostile server names numbers at or past what
    a server can store (or a uint64 holds). The device ignores them, says so, and goes on reporting: the
    real server still hears it and its view follows."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    with HostileServer(
        fleet.address, fleet.data_dir / "tls", agent.state_dir / "tls", tmp_path / "hostile.log"
    ) as hostile:
        agent = fleet.start_agent("cam", "", "--server", hostile.address)
        before = agent.state()["status_sequence"]
        hostile.send([device_pb2.ServerMessage(hello=device_pb2.Hello(last_sequence=n)) for n in ABSURD])
        wait_for(lambda: agent.log().count("leaves no room") >= len(ABSURD), 30, "the hellos to be ignored")
        fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
        fleet.cli("deploy", "digits", "2", "--to", "all")
        fleet.wait_running(agent, V2)  # the real server accepted what the device said after the hellos
        assert before < agent.state()["status_sequence"] < 2**62
        assert "Traceback" not in agent.log()


def test_a_malformed_assignment_is_ignored_and_no_event_the_device_sends_after_it_is_lost(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """An assignment no real target could be (a 100 kB path): ignored with a line that says so; the control
    stream it came on goes on, and every step of the next update reaches the real server."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    with HostileServer(
        fleet.address, fleet.data_dir / "tls", agent.state_dir / "tls", tmp_path / "hostile.log"
    ) as hostile:
        agent = fleet.start_agent("cam", "", "--server", hostile.address)
        hostile.assign([ModelRef("d/" + "x" * 100_000, "d", "1", "v", "ab" * 32, 10)])
        wait_for(lambda: "ignored an assignment from the server" in agent.log(), 30, "the assignment ignored")
        fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
        fleet.cli("deploy", "digits", "2", "--to", "all")
        fleet.wait_running(agent, V2)
        stages = [
            e["stage"] for e in fleet.cli_json("events", "--device", agent.device_id()) if e["target"] == V2
        ]
        assert {"downloading", "downloaded", "verified", "activated", "healthy"} <= set(stages), stages
        assert "connection to" not in agent.log().split("ignored an assignment from the server", 1)[1]
