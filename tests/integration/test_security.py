"""Attacks on the fleet server's RPC surface, against a real in-process server (tests/rpc_harness.py).

Each test is named after the attack it shows fails. They cover docs/reliability.md, "Transport and
identity" (who may call what, credentials from the channel only, expired / revoked / foreign certificates,
replayed status reports) and "Bad input" (oversized messages and metadata, semantically invalid fields, and
telemetry floods from "Load").
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2

from edgefleet import pki
from edgefleet.devtools.raw_rpc import (
    CAPABILITIES,
    DEVICE_SERVICE,
    ENROLL_PATH,
    HEALTH_CHECK,
    HEALTH_CHECK_PATH,
    OPERATOR_SERVICE,
    ROLLOUT_SERVICE,
    Outcome,
    call,
    rpc,
    rpcs,
)
from edgefleet.devtools.rpc_harness import NO_CERTIFICATE, Device, Harness, running_harness
from edgefleet.server.app import ServerConfig
from edgefleet.server.auth import PUBLIC, Authenticator, AuthInterceptor, build_policy, enrollment_policy
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import common_pb2, device_pb2, operator_pb2

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

DEVICE_RPCS = rpcs(DEVICE_SERVICE)
OPERATOR_RPCS = rpcs(OPERATOR_SERVICE, ROLLOUT_SERVICE)
AUTHENTICATED_RPCS = [r for r in rpcs() if r.path != ENROLL_PATH]
DEVICE_ONLY_RPCS = [r for r in DEVICE_RPCS if r.path != ENROLL_PATH]
HEALTH_RPCS = {HEALTH_CHECK_PATH, "/grpc.health.v1.Health/Watch"}

CONNECT = rpc("/edgefleet.v1.DeviceService/Connect")
TELEMETRY = rpc("/edgefleet.v1.DeviceService/ReportTelemetry")
GET_METADATA = rpc("/edgefleet.v1.DeviceService/GetMetadata")
DOWNLOAD = rpc("/edgefleet.v1.DeviceService/DownloadModel")
GET_ASSIGNMENT = rpc("/edgefleet.v1.DeviceService/GetAssignment")
ENROLL = rpc(ENROLL_PATH)

YEAR_3000_MS = 32_503_680_000_000
MiB = 2**20


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path) as h:
        yield h


@pytest.fixture
async def roomy(tmp_path: Path) -> AsyncIterator[Harness]:
    """A server whose telemetry limit does not get in the way of tests that send many bad reports."""
    async with running_harness(tmp_path, telemetry_burst=100_000) as h:
        yield h


async def outcomes(channel: grpc.aio.Channel, methods: Iterable[Any]) -> dict[str, str]:
    """{rpc path: "CODE: details"} for each RPC called with an empty request."""
    return {m.path: str(await call(channel, m)) for m in methods}


def codes(answers: dict[str, str]) -> dict[str, str]:
    return {path: answer.split(":")[0] for path, answer in answers.items()}


async def refused_without_effect(
    harness: Harness, channel: grpc.aio.Channel, methods: list[Any], code: grpc.StatusCode
) -> None:
    """Every method answers `code`, no handler runs (no Fleet method is called) and nothing is written."""
    before = await harness.rows()
    with harness.fleet_calls() as fleet_calls:
        answers = await outcomes(channel, methods)
    assert codes(answers) == {m.path: code.name for m in methods}, answers
    assert fleet_calls == []
    assert await harness.rows() == before


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def ref(path: str) -> common_pb2.ModelRef:
    name, version, variant = path.removesuffix(".tflite").split("/")
    return common_pb2.ModelRef(target_path=path, model_name=name, version=version, variant=variant)


def status(sequence: int, sent_at_ms: int, current: str, previous: str = "") -> bytes:
    return device_pb2.DeviceMessage(
        status=device_pb2.DeviceStatus(
            current=ref(current),
            previous=ref(previous) if previous else common_pb2.ModelRef(),
            capabilities=CAPABILITIES,
            sequence=sequence,
            sent_at_unix_ms=sent_at_ms,
        )
    ).SerializeToString()


# ---- authorization: deny by default, every RPC walked -----------------------------------------------------


def test_policy_covers_every_rpc_and_only_enroll_and_health_are_public() -> None:
    policy = build_policy()
    expected = {r.path: pki.DEVICE for r in DEVICE_RPCS} | {r.path: pki.OPERATOR for r in OPERATOR_RPCS}
    expected[ENROLL_PATH] = PUBLIC
    assert {path: policy.get(path) for path in expected} == expected
    assert {path for path, role in policy.items() if role == PUBLIC} == {ENROLL_PATH, *HEALTH_RPCS}
    assert set(policy) == set(expected) | HEALTH_RPCS  # nothing else is reachable
    assert enrollment_policy() == {path: PUBLIC for path in (ENROLL_PATH, *HEALTH_RPCS)}


async def test_rpc_missing_from_the_policy_is_refused_to_everyone(harness: Harness) -> None:
    """Deny by default: a served method the policy does not name (a new service, a typo) runs for nobody,
    not even the operator."""
    ran: list[str] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ran.append("echo")
        return request

    authenticator = Authenticator(
        tls=True, operator_token="unused", device_status=harness.fleet.devices.device_status
    )
    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator, build_policy())])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "edgefleet.v1.NewService", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    tls = pki.TlsFiles(harness.data_dir / "tls")
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=harness.ca_pem,
            require_client_auth=True,
        ),
    )
    await server.start()
    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", harness.operator_credential.for_channel(harness.ca_pem)
        ) as channel:
            echo_call = channel.unary_unary("/edgefleet.v1.NewService/Echo")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo_call(b"hello", timeout=10)
    finally:
        await server.stop(0)
    assert refused.value.code() == DENIED
    assert ran == []


async def test_device_certificate_cannot_call_operator_rpcs(harness: Harness) -> None:
    device = await harness.enroll("cam")
    await refused_without_effect(harness, device.channel, OPERATOR_RPCS, DENIED)


async def test_operator_certificate_cannot_call_device_rpcs(harness: Harness) -> None:
    await refused_without_effect(harness, harness.operator, DEVICE_ONLY_RPCS, DENIED)


async def test_certificate_of_no_known_principal_is_unauthenticated_on_every_rpc(harness: Harness) -> None:
    """Certificates the fleet CA really issued, that pass the TLS handshake, but name no principal: a
    "server" role used as a client, no role, an invented role, a device id that was never enrolled."""
    await harness.enroll("cam")  # a real device exists, so an empty device table is not why
    for credential in (
        harness.mint("edgefleet-server", pki.SERVER),
        harness.mint("operator", ""),
        harness.mint("operator", "admin"),
        harness.mint("dev-000000000000", pki.DEVICE),
    ):
        await refused_without_effect(
            harness, harness.channel(credential), AUTHENTICATED_RPCS, UNAUTHENTICATED
        )
    # The server's own certificate (server-auth key usage only) does not even pass the handshake.
    server_like = harness.mint("edgefleet-server", pki.SERVER, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    assert codes(await outcomes(harness.channel(server_like), AUTHENTICATED_RPCS)) == {
        r.path: UNAVAILABLE.name for r in AUTHENTICATED_RPCS
    }


# ---- transport: which port serves what, and to whom ---------------------------------------------------------


async def test_enrollment_port_serves_only_enroll(harness: Harness) -> None:
    """Without a certificate (and with one: the enrollment port does not ask for it), only Enroll and
    health answer there; device RPCs are PERMISSION_DENIED and operator RPCs are not even served."""
    for credential in (NO_CERTIFICATE, harness.operator_credential):
        channel = harness.channel(credential, enroll_port=True)
        await refused_without_effect(harness, channel, DEVICE_ONLY_RPCS, DENIED)
        before = await harness.rows()
        for method in OPERATOR_RPCS:
            assert (await call(channel, method)).code in (grpc.StatusCode.UNIMPLEMENTED, DENIED), method
        assert await harness.rows() == before
    assert await harness.healthy(enroll_port=True)
    device = await harness.enroll("cam")  # and Enroll itself works there
    assert (await call(device.channel, GET_ASSIGNMENT)).code == OK


async def test_client_without_certificate_cannot_connect_to_the_main_port(harness: Harness) -> None:
    before = await harness.rows()
    answers = await outcomes(harness.channel(NO_CERTIFICATE), rpcs())  # Enroll included
    assert set(codes(answers).values()) == {UNAVAILABLE.name}, answers
    async with grpc.aio.insecure_channel(harness.address) as plaintext:
        assert (await call(plaintext, GET_ASSIGNMENT)).code == UNAVAILABLE
    assert await harness.rows() == before


async def test_certificate_from_another_ca_is_refused_in_the_handshake(harness: Harness) -> None:
    device = await harness.enroll("cam")
    before = await harness.rows()
    for credential in (
        harness.from_another_ca(device.id, pki.DEVICE),  # a real device's id, signed by an intruder
        harness.from_another_ca("operator", pki.OPERATOR),
    ):
        answers = await outcomes(harness.channel(credential), AUTHENTICATED_RPCS)
        assert set(codes(answers).values()) == {UNAVAILABLE.name}, answers
    assert await harness.rows() == before


async def test_expired_device_certificate_is_refused(harness: Harness) -> None:
    device = await harness.enroll("cam")
    expired = harness.expired(device.id)  # the real CA, the real device id, not_before two years ago
    before = await harness.rows()
    answers = await outcomes(harness.channel(expired), DEVICE_ONLY_RPCS)
    assert set(codes(answers).values()) == {UNAVAILABLE.name}, answers
    assert await harness.rows() == before
    assert (await call(device.channel, GET_ASSIGNMENT)).code == OK  # its valid certificate still works


async def test_revoked_device_is_refused_and_its_control_stream_ended(harness: Harness) -> None:
    device, other = await harness.enroll_devices(2)
    stream = device.stub.Connect()
    await stream.write(device_pb2.DeviceMessage.FromString(status(1, now_ms(), "m/1/float32.tflite")))
    await wait_until(lambda: harness.fleet.streams.is_connected(device.id))

    await harness.operator_stub.RevokeDevice(
        operator_pb2.RevokeDeviceRequest(device_id=device.id), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while (await asyncio.wait_for(stream.read(), 10)) is not grpc.aio.EOF:
            pass  # the stream's hello, sent before the revocation
    assert ended.value.code() == UNAVAILABLE
    assert not harness.fleet.streams.is_connected(device.id)

    before = await harness.rows()
    with harness.fleet_calls() as fleet_calls:
        answers = await outcomes(device.channel, DEVICE_ONLY_RPCS)
    assert codes(answers) == {r.path: UNAUTHENTICATED.name for r in DEVICE_ONLY_RPCS}, answers
    assert fleet_calls == []
    assert await harness.rows() == before
    assert (await call(other.channel, GET_ASSIGNMENT)).code == OK  # the rest of the fleet is unaffected


# ---- identity comes from the channel ----------------------------------------------------------------------


def _fields_naming_a_principal(message: Descriptor, seen: set[str]) -> list[str]:
    if message.full_name in seen:
        return []
    seen.add(message.full_name)
    found = []
    for f in message.fields:
        if re.search(r"device|^id$|_ids?$|token|identity|principal|certificate|client|caller", f.name):
            # Name a rollback command the device answers and the deployment an event is about, not a device.
            if f.name not in ("command_id", "deployment_id"):
                found.append(f"{message.full_name}.{f.name}")
        if f.message_type is not None:
            found += _fields_naming_a_principal(f.message_type, seen)
    return found


def test_no_device_request_field_names_a_device() -> None:
    """Walks every request message (nested ones too) of every DeviceService RPC but the public Enroll."""
    seen: set[str] = set()
    found = [
        name
        for method in DEVICE_SERVICE.methods
        if method.name != "Enroll"
        for name in _fields_naming_a_principal(method.input_type, seen)
    ]
    assert found == []
    assert len(seen) >= len(DEVICE_ONLY_RPCS)  # the walk did visit the messages


async def test_device_cannot_speak_for_another_device(harness: Harness) -> None:
    a, b = await harness.enroll_devices(2)
    model = await harness.publish_model("digits", "1")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector=f"device:{b.id}"),
        timeout=10,
    )
    mine = await a.stub.GetAssignment(device_pb2.GetAssignmentRequest(), timeout=10)
    theirs = await b.stub.GetAssignment(device_pb2.GetAssignmentRequest(), timeout=10)
    assert not mine.HasField("assignment")
    assert theirs.assignment.model.target_path == model.target_path

    # What A reports lands on A's record only, whatever it claims.
    connect = await call(a.channel, CONNECT, [status(1, now_ms(), model.target_path)])
    telemetry = device_pb2.ReportTelemetryRequest(report=device_pb2.TelemetryReport(at_unix_ms=now_ms()))
    assert (await call(a.channel, TELEMETRY, [telemetry.SerializeToString()])).code == OK
    assert connect.code == OK
    record_a = await asyncio.to_thread(harness.fleet.store.get_device, a.id)
    record_b = await asyncio.to_thread(harness.fleet.store.get_device, b.id)
    assert record_a.current is not None and record_a.current.target_path == model.target_path
    assert record_b.current is None and record_b.status_sequence == 0
    assert len(await asyncio.to_thread(harness.fleet.store.list_telemetry, a.id, 10)) == 1
    assert await asyncio.to_thread(harness.fleet.store.list_telemetry, b.id, 10) == []


async def test_replayed_old_status_report_does_not_change_deployment_state(harness: Harness) -> None:
    device = await harness.enroll("cam")
    v1 = await harness.publish_model("digits", "1")
    v2 = await harness.publish_model("digits", "2")
    await harness.operator_stub.CreateDeployment(
        operator_pb2.CreateDeploymentRequest(model_name="digits", version="2", selector="all"), timeout=10
    )
    now = now_ms()
    running_v1 = status(1, now - 60_000, v1.target_path)
    running_v2 = status(2, now, v2.target_path, previous=v1.target_path)
    older_claim = status(1, now - 30_000, v1.target_path)  # older report, different model
    answer = await call(device.channel, CONNECT, [running_v1, running_v2, running_v1, older_claim])
    assert answer.code == OK

    record = await asyncio.to_thread(harness.fleet.store.get_device, device.id)
    assert record.current is not None and record.current.target_path == v2.target_path
    assert record.previous is not None and record.previous.target_path == v1.target_path
    listed = await harness.operator_stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)
    assert [d.current.target_path for d in listed.devices] == [v2.target_path]
    assert [d.desired.target_path for d in listed.devices] == [v2.target_path]


# ---- oversized input ---------------------------------------------------------------------------------------


async def still_serving(harness: Harness, device: Device) -> None:
    assert await harness.healthy()
    assert await harness.healthy(enroll_port=True)
    assert (await call(device.channel, GET_ASSIGNMENT)).code == OK
    assert (await call(harness.operator, rpc("/edgefleet.v1.OperatorService/ListDevices"))).code == OK


async def test_oversized_message_is_resource_exhausted_and_server_stays_healthy(harness: Harness) -> None:
    device = await harness.enroll("cam")
    limit = ServerConfig().max_message_bytes
    huge = b"x" * (limit + MiB)
    big_name = device_pb2.GetMetadataRequest(name=huge.decode()).SerializeToString()
    big_status = device_pb2.DeviceMessage(
        status=device_pb2.DeviceStatus(bad_targets=[huge.decode()])
    ).SerializeToString()
    big_chunk = operator_pb2.UploadModelRequest(chunk=huge).SerializeToString()
    before = await harness.rows()
    assert (await call(device.channel, GET_METADATA, [big_name])).code == EXHAUSTED
    assert (await call(device.channel, CONNECT, [big_status])).code == EXHAUSTED
    upload = rpc("/edgefleet.v1.OperatorService/UploadModel")
    assert (await call(harness.operator, upload, [big_chunk])).code == EXHAUSTED
    # The enrollment port, open to anyone, takes far smaller messages.
    enroller = harness.channel(enroll_port=True)
    big_enroll = device_pb2.EnrollRequest(enrollment_token="x", csr_pem=b"x" * (100 * 1024))
    assert (await call(enroller, ENROLL, [big_enroll.SerializeToString()])).code == EXHAUSTED
    assert await harness.rows() == before
    await still_serving(harness, device)


async def test_oversized_metadata_is_refused(harness: Harness) -> None:
    device = await harness.enroll("cam")
    big = [("x-padding", "x" * (64 * 1024))]
    many = [(f"x-header-{i}", "y" * 100) for i in range(400)]
    before = await harness.rows()
    for metadata in (big, many):
        assert (await call(device.channel, GET_ASSIGNMENT, metadata=metadata)).code == EXHAUSTED
        assert (await call(harness.channel(enroll_port=True), ENROLL, metadata=metadata)).code == EXHAUSTED
    assert await harness.rows() == before
    await still_serving(harness, device)


# ---- telemetry flood ---------------------------------------------------------------------------------------


async def test_device_flooding_telemetry_is_rate_limited_and_others_are_not(harness: Harness) -> None:
    flooder, neighbour = await harness.enroll_devices(2)
    report = device_pb2.ReportTelemetryRequest(
        report=device_pb2.TelemetryReport(at_unix_ms=now_ms(), health=common_pb2.HealthSample(cpu_percent=5))
    ).SerializeToString()
    burst = ServerConfig().telemetry_burst
    answers: list[Outcome] = []
    while len(answers) < 10 * burst and (not answers or answers[-1].code == OK):
        answers.append(await call(flooder.channel, TELEMETRY, [report]))
    assert [a.code for a in answers[:burst]] == [OK] * burst  # bursts are fine
    limited = answers[-1]
    assert limited.code == EXHAUSTED, limited
    assert int(limited.trailers["retry-after-ms"]) > 0, limited
    assert (await call(neighbour.channel, TELEMETRY, [report])).code == OK
    accepted = await asyncio.to_thread(harness.fleet.store.list_telemetry, flooder.id, 1000)
    assert len(accepted) == len(answers) - 1
    assert len(await asyncio.to_thread(harness.fleet.store.list_telemetry, neighbour.id, 1000)) == 1


# ---- semantically invalid fields ---------------------------------------------------------------------------


def telemetry_with(change: Callable[[Any], Any]) -> bytes:
    report = device_pb2.TelemetryReport(
        at_unix_ms=now_ms(),
        health=common_pb2.HealthSample(
            cpu_percent=12.5,
            memory_used_bytes=2**20,
            memory_total_bytes=2**30,
            disk_free_bytes=2**32,
            temperature_celsius=-5.0,  # a cold device is fine
            uptime_seconds=60,
        ),
        inference=[
            common_pb2.InferenceStats(
                target_path="digits/1/float32.tflite",
                count=3,
                errors=0,
                latency_bounds_ms=[1.0, 5.0],
                latency_counts=[1, 1, 1],
                latency_sum_ms=7.5,
                latency_max_ms=6.0,
            )
        ],
    )
    change(report)
    return device_pb2.ReportTelemetryRequest(report=report).SerializeToString()


def _set(path: str, value: Any) -> Callable[[Any], None]:
    """A change to a message: `_set("health.cpu_percent", nan)`; "inference.0.latency_counts.0" indexes."""

    def change(message: Any) -> None:
        *parents, last = path.split(".")
        for part in parents:
            message = message[int(part)] if part.isdigit() else getattr(message, part)
        if last.isdigit():
            message[int(last)] = value
        else:
            setattr(message, last, value)

    return change


async def refused_as_invalid(
    harness: Harness, channel: grpc.aio.Channel, cases: dict[str, tuple[Any, list[bytes]]]
) -> None:
    """Each case (name -> (rpc, request messages)) answers INVALID_ARGUMENT and writes nothing."""
    before = await harness.rows()
    answers: dict[str, Outcome] = {}
    for name, (method, messages) in cases.items():
        answers[name] = await call(channel, method, messages)
    assert {n: a.code.name for n, a in answers.items()} == {n: INVALID.name for n in cases}, {
        n: str(a) for n, a in answers.items() if a.code != INVALID
    }
    assert await harness.rows() == before


def event(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "target_path": "digits/1/float32.tflite",
        "stage": common_pb2.UPDATE_STAGE_DOWNLOADING,
        "at_unix_ms": now_ms(),
    }
    return device_pb2.DeviceMessage(event=device_pb2.UpdateEvent(**(base | fields))).SerializeToString()


async def test_nan_or_infinite_telemetry_figures_are_invalid(roomy: Harness) -> None:
    device = await roomy.enroll("cam")
    assert (await call(device.channel, TELEMETRY, [telemetry_with(lambda r: None)])).code == OK
    cases = {}
    for path in (
        "health.cpu_percent",
        "health.uptime_seconds",
        "health.temperature_celsius",
        "inference.0.latency_sum_ms",
        "inference.0.latency_max_ms",
        "inference.0.latency_bounds_ms.1",
    ):
        for value in (math.nan, math.inf, -math.inf):
            cases[f"{path}={value}"] = (TELEMETRY, [telemetry_with(_set(path, value))])
    await refused_as_invalid(roomy, device.channel, cases)


async def test_negative_counts_are_invalid(roomy: Harness) -> None:
    device = await roomy.enroll("cam")
    cases: dict[str, tuple[Any, list[bytes]]] = {
        path: (TELEMETRY, [telemetry_with(_set(path, -1))])
        for path in (
            "dropped_reports",
            "health.memory_used_bytes",
            "health.memory_total_bytes",
            "health.disk_free_bytes",
            "inference.0.count",
            "inference.0.errors",
            "inference.0.latency_counts.2",
        )
    }
    for field in ("cpu_count", "memory_total_bytes", "memory_available_bytes", "disk_free_bytes"):
        caps = common_pb2.Capabilities()
        caps.CopyFrom(CAPABILITIES)
        setattr(caps, field, -1)
        message = device_pb2.DeviceMessage(status=device_pb2.DeviceStatus(capabilities=caps, sequence=1))
        cases[f"status capabilities.{field}"] = (CONNECT, [message.SerializeToString()])
    await refused_as_invalid(roomy, device.channel, cases)
    operator_cases = {
        "GetTelemetry limit": (
            "GetTelemetry",
            operator_pb2.GetTelemetryRequest(device_id=device.id, limit=-1),
        ),
        "ListEvents limit": ("ListEvents", operator_pb2.ListEventsRequest(limit=-5)),
        "token uses": ("CreateEnrollmentToken", operator_pb2.CreateEnrollmentTokenRequest(uses=-1)),
        "token ttl": ("CreateEnrollmentToken", operator_pb2.CreateEnrollmentTokenRequest(ttl_seconds=-60)),
    }
    await refused_as_invalid(
        roomy,
        roomy.operator,
        {
            name: (rpc(f"/edgefleet.v1.OperatorService/{method}"), [request.SerializeToString()])
            for name, (method, request) in operator_cases.items()
        },
    )


async def test_absurd_timestamps_are_invalid(roomy: Harness) -> None:
    device = await roomy.enroll("cam")
    cases: dict[str, tuple[Any, list[bytes]]] = {}
    for value in (-1, -(2**62), YEAR_3000_MS, 2**62):
        cases[f"telemetry at {value}"] = (TELEMETRY, [telemetry_with(_set("at_unix_ms", value))])
        cases[f"event at {value}"] = (CONNECT, [event(at_unix_ms=value)])
        cases[f"status sent at {value}"] = (CONNECT, [status(1, value, "digits/1/float32.tflite")])
    await refused_as_invalid(roomy, device.channel, cases)
    # A clock a year off either way is a skew to report, not an absurd time: accepted.
    year_ms = 365 * 86_400_000
    for value in (now_ms() - year_ms, now_ms() + year_ms):
        assert (await call(device.channel, TELEMETRY, [telemetry_with(_set("at_unix_ms", value))])).code == OK
        assert (await call(device.channel, CONNECT, [event(at_unix_ms=value)])).code == OK
        sequence = 2 if value > now_ms() else 1
        assert (await call(device.channel, CONNECT, [status(sequence, value, "m/1/x.tflite")])).code == OK
    record = await asyncio.to_thread(roomy.fleet.store.get_device, device.id)
    assert record.status_sequence == 2 and record.clock_skew_ms > year_ms // 2  # reported, not refused


async def test_status_sequence_beyond_what_the_store_holds_is_invalid_not_a_crash(harness: Harness) -> None:
    device = await harness.enroll("cam")
    cases = {
        f"sequence {n}": (CONNECT, [status(n, now_ms(), "digits/1/float32.tflite")])
        for n in (2**63, 2**64 - 1)
    }
    await refused_as_invalid(harness, device.channel, cases)
    assert (await call(device.channel, CONNECT, [status(2**63 - 1, now_ms(), "m/1/x.tflite")])).code == OK


async def test_negative_or_out_of_range_download_offset_is_invalid(harness: Harness) -> None:
    device = await harness.enroll("cam")
    model = await harness.publish_model("digits", "1")

    def download(offset: int) -> list[bytes]:
        request = device_pb2.DownloadModelRequest(target_path=model.target_path, offset=offset)
        return [request.SerializeToString()]

    await refused_as_invalid(
        harness,
        device.channel,
        {f"offset {o}": (DOWNLOAD, download(o)) for o in (-1, -(2**63), model.length + 1, 2**63 - 1)},
    )
    whole = await call(device.channel, DOWNLOAD, download(0))
    assert whole.code == OK
    data = b"".join(device_pb2.DownloadModelResponse.FromString(r).data for r in whole.responses)
    assert len(data) == model.length
    assert (await call(device.channel, DOWNLOAD, download(model.length))).code == OK  # nothing left: fine


async def test_empty_or_absurd_target_path_is_invalid(harness: Harness) -> None:
    device = await harness.enroll("cam")
    await harness.publish_model("digits", "1")
    paths = {
        "empty": "",
        "huge": "digits/1/" + "f" * 10_000 + ".tflite",
        "parent dirs": "../../../etc/passwd",
        "absolute": "/etc/passwd",
        "dot segments": "digits/../digits/1/float32.tflite",
        "NUL": "digits/1/float32.tflite\x00",
        "newline": "digits/1/float32.tflite\n",
    }
    cases = {
        name: (DOWNLOAD, [device_pb2.DownloadModelRequest(target_path=path).SerializeToString()])
        for name, path in paths.items()
    }
    # A status naming an absurd current model is refused too (the control stream ends with the status).
    cases["status current huge"] = (
        CONNECT,
        [
            device_pb2.DeviceMessage(
                status=device_pb2.DeviceStatus(
                    current=common_pb2.ModelRef(target_path="x" * 10_000), sequence=1
                )
            ).SerializeToString()
        ],
    )
    cases["telemetry inference target huge"] = (
        TELEMETRY,
        [telemetry_with(_set("inference.0.target_path", "digits/1/" + "f" * 1_000_000))],
    )
    await refused_as_invalid(harness, device.channel, cases)


async def test_device_cannot_bloat_what_operators_read(harness: Harness) -> None:
    """Capabilities are stored with the device and sent back by ListDevices: one device with megabytes of
    them would make that answer too large for every operator's client (4 MiB by default)."""
    device = await harness.enroll("cam")
    cases: dict[str, tuple[Any, list[bytes]]] = {}
    for field in ("runtime", "runtime_version", "cpu_arch", "hardware_class", "accelerators"):
        caps = common_pb2.Capabilities()
        caps.CopyFrom(CAPABILITIES)
        if field == "accelerators":
            caps.accelerators.append("npu" * 2**20)
        else:
            setattr(caps, field, "x" * 5 * MiB)
        message = device_pb2.DeviceMessage(status=device_pb2.DeviceStatus(capabilities=caps, sequence=1))
        cases[f"status capabilities.{field}"] = (CONNECT, [message.SerializeToString()])
    await refused_as_invalid(harness, device.channel, cases)
    listed = await harness.operator_stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10)
    assert [d.id for d in listed.devices] == [device.id]


