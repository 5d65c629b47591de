"""Compressed variants end to end: measured on the server, signed, chosen per device, sent compressed,
decoded within the signed size and verified on real agents of both runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet import pki
from edgefleet.cli.client import CliError
from edgefleet.devtools.localfleet import LocalClient, LocalFleet, wait_for
from edgefleet.devtools.modelgen import DigitsData
from edgefleet.runtime import LITERT, TFLITE_RUNTIME


def test_each_device_gets_a_variant_its_runtime_computes_correctly(
    fleet: LocalFleet, digits_files: dict, digits: tuple[bytes, bytes, DigitsData]
) -> None:
    _, _, data = digits
    token = fleet.enrollment_token(uses=2)
    litert = fleet.start_agent("new", token, "--runtime", LITERT)
    legacy = fleet.start_agent("old", token, "--runtime", TFLITE_RUNTIME)
    pushed = fleet.cli_json(
        "model",
        "push",
        str(digits_files["v1"]),
        "--name",
        "digits",
        "--version",
        "1",
        "--eval",
        str(digits_files["eval"]),
    )
    rows = {r["variant"]: r for r in pushed["variants"]}
    assert TFLITE_RUNTIME not in rows["int8-dynamic-pc"]["runtimes_ok"]  # the silently wrong one
    assert LITERT in rows["int8-dynamic-pc"]["runtimes_ok"]

    # Pinned to per-channel int8: the LiteRT device runs it, the tflite-runtime device is left out, with why.
    deployed = fleet.cli_json("deploy", "digits", "1", "--to", "all", "--variant", "int8-dynamic-pc")
    assert deployed["targeted"] == 1
    assert any(
        legacy.device_id() in u and "not computed correctly by tflite-runtime" in u
        for u in deployed["unassigned"]
    )
    fleet.wait_running(litert, "digits/1/int8-dynamic-pc.tflite")
    assert legacy.running() == ""

    # The per-device choice: both get a variant, never one their runtime computes wrongly.
    fleet.cli_json("deploy", "digits", "1", "--to", "all")
    wait_for(legacy.running, 60, "the tflite-runtime device to get a variant")
    fleet.wait_running(legacy, legacy.running())
    chosen = legacy.running().split("/")[-1].removesuffix(".tflite")
    assert TFLITE_RUNTIME in rows[chosen]["runtimes_ok"] and not rows[chosen]["excluded"]

    # What it serves is right: accuracy recomputed through the device, not read from the metadata.
    client = LocalClient(legacy.socket)
    correct = 0
    for x, y in zip(data.x_test[:200], data.y_test[:200], strict=True):
        outputs, _ = client.infer([x[None, :]])
        correct += int(np.argmax(outputs[0])) == int(y)
    client.close()
    assert correct / 200 >= 0.95


def test_variants_over_the_tolerance_are_never_assigned(fleet: LocalFleet, digits_files: dict) -> None:
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    pushed = fleet.cli_json(
        "model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1",
        "--eval", str(digits_files["eval"]), "--tolerance", "0.05",
    )  # fmt: skip
    excluded = {r["variant"] for r in pushed["variants"] if r["excluded"]}
    assert excluded  # with a tiny tolerance, lossy variants are out
    deployed = fleet.cli_json("deploy", "digits", "1", "--to", "all")
    fleet.wait_running(agent, agent.running() or wait_for(agent.running, 30, "a variant"))
    assert agent.running().split("/")[-1].removesuffix(".tflite") not in excluded
    for name in excluded:
        # Pinned to an excluded variant, the deployment would reach no device: refused, saying why.
        with pytest.raises(CliError) as refused:
            fleet.cli_json("deploy", "digits", "1", "--to", "all", "--variant", name)
        assert "reaches no device" in str(refused.value) and "excluded" in str(refused.value)
    assert deployed["targeted"] == 1


def test_a_server_alone_cannot_send_devices_back_to_an_older_model(
    fleet: LocalFleet, digits_files: dict
) -> None:
    """Rollback goes through the server, but the permission must come from the operator's key."""
    agent = fleet.start_agent("cam", fleet.enrollment_token())
    for version, key in (("1", "v1"), ("2", "v2")):
        fleet.cli("model", "push", str(digits_files[key]), "--name", "digits", "--version", version)
        fleet.cli("deploy", "digits", version, "--to", "all")
        fleet.wait_running(agent, f"digits/{version}/float32.tflite")

    # Someone holding the server (not the targets key) orders a rollback: the RPC, without the CLI's signature.
    from edgefleet.cli.client import CliError, Operator
    from edgefleet.v1 import operator_pb2

    op = Operator(_args(fleet))
    op.call("RollbackDevices", operator_pb2.RollbackDevicesRequest(selector="all", reason="attacker"))
    events = lambda: fleet.cli_json("events", "--device", agent.device_id())  # noqa: E731
    wait_for(lambda: any("no operator signature" in e["reason"] for e in events()), 30, "the refusal")
    assert agent.running() == "digits/2/float32.tflite"

    # ...and a deployment of the old version straight through the RPC is refused the same way.
    try:
        op.call(
            "CreateDeployment",
            operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector="all"),
        )
    except CliError:
        pass
    wait_for(
        lambda: sum("no operator signature" in e["reason"] for e in events()) >= 2, 30, "the second refusal"
    )
    assert agent.running() == "digits/2/float32.tflite"

    # The operator's CLI signs the permission, and then the same order is obeyed.
    fleet.cli("rollback", "--to", "all")
    fleet.wait_running(agent, "digits/1/float32.tflite")


def _args(fleet: LocalFleet):
    import argparse

    return argparse.Namespace(
        server=fleet.address,
        tls_dir=str(fleet.data_dir / "operator"),
        insecure_plaintext=False,
        token_file="",
    )


def test_plaintext_is_only_behind_an_explicit_flag_and_then_works(tmp_path, digits_files: dict) -> None:
    fleet = LocalFleet(tmp_path / "plain", plaintext=True)
    fleet.init_keys()
    fleet.start_server()
    try:
        assert "PLAINTEXT" in fleet.server_log()
        agent = fleet.start_agent("cam", fleet.enrollment_token())
        fleet_token = fleet.enrollment_token()
        fleet.cli("model", "push", str(digits_files["v1"]), "--name", "digits", "--version", "1")
        fleet.cli("deploy", "digits", "1", "--to", "all")
        fleet.wait_running(agent, "digits/1/float32.tflite")

        # An agent set up for TLS never falls back to plaintext: it cannot enroll here and keeps retrying.
        other_ca = pki.CertificateAuthority.create()
        ca_file = tmp_path / "ca.crt"
        ca_file.write_bytes(pki.cert_pem(other_ca.cert))
        fleet.plaintext = False
        tls_agent = fleet.start_agent(
            "tls-only", fleet_token, "--ca-cert", str(ca_file), "--enroll-server", fleet.address, wait=False
        )
        wait_for(
            lambda: f"enrollment at {fleet.address} failed (UNAVAILABLE" in tls_agent.log(),
            30,
            "a failed TLS handshake",
        )
        assert tls_agent.process.poll() is None and tls_agent.device_id() == ""
    finally:
        fleet.close()
