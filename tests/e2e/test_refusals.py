"""What a device refuses, on real processes: a tampered blob, an untrusted signer, a wrong golden output.
In every case the old model keeps serving and nothing bad is kept on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from edgefleet import model_targets, signing
from edgefleet.cli.client import CliError, Operator
from edgefleet.cli.publish import publish_targets, push_model
from edgefleet.devtools.localfleet import AgentProcess, LocalClient, LocalFleet, wait_for
from edgefleet.modelinfo import Golden

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"


def _running_v1(fleet: LocalFleet, digits_files: dict) -> AgentProcess:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)
    return agent


def _failed_with(fleet: LocalFleet, agent: AgentProcess, target: str, text: str) -> dict:
    def failed() -> dict | None:
        events = fleet.cli_json("events", "--device", agent.device_id())
        return next((e for e in events if e["target"] == target and e["stage"] == "failed"), None)

    event = wait_for(failed, 30, f"{agent.name} to refuse {target}")
    assert text in event["reason"], event["reason"]
    return event


def _still_serves_v1(agent: AgentProcess) -> None:
    client = LocalClient(agent.socket)
    _, target = client.infer([np.zeros((1, 64), np.float32)])
    client.close()
    assert target == V1
    assert agent.running() == V1
    assert not list((agent.state_dir / "downloads").glob("*.part"))
    model_files = {p.name for p in (agent.state_dir / "models").glob("*.tflite")}
    assert model_files == {agent.state()["current"]["sha256"] + ".tflite"}


def _operator(fleet: LocalFleet) -> Operator:
    return Operator(
        argparse.Namespace(
            server=fleet.address,
            tls_dir=str(fleet.data_dir / "operator"),
            insecure_plaintext=False,
            token_file="",
        )
    )


def test_tampered_blob_on_the_server_is_refused_reported_never_blacklisted_and_installed_once_restored(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """A server that serves wrong bytes (once, or for a while) must not make the device refuse the signed
    version for good: the bytes are refused, the trouble reported, the version fetched again later."""
    agent = _running_v1(fleet, digits_files)
    pushed = fleet.cli_json("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = next(m["sha256"] for m in fleet.cli_json("model", "list") if m["version"] == "2")
    blob = fleet.data_dir / "blobs" / sha[:2] / sha
    original = blob.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # same length, one bit pattern changed
    blob.write_bytes(bytes(data))
    assert pushed["targets_version"] == 2

    fleet.cli("deploy", "digits", "2", "--to", "all")
    _failed_with(fleet, agent, V2, "sha256")
    client = LocalClient(agent.socket)
    assert client.infer([np.zeros((1, 64), np.float32)])[1] == V1
    client.close()
    assert V2 not in agent.state()["bad_targets"]
    # Nothing of the wrong bytes is kept as a model.
    model_files = {p.name for p in (agent.state_dir / "models").glob("*.tflite")}
    assert f"{sha}.tflite" not in model_files

    blob.write_bytes(original)  # the server's fault is over: the signed version installs
    fleet.wait_running(agent, V2, timeout=90)
    assert V2 not in agent.state()["bad_targets"]


def test_targets_signed_by_an_untrusted_key_are_refused_by_the_server(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    other = signing.init_keys(tmp_path / "intruder")
    with pytest.raises(CliError, match="not signed by the trusted targets key"):
        fleet.cli(
            "model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1",
            "--targets-key", str(other.targets),
        )  # fmt: skip
    assert all(not m["signed"] for m in fleet.cli_json("model", "list"))


def test_device_pinned_to_another_root_refuses_this_servers_models(
    fleet: LocalFleet, digits_files: dict, tmp_path: Path
) -> None:
    other = signing.init_keys(tmp_path / "other-fleet")
    # Enrollment refuses another fleet's root (tests/e2e/test_trust_root.py); a device re-pinned to one
    # after enrolling must still refuse this server's models.
    fleet.start_agent("stranger", fleet.enrollment_token()).stop()
    agent = fleet.start_agent("stranger", "", "--trust-root", str(other.trust_root), "--reset-trust-root")
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    _failed_with(fleet, agent, V1, "signed metadata refused")
    assert not list((agent.state_dir / "models").iterdir())
    assert agent.running() == ""


def test_candidate_with_wrong_golden_output_is_refused_and_old_model_keeps_serving(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = _running_v1(fleet, digits_files)

    def corrupt_golden(_path: str, custom: dict) -> None:
        # A validly signed claim the model does not live up to (e.g. the operator pushed the wrong file).
        g = Golden.from_json(custom["golden"])
        wrong = Golden(g.inputs, tuple(o[:, ::-1].copy() for o in g.outputs), g.atol, g.rtol)
        custom["golden"] = model_targets.canonical_safe(wrong.to_json())

    push_model(
        _operator(fleet), digits_files["v2"].read_bytes(), "digits", "2",
        signing.load_signer(fleet.keys / "targets.key"), edit_custom=corrupt_golden,
    )  # fmt: skip
    fleet.cli("deploy", "digits", "2", "--to", "all")
    _failed_with(fleet, agent, V2, "differs from golden")
    _still_serves_v1(agent)


def test_candidate_whose_tensors_differ_from_the_signed_signature_is_refused(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = _running_v1(fleet, digits_files)

    def other_signature(_path: str, custom: dict) -> None:
        custom["signature"]["inputs"][0]["shape"] = [1, 65]

    push_model(
        _operator(fleet), digits_files["v2"].read_bytes(), "digits", "2",
        signing.load_signer(fleet.keys / "targets.key"), edit_custom=other_signature,
    )  # fmt: skip
    fleet.cli("deploy", "digits", "2", "--to", "all")
    _failed_with(fleet, agent, V2, "tensor signature mismatch")
    _still_serves_v1(agent)


def _plant_signed_model(fleet: LocalFleet, name: str, data: bytes) -> str:
    """What a compromised upload path could do: put a model the server's sandbox would refuse into its
    storage, and have the operator's key sign it. Devices must still protect themselves."""
    from edgefleet.devtools.hostile import INPUT_NAME, OUTPUT_NAME, SHAPE
    from edgefleet.server.storage import open_store
    from edgefleet.server.storage.blobs import FilesystemBlobStore
    from edgefleet.server.storage.records import ModelRecord, now_ms

    path = f"{name}/1/float32.tflite"
    sha = FilesystemBlobStore(fleet.data_dir / "blobs").put_bytes(data)
    spec = {"inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": list(SHAPE)}],
            "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": list(SHAPE)}]}  # fmt: skip
    details = {"wire_bytes": len(data), "wire_sha256": sha, "wire_encoding": "identity", "signature": spec}
    store = open_store(f"sqlite:///{fleet.data_dir / 'fleet.db'}")
    store.add_model(ModelRecord(path, name, "1", "float32", sha, len(data), spec, now_ms(), details=details))
    store.close()
    zeros = np.zeros(SHAPE, np.float32)
    details["golden"] = Golden((zeros,), (zeros,)).to_json()

    def sign(current: bytes | None) -> bytes:
        target = signing.TargetFile(length=len(data), hashes={"sha256": sha}, path=path)
        target.unrecognized_fields["custom"] = model_targets.model_custom(
            name, "1", "float32", details, sequence=1
        )
        return signing.sign_targets(current, [target], signing.load_signer(fleet.keys / "targets.key"))

    publish_targets(_operator(fleet), sign)
    return path