async def test_bad_metadata_name_is_invalid(harness: Harness) -> None:
    device = await harness.enroll("cam")
    names = ["", "root.json", "../../fleet.db", "0.root", "-1.targets", "1.root\n", "timestamp\n",
             "1.snapshot/../root", "x" * 100_000, "9999999999.targets"]  # fmt: skip
    cases = {
        repr(name[:30]): (GET_METADATA, [device_pb2.GetMetadataRequest(name=name).SerializeToString()])
        for name in names
    }
    await refused_as_invalid(harness, device.channel, cases)
    ok = await call(
        device.channel, GET_METADATA, [device_pb2.GetMetadataRequest(name="root").SerializeToString()]
    )
    assert ok.code == OK


async def test_bad_selectors_and_names_on_operator_rpcs_are_invalid(harness: Harness) -> None:
    device = await harness.enroll("cam", group="lab")
    await harness.publish_model("digits", "1")
    bad_selectors = ["", "every thing", "device:", "group:", "group:a b", "device:../x", "group:" + "g" * 200,
                     "device:*", "all,group:lab", "DEVICE:" + device.id]  # fmt: skip
    bad_names = ["", " ", "a b", "../x", "-x", "x" * 200, "digits\n", "dig/its", "dig\x00its"]
    deploy = rpc("/edgefleet.v1.OperatorService/CreateDeployment")
    rollback = rpc("/edgefleet.v1.OperatorService/RollbackDevices")
    devices = rpc("/edgefleet.v1.OperatorService/ListDevices")
    cases: dict[str, tuple[Any, list[bytes]]] = {}

    def add(name: str, method: Any, request: Any) -> None:
        cases[name] = (method, [request.SerializeToString()])

    for s in bad_selectors:
        add(
            f"deploy to {s!r}",
            deploy,
            operator_pb2.CreateDeploymentRequest(model_name="digits", version="1", selector=s),
        )
        add(f"rollback {s!r}", rollback, operator_pb2.RollbackDevicesRequest(selector=s))
        if s:  # an empty selector lists every device
            add(f"list {s!r}", devices, operator_pb2.ListDevicesRequest(selector=s))
    for n in bad_names:
        add(
            f"deploy model {n!r}",
            deploy,
            operator_pb2.CreateDeploymentRequest(model_name=n, version="1", selector="all"),
        )
        add(
            f"deploy version {n!r}",
            deploy,
            operator_pb2.CreateDeploymentRequest(model_name="digits", version=n, selector="all"),
        )
        add(
            f"revoke {n!r}",
            rpc("/edgefleet.v1.OperatorService/RevokeDevice"),
            operator_pb2.RevokeDeviceRequest(device_id=n),
        )
        add(
            f"telemetry of {n!r}",
            rpc("/edgefleet.v1.OperatorService/GetTelemetry"),
            operator_pb2.GetTelemetryRequest(device_id=n),
        )
        if n:  # empty = every device / every model / the default group
            add(
                f"events of {n!r}",
                rpc("/edgefleet.v1.OperatorService/ListEvents"),
                operator_pb2.ListEventsRequest(device_id=n),
            )
            add(
                f"models named {n!r}",
                rpc("/edgefleet.v1.OperatorService/ListModels"),
                operator_pb2.ListModelsRequest(name=n),
            )
            add(
                f"token group {n!r}",
                rpc("/edgefleet.v1.OperatorService/CreateEnrollmentToken"),
                operator_pb2.CreateEnrollmentTokenRequest(group=n),
            )
            add(
                f"deploy variant {n!r}",
                deploy,
                operator_pb2.CreateDeploymentRequest(
                    model_name="digits", version="1", selector="all", variant=n
                ),
            )
    add(
        "signed metadata 'snapshot'",
        rpc("/edgefleet.v1.OperatorService/GetSignedMetadata"),
        operator_pb2.GetSignedMetadataRequest(name="snapshot"),
    )
    await refused_as_invalid(harness, harness.operator, cases)
    # Nothing was deployed, revoked or rolled back by any of them.
    record = await asyncio.to_thread(harness.fleet.store.get_device, device.id)
    assert (record.desired_target, record.revoked, record.rollback_command) == ("", False, "")


