"""Random bytes and mutated valid requests against every DeviceService RPC of one real server.

docs/reliability.md, "Bad input": random bytes and fuzzed protobufs give INVALID_ARGUMENT (or another
clean status), never a crash or a bad write. A server-side exception shows as UNKNOWN (raised in a handler)
or INTERNAL (caught by `status_for_errors`), so neither may ever come back; afterwards the server is
healthy, answers a normal call, and what it stored still passes the server's own checks.

The server runs once per module on a loop in its own thread (`rpc_harness.ServerThread`); hypothesis drives
plain functions that call it over blocking channels: with a device's mTLS certificate on the main port, and
without any certificate on the enrollment port (Enroll).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from edgefleet import pki
from edgefleet.convert import MAX_AHEAD_MS
from edgefleet.devtools.raw_rpc import (
    CAPABILITIES,
    DEVICE_SERVICE,
    ENROLL_PATH,
    Outcome,
    Rpc,
    call_sync,
    rpc,
    rpcs,
)
from edgefleet.devtools.rpc_harness import Harness, ServerThread
from edgefleet.selectors import check_name
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import common_pb2, device_pb2

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

DEVICE_RPCS = rpcs(DEVICE_SERVICE)


@dataclass
class Target:
    server: ServerThread
    device: grpc.Channel  # main port, a real device's certificate
    enroller: grpc.Channel  # enrollment port, no certificate
    seeds: dict[str, list[bytes]]  # rpc path -> a valid request (one message per stream element)

    @property
    def harness(self) -> Harness:
        return self.server.harness

    def channel_for(self, method: Rpc) -> grpc.Channel:
        return self.enroller if method.path == ENROLL_PATH else self.device

    def send(self, method: Rpc, messages: list[bytes]) -> Outcome:
        return call_sync(self.channel_for(method), method, messages, timeout=10)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # Hypothesis caches what it learns under .hypothesis/ in the working directory: keep it out of the repo.
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    server = ServerThread(tmp_path_factory.mktemp("fuzz"), telemetry_burst=1_000_000)
    harness = server.harness
    device = server.run(harness.enroll("fuzz-cam"))
    model = server.run(harness.publish_model("digits", "1"))
    token = server.run(harness.create_token(uses=100_000))
    now = now_ms()
    seeds = {
        ENROLL_PATH: [harness.enrollment_request("fuzz-new", token, pki.new_key())],
        "/edgefleet.v1.DeviceService/Connect": [
            device_pb2.DeviceMessage(
                status=device_pb2.DeviceStatus(
                    current=common_pb2.ModelRef(
                        target_path=model.target_path, model_name="digits", version="1"
                    ),
                    capabilities=CAPABILITIES,
                    sequence=1,
                    sent_at_unix_ms=now,
                )
            ),
            device_pb2.DeviceMessage(
                event=device_pb2.UpdateEvent(
                    target_path=model.target_path, stage=common_pb2.UPDATE_STAGE_HEALTHY, at_unix_ms=now
                )
            ),
        ],
        "/edgefleet.v1.DeviceService/GetAssignment": [device_pb2.GetAssignmentRequest()],
        "/edgefleet.v1.DeviceService/RenewCertificate": [
            device_pb2.RenewCertificateRequest(csr_pem=pki.make_csr(pki.new_key(), "fuzz-cam"))
        ],
        "/edgefleet.v1.DeviceService/GetMetadata": [device_pb2.GetMetadataRequest(name="root")],
        "/edgefleet.v1.DeviceService/DownloadModel": [
            device_pb2.DownloadModelRequest(target_path=model.target_path, offset=1)
        ],
        "/edgefleet.v1.DeviceService/ReportTelemetry": [
            device_pb2.ReportTelemetryRequest(
                report=device_pb2.TelemetryReport(
                    at_unix_ms=now,
                    health=common_pb2.HealthSample(cpu_percent=3, memory_used_bytes=10, uptime_seconds=5),
                    inference=[
                        common_pb2.InferenceStats(
                            target_path=model.target_path,
                            count=2,
                            latency_bounds_ms=[1.0],
                            latency_counts=[1, 1],
                            latency_sum_ms=3.0,
                            latency_max_ms=2.0,
                        )
                    ],
                )
            )
        ],
    }
    assert set(seeds) == {r.path for r in DEVICE_RPCS}, "a new DeviceService RPC needs a valid seed request"
    found = Target(
        server,
        harness.sync_channel(device.credential),
        harness.sync_channel(enroll_port=True),
        {path: [m.SerializeToString() for m in messages] for path, messages in seeds.items()},
    )
    try:
        for method in DEVICE_RPCS:  # the seeds are valid: the fuzzing starts from requests that work
            assert found.send(method, found.seeds[method.path]).code == grpc.StatusCode.OK, method
        yield found
    finally:
        found.device.close()
        found.enroller.close()
        server.close()


def decodes(method: Rpc, messages: list[bytes]) -> bool:
    try:
        for message in messages:
            method.request.FromString(message)
    except DecodeError:
        return False
    return True


def assert_clean(method: Rpc, messages: list[bytes], outcome: Outcome) -> None:
    if not method.client_streaming and not decodes(method, messages):
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {outcome}"
        return
    assert outcome.code not in NEVER, f"{method} {messages!r}: {outcome}"


def assert_still_good(target: Target) -> None:
    """Healthy, a normal call works, and every stored report passes the checks the servicers make."""
    harness = target.harness
    assert target.server.run(harness.healthy())
    assert target.server.run(harness.healthy(enroll_port=True))
    assignment = rpc("/edgefleet.v1.DeviceService/GetAssignment")
    assert target.send(assignment, target.seeds[assignment.path]).code == grpc.StatusCode.OK
    store = harness.fleet.store
    latest = now_ms() + MAX_AHEAD_MS
    for device in store.list_devices():
        check_name("device name", device.name)
        assert all(0 <= r.at_ms <= latest for r in store.list_telemetry(device.id, 100_000))
    assert all(0 <= e.at_ms <= latest for e in store.list_events("", 100_000))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed with a few bytes flipped, inserted, overwritten or deleted."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "insert", "overwrite", "delete"]))
        if edit == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "overwrite" and data:
            data[min(at, len(data) - 1)] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12]))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


_INT = [-1, -(2**31), 2**31 - 1]
_EXTREMES: dict[int, list[Any]] = {
    FieldDescriptor.CPPTYPE_INT32: _INT,
    FieldDescriptor.CPPTYPE_INT64: [*_INT, -(2**63), 2**63 - 1],
    FieldDescriptor.CPPTYPE_UINT32: [0, 2**32 - 1],
    FieldDescriptor.CPPTYPE_UINT64: [0, 2**63, 2**64 - 1],
    FieldDescriptor.CPPTYPE_DOUBLE: [math.nan, math.inf, -math.inf, -1e308, 1e308, -0.0],
    FieldDescriptor.CPPTYPE_FLOAT: [math.nan, math.inf, -math.inf],
    FieldDescriptor.CPPTYPE_BOOL: [True, False],
    FieldDescriptor.CPPTYPE_ENUM: [-1, 99, 2**31 - 1],
    FieldDescriptor.CPPTYPE_STRING: [
        "",
        "\n",
        "../../../etc/passwd",
        "/abs",
        "a\x00b",
        "é" * 300,
        "x" * 70_000,
    ],
}
_BYTES = [b"", b"\x00" * 1000, b"-----BEGIN CERTIFICATE REQUEST-----\n", b"\xff" * 70_000]


def _set_extreme(draw: st.DrawFn, message: Any) -> None:
    """Sets one field somewhere in `message` (nested and repeated ones too) to an extreme value."""
    fields = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    field = draw(st.sampled_from(fields))
    repeated = field.is_repeated
    if field.message_type is not None:
        _set_extreme(draw, getattr(message, field.name).add() if repeated else getattr(message, field.name))
        return
    if field.type == FieldDescriptor.TYPE_BYTES:
        value = draw(st.sampled_from(_BYTES))
    else:
        value = draw(st.sampled_from(_EXTREMES[field.cpp_type]))
    if repeated:
        getattr(message, field.name).extend([value] * draw(st.sampled_from([1, 100, 1000])))
    else:
        setattr(message, field.name, value)


@st.composite
def extreme(draw: st.DrawFn, method: Rpc, seed: bytes) -> bytes:
    """The seed, parsed, with one to three fields set to extreme values, serialized again."""
    message = method.request.FromString(seed)
    for _ in range(draw(st.integers(1, 3))):
        _set_extreme(draw, message)
    return message.SerializeToString()


methods = st.sampled_from(DEVICE_RPCS)


def test_random_bytes_to_every_device_rpc_get_a_clean_status(target: Target) -> None:
    @FUZZ
    @given(method=methods, payloads=st.lists(st.binary(max_size=512), min_size=1, max_size=3))
    def attack(method: Rpc, payloads: list[bytes]) -> None:
        messages = payloads if method.client_streaming else payloads[:1]
        assert_clean(method, messages, target.send(method, messages))

    attack()
    assert_still_good(target)


def test_mutated_valid_requests_to_every_device_rpc_get_a_clean_status(target: Target) -> None:
    @FUZZ
    @given(method=methods, data=st.data())
    def attack(method: Rpc, data: st.DataObject) -> None:
        seed = target.seeds[method.path]
        index = data.draw(st.integers(0, len(seed) - 1), label="message")
        messages = list(seed)
        messages[index] = data.draw(mutated(seed[index]), label="mutated")
        assert_clean(method, messages, target.send(method, messages))

    attack()
    assert_still_good(target)


def test_valid_requests_with_extreme_field_values_get_a_clean_status(target: Target) -> None:
    @FUZZ
    @given(method=methods, data=st.data())
    def attack(method: Rpc, data: st.DataObject) -> None:
        seed = target.seeds[method.path]
        index = data.draw(st.integers(0, len(seed) - 1), label="message")
        messages = list(seed)
        messages[index] = data.draw(extreme(method, seed[index]), label="extreme")
        outcome = target.send(method, messages)
        assert outcome.code not in NEVER, f"{method} {method.request.FromString(messages[index])}: {outcome}"

    attack()
    assert_still_good(target)


def test_mutated_csr_on_the_open_enrollment_port_gets_a_clean_status(target: Target) -> None:
    """The enrollment port is open to anyone: the CSR's DER is mutated (not its base64, which would mostly
    stop at the PEM decoder) so the ASN.1, key and signature checks all get hostile input."""
    enroll = rpc(ENROLL_PATH)
    request = device_pb2.EnrollRequest.FromString(target.seeds[ENROLL_PATH][0])
    pem_lines = request.csr_pem.splitlines(keepends=True)
    der = base64.b64decode(b"".join(pem_lines[1:-1]))

    @FUZZ
    @given(bad_der=mutated(der))
    def attack(bad_der: bytes) -> None:
        attempt = device_pb2.EnrollRequest()
        attempt.CopyFrom(request)
        attempt.csr_pem = pem_lines[0] + base64.encodebytes(bad_der) + pem_lines[-1]
        outcome = target.send(enroll, [attempt.SerializeToString()])
        assert outcome.code not in NEVER, f"{bad_der.hex()}: {outcome}"

    attack()
    assert_still_good(target)


def test_undecodable_stream_message_is_invalid_argument(target: Target) -> None:
    """A request stream element that is not a protobuf is the caller's error, not the server's."""
    connect = rpc("/edgefleet.v1.DeviceService/Connect")
    outcome = target.send(connect, [target.seeds[connect.path][0], b"\xff\xff\xff"])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome


def test_undecodable_unary_request_is_invalid_argument(target: Target) -> None:
    for method in DEVICE_RPCS:
        if not method.client_streaming:
            outcome = target.send(method, [b"\xff\xff\xff"])
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {outcome}"