@pytest.mark.parametrize("attack", ["hang", "crash", "memory"])
def test_signed_model_that_hangs_crashes_or_exhausts_the_interpreter_is_contained(
    fleet: LocalFleet, digits_files: dict, attack: str
) -> None:
    from edgefleet.devtools import hostile

    agent = fleet.start_agent("cam", fleet.enrollment_token(), "--candidate-timeout", "5")
    fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
    fleet.cli("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, V1)

    model = {
        "hang": hostile.build_hanging_model,
        "crash": hostile.build_crashing_model,
        "memory": lambda: hostile.build_memory_hog_model(8 * 2**30),
    }[attack]()
    path = _plant_signed_model(fleet, "hostile", model)
    fleet.cli("deploy", "hostile", "1", "--to", "all")
    expected = {"hang": "did not finish", "crash": "worker died", "memory": "does not load"}[attack]
    _failed_with(fleet, agent, path, expected)
    assert agent.process.poll() is None  # the agent survived
    assert path in agent.state()["bad_targets"]
    _still_serves_v1(agent)


def test_upload_that_crashes_the_interpreter_is_refused_and_the_server_survives(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    from edgefleet.devtools import hostile

    crasher = tmp_path / "crash.tflite"
    crasher.write_bytes(hostile.build_crashing_model())
    with pytest.raises(CliError, match="crashed"):
        fleet.cli("model", "push", str(crasher), "--name", "evil", "--version", "1")
    assert fleet.server is not None and fleet.server.poll() is None
    assert fleet.cli_json("model", "list") == []


def test_model_built_for_another_hardware_class_is_refused_as_incompatible(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = _running_v1(fleet, digits_files)

    def other_hardware(_path: str, custom: dict) -> None:
        custom["hardware_classes"] = ["jetson-orin"]

    push_model(
        _operator(fleet), digits_files["v2"].read_bytes(), "digits", "2",
        signing.load_signer(fleet.keys / "targets.key"), edit_custom=other_hardware,
    )  # fmt: skip
    fleet.cli("deploy", "digits", "2", "--to", "all")
    _failed_with(fleet, agent, V2, "built for jetson-orin")
    _still_serves_v1(agent)


def test_server_streaming_past_the_signed_length_is_cut_off_at_it(
    fleet: LocalFleet, digits_files: dict
) -> None:
    agent = _running_v1(fleet, digits_files)
    fleet.cli("model", "push", str(digits_files["v2"]), "--name", "digits", "--version", "2")
    sha = next(m["sha256"] for m in fleet.cli_json("model", "list") if m["version"] == "2")
    blob = fleet.data_dir / "blobs" / sha[:2] / sha
    signed_length = blob.stat().st_size
    with open(blob, "ab") as f:  # the server now sends 8 MiB more than was signed
        f.write(b"\0" * 8 * 2**20)
    fleet.cli("deploy", "digits", "2", "--to", "all")
    fleet.wait_running(agent, V2)  # the first signed-length bytes are right; the rest was never kept
    model = agent.state_dir / "models" / (agent.state()["current"]["sha256"] + ".tflite")
    assert model.stat().st_size == signed_length
    assert "from byte 0 of 87120" in agent.log()