def _bad_csrs(name: str) -> dict[str, bytes]:
    good = pki.make_csr(pki.new_key(), name)
    lines = good.splitlines(keepends=True)
    body = bytearray(b"".join(lines[1:-1]))
    body[len(body) // 2] = ord("A") if body[len(body) // 2] != ord("A") else ord("B")
    tampered = lines[0] + bytes(body) + lines[-1]
    # The key's curve OID 1.2.840.10045.3.1.7 (P-256) changed to 1.1.840...: a curve nobody supports.
    der = base64.b64decode(b"".join(lines[1:-1]))
    odd_curve = der.replace(bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("0608298648ce3d030107"))
    version = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version, v1 = 0
    odd_version = der[:version] + b"\x02\x01\x05" + der[version + 3 :]
    return {
        "empty": b"",
        "garbage": b"not a certificate signing request",
        "truncated": good[: len(good) // 2],
        "certificate instead": pki.cert_pem(pki.CertificateAuthority.create().cert),
        "tampered": tampered,
        "P-384 key": pki.make_csr(ec.generate_private_key(ec.SECP384R1()), name),  # type: ignore[arg-type]
        "too large": good + b"\n" * (20 * 1024),
        "unsupported curve": lines[0] + base64.encodebytes(odd_curve) + lines[-1],
        "unknown version": lines[0] + base64.encodebytes(odd_version) + lines[-1],
    }


async def test_enrollment_with_malformed_csr_is_refused_and_does_not_spend_the_token(
    harness: Harness,
) -> None:
    token = await harness.create_token(uses=1)
    enroller = harness.channel(enroll_port=True)
    key = pki.new_key()

    def enroll(**changes: Any) -> list[bytes]:
        request = harness.enrollment_request("cam", token, key)
        for field, value in changes.items():
            if field == "capabilities":
                request.capabilities.CopyFrom(value)
            else:
                setattr(request, field, value)
        return [request.SerializeToString()]

    cases = {f"csr {name}": (ENROLL, enroll(csr_pem=csr)) for name, csr in _bad_csrs("cam").items()}
    for name in ("", "a b", "../cam", "cam\n", "x" * 200):
        cases[f"device name {name!r}"] = (ENROLL, enroll(device_name=name))
    for field, value in (("cpu_count", -1), ("memory_total_bytes", -1), ("latency_budget_ms", math.nan)):
        caps = common_pb2.Capabilities()
        caps.CopyFrom(CAPABILITIES)
        setattr(caps, field, value)
        cases[f"capabilities {field}={value}"] = (ENROLL, enroll(capabilities=caps))
    await refused_as_invalid(harness, enroller, cases)
    # The single-use token is still good for a well-formed request.
    device = await harness.enroll("cam", token=token)
    assert (await call(device.channel, GET_ASSIGNMENT)).code == OK
    again = await call(enroller, ENROLL, enroll())
    assert again.code == INVALID and "used up" in again.details


async def test_health_check_is_public_but_still_behind_the_handshake(harness: Harness) -> None:
    """Health is the one public method on the main port besides Enroll: any certificate of the fleet CA gets
    the serving status (and nothing else); without one the handshake already fails."""
    anyone = harness.channel(harness.mint("anyone", ""))
    request = [health_pb2.HealthCheckRequest().SerializeToString()]
    reply = await call(anyone, HEALTH_CHECK, request)
    assert reply.code == OK
    assert health_pb2.HealthCheckResponse.FromString(reply.responses[0]).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert (await call(harness.channel(NO_CERTIFICATE), HEALTH_CHECK, request)).code == UNAVAILABLE
