"""A hostile server and a hostile local user against a real agent, from outside its process (what is left of
the trust issue): a server that assigns thousands of targets nobody signed cannot flush a version that
really failed off the device's list of bad ones, and a root.json and targets.json that another process
rewrote with keys of its own never make planted bytes run.
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
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgefleet import model_targets, signing
from edgefleet.cli.client import Operator
from edgefleet.cli.publish import push_model
from edgefleet.devtools.hostile_server import HostileServer
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.modelinfo import Golden
from edgefleet.runtime import default_runtime, make_interpreter
from edgefleet.values import ModelRef

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
ZEROS = np.zeros((1, 64), np.float32)
FAKES = 3000


def _answer(agent: AgentProcess) -> tuple[np.ndarray, str]:
    client = LocalClient(agent.socket)
    try:
        outputs, target = client.infer([ZEROS])
        return outputs[0], target
    finally:
        client.close()


def _reference_output(model: Path) -> np.ndarray:
    interpreter = make_interpreter(default_runtime(), model_path=str(model))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], ZEROS)
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


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


def test_stored_root_and_targets_rewritten_with_an_attackers_own_keys_never_make_planted_bytes_run(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """A local user with the agent's uid replaces the stored roots (the newest in `root_history/` and
    `root.json`) with a root of their own keys, signs a targets.json that says v2's path is v1's bytes, and
    points the state at them. The chain starts at the pinned root, so none of it is trusted: the planted
    copy is refused, the real metadata and v2 come back from the server, and v2's own bytes answer."""
    agent = v1_running(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)
    agent.stop()

    metadata = agent.state_dir / "metadata"
    signed = json.loads((metadata / "targets.json").read_text())["signed"]["targets"]
    evil = signing.init_keys(tmp_path / "evil")
    root = Metadata.from_bytes(evil.trust_root.read_bytes())
    root.signed.version = 2  # the next one after the pinned root, as a rotation would be
    root.signatures.clear()
    root.sign(signing.load_signer(evil.root))
    # v2's path, described as v1's bytes (signed fields and golden included), signed by the attacker's key.
    forged = Metadata.from_bytes((metadata / "targets.json").read_bytes())
    v1_target = forged.signed.targets[V1]
    v1_target.path = V2
    forged.signed.targets = {V2: v1_target}
    forged.signed.version = 999
    forged.signatures.clear()
    forged.sign(signing.load_signer(evil.targets))
    (metadata / "root_history").mkdir(exist_ok=True)
    for path, data in (
        (metadata / "root_history" / "2.root.json", root.to_bytes()),
        (metadata / "root.json", root.to_bytes()),
        (metadata / "targets.json", forged.to_bytes()),
    ):
        path.unlink(missing_ok=True)  # root.json is a symlink: replaced, not followed
        path.write_bytes(data)
    v1_sha = signed[V1]["hashes"]["sha256"]
    state = agent.state()
    state["current"]["sha256"] = v1_sha  # "v2 runs, and it is these bytes"
    state["current"]["length"] = signed[V1]["length"]
    state["previous"] = None  # nothing else on the device names those bytes
    (agent.state_dir / "state.json").write_text(json.dumps(state))
    (agent.state_dir / "models" / f"{v1_sha}.tflite").write_bytes(digits_files["v1"].read_bytes())

    agent = fleet.start_agent("cam", wait=False)
    wait_for(lambda: f"local copy of {V2} refused, it will not run" in agent.log(), 60, "the copy refused")
    assert "does not chain from the pinned root" in agent.log()
    fleet.wait_running(agent, V2, timeout=90)

    def v2_answers() -> bool:
        try:
            output, target = _answer(agent)
        except Exception:  # nothing serves until v2 is back
            return False
        assert target == V2
        np.testing.assert_allclose(output, _reference_output(digits_files["v2"]), rtol=1e-5)
        return True

    wait_for(v2_answers, 60, "v2's own bytes to answer")
    assert agent.state()["current"]["sha256"] == signed[V2]["hashes"]["sha256"]


def _rotated_root(fleet: LocalFleet, new_root_key: CryptoSigner) -> bytes:
    """A real rotation of the fleet's root key: root.json version 2 names `new_root_key` and is signed by the
    old root key (its threshold) and the new one; the targets and online keys stay."""
    md = Metadata.from_bytes((fleet.keys / "root.json").read_bytes())
    root = md.signed
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(new_root_key.public_key, "root")
    root.version = 2
    md.signatures.clear()
    md.sign(signing.load_signer(fleet.keys / "root.key"))
    md.sign(new_root_key, append=True)
    return md.to_bytes()


def test_root_rotation_signed_by_the_old_root_is_followed_and_a_rewritten_stored_root_is_never_trusted(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """The server serves root.json v2 (a real rotation of the root key); the agent follows it on its next
    refresh. Another process then rewrites the stored v2 with a root of its own: the agent says so at start,
    trusts only the chain from the pinned root, and the next refresh brings the real v2 back."""
    agent = v1_running(fleet, digits_files)
    agent.stop()
    rotated = _rotated_root(fleet, CryptoSigner.generate_ed25519())
    stored = agent.state_dir / "metadata" / "root_history" / "2.root.json"
    with HostileServer(
        fleet.address, fleet.data_dir / "tls", agent.state_dir / "tls", tmp_path / "relay.log"
    ) as server:
        server.serve_metadata({"2.root": rotated})
        agent = fleet.start_agent("cam", "", "--server", server.address)
        fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
        fleet.cli("deploy", "digits", "2", "--to", "all")
        fleet.wait_running(agent, V2)
        assert stored.read_bytes() == rotated  # followed: verified by the old root's threshold, persisted
        assert json.loads((agent.state_dir / "metadata" / "root.json").read_bytes())["signed"]["version"] == 2
        agent.stop()

        evil = signing.init_keys(tmp_path / "evil")
        forged = Metadata.from_bytes(rotated)
        forged.signatures.clear()
        forged.signed.add_key(signing.load_signer(evil.root).public_key, "root")
        forged.sign(signing.load_signer(evil.root))  # vouches for itself only
        for path in (stored, agent.state_dir / "metadata" / "root.json"):
            path.unlink()
            path.write_bytes(forged.to_bytes())
        agent = fleet.start_agent("cam", "", "--server", server.address)
        assert _answer(agent)[1] == V2  # v2 is still signed by the targets key of the pinned root
        assert "stored root.json version 2 does not chain from the pinned root" in agent.log()
        # The next refresh walks from the pinned root again and fetches the real v2.
        fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "3")
        fleet.cli("deploy", "digits", "3", "--to", "all")
        fleet.wait_running(agent, "digits/3/float32.tflite")
        assert stored.read_bytes() == rotated


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
