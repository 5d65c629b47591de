"""The chain of trust on the device, attacked from outside the agent's process: a root.json and targets.json
rewritten with an attacker's own keys never make planted bytes run, a real root rotation is followed while
a stored root another process rewrote is never trusted, and another uid cannot read the key or plant files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import v1_running
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgefleet import signing
from edgefleet.devtools.hostile_server import HostileServer
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.runtime import default_runtime, make_interpreter

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
ZEROS = np.zeros((1, 64), np.float32)


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


_AS_ANOTHER_USER = """
import json, os, sys
folder, results = sys.argv[1], {}
for name, attempt in {
    "read the device key": lambda: open(os.path.join(folder, "tls", "tls.key"), "rb").read(),
    "read the credentials": lambda: open(os.path.join(folder, "credentials.json"), "rb").read(),
    "read the state": lambda: open(os.path.join(folder, "state.json"), "rb").read(),
    "list the models": lambda: os.listdir(os.path.join(folder, "models")),
    "plant a model": lambda: open(os.path.join(folder, "models", "planted.tflite"), "wb").close(),
    "replace root.json": lambda: open(os.path.join(folder, "metadata", "root.json"), "wb").close(),
}.items():
    try:
        attempt()
        results[name] = "done"
    except PermissionError:
        results[name] = "refused"
print(json.dumps(results))
"""


def test_local_user_without_the_agents_uid_can_neither_read_its_key_nor_write_its_models(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    """Another uid on the device (nobody), in a process of its own, with every folder above the state folder
    open to it: the state folder itself (0700) stops it."""
    python = shutil.which("python3", path="/usr/bin:/bin")  # one that another user may run
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root and a system python3 to run a process as another user")
    agent = v1_running(fleet, digits_files)
    opened: list[tuple[Path, int]] = []
    try:
        for folder in [*reversed(agent.state_dir.parents)]:
            mode = folder.stat().st_mode
            if folder != Path("/") and not mode & 0o001:
                opened.append((folder, mode))
                folder.chmod(mode | 0o001)  # traversable by others, as on a device
        run = subprocess.run(
            [python, "-I", "-c", _AS_ANOTHER_USER, str(agent.state_dir)],
            user=65534, group=65534, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60,
            check=True,
        )  # fmt: skip
    finally:
        for folder, mode in reversed(opened):
            folder.chmod(mode)
    results = json.loads(run.stdout)
    assert set(results.values()) == {"refused"}, results
    assert agent.state_dir.stat().st_mode & 0o777 == 0o700
    assert (agent.state_dir / "tls" / "tls.key").stat().st_mode & 0o077 == 0
