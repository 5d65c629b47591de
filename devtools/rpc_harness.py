"""A real fleet server in this process, for tests that speak gRPC to it the way devices and operators do.

    harness = await Harness.start(tmp_path)        # edgefleet.devtools.inprocess: 127.0.0.1:0, fresh keys
    harness.operator                               # grpc.aio channel with the operator's mTLS certificate
    device = await harness.enroll("cam-1")         # token -> Enroll over the enrollment port -> mTLS channel
    outcome = await call(device.channel, rpc)      # any RPC by its descriptor, raw bytes in and out
    harness.mint("dev-x", "device", days=1, ...)   # certificates for attacks: expired, foreign CA, odd role
    await harness.close()

`ServerThread` runs the same harness on an event loop of its own thread, for synchronous callers (hypothesis
drives plain functions; they use blocking grpc channels against it).

Every RPC is reachable generically: `rpcs()` walks the service descriptors, so a new RPC is covered by any test
that iterates them, and `call` / `call_sync` send raw serialized bytes (what a hostile client can send).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet import pki, signing
from edgefleet.devtools.inprocess import InProcessServer
from edgefleet.devtools.raw_rpc import CAPABILITIES
from edgefleet.server.app import RunningServer
from edgefleet.server.repository import target_path
from edgefleet.server.storage.records import ModelRecord, now_ms
from edgefleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

T = TypeVar("T")

# ---- credentials -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A client's TLS identity (PEM); `cert_pem=b""` is a client without a certificate."""

    key_pem: bytes = b""
    cert_pem: bytes = b""

    def for_channel(self, ca_pem: bytes) -> grpc.ChannelCredentials:
        if not self.cert_pem:
            return grpc.ssl_channel_credentials(ca_pem)
        return grpc.ssl_channel_credentials(ca_pem, self.key_pem, self.cert_pem)


NO_CERTIFICATE = Credential()


def issue_certificate(
    authority: pki.CertificateAuthority,
    common_name: str,
    role: str,
    *,
    days: float = 1,
    not_before: datetime.datetime | None = None,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Credential:
    """Like `CertificateAuthority.issue` but with any role ("" = no role at all) and any key usage, so a test
    can hand the server a certificate that passes the TLS handshake and still names no valid principal."""
    key = pki.new_key()
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if role:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    return Credential(pki.key_pem(key), pki.cert_pem(cert))


def credential_for(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Credential:
    return Credential(pki.key_pem(key), pki.cert_pem(cert))


# ---- the harness -----------------------------------------------------------------------------------------


@dataclass
class Device:
    id: str
    name: str
    group: str
    credential: Credential
    channel: grpc.aio.Channel

    @property
    def stub(self) -> device_pb2_grpc.DeviceServiceStub:
        return device_pb2_grpc.DeviceServiceStub(self.channel)


class Harness(InProcessServer):
    """The in-process server (edgefleet.devtools.inprocess) with its CA, and the channels opened to it (closed
    by `close`)."""

    def __init__(self, folder: Path, running: RunningServer, keys: signing.KeyFiles):
        super().__init__(folder, running, keys)
        self.ca = pki.CertificateAuthority.load_or_create(self.data_dir / "ca")
        self.ca_pem = pki.cert_pem(self.ca.cert)
        operator_files = pki.TlsFiles(self.data_dir / "operator")
        self.operator_credential = Credential(
            operator_files.key.read_bytes(), operator_files.cert.read_bytes()
        )
        self._channels: list[grpc.aio.Channel] = []
        self.operator = self.channel(self.operator_credential)
        self.operator_stub = operator_pb2_grpc.OperatorServiceStub(self.operator)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        await super().close()

    # ---- channels ------------------------------------------------------------------------------------

    def channel(
        self,
        credential: Credential = NO_CERTIFICATE,
        *,
        enroll_port: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.aio.Channel:
        """An aio TLS channel that trusts the fleet CA and presents `credential` (closed by `close`)."""
        channel = grpc.aio.secure_channel(
            self.enroll_address if enroll_port else self.address,
            credential.for_channel(self.ca_pem),
            options=list(options),
        )
        self._channels.append(channel)
        return channel

    def sync_channel(
        self,
        credential: Credential = NO_CERTIFICATE,
        *,
        enroll_port: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.Channel:
        """A blocking channel (the caller closes it); for code that is not on the server's loop."""
        return grpc.secure_channel(
            self.enroll_address if enroll_port else self.address,
            credential.for_channel(self.ca_pem),
            options=list(options),
        )

    # ---- certificates --------------------------------------------------------------------------------

    def mint(
        self,
        common_name: str,
        role: str,
        *,
        days: float = 1,
        not_before: datetime.datetime | None = None,
        authority: pki.CertificateAuthority | None = None,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    ) -> Credential:
        """A client certificate issued by the fleet CA (or `authority`) with any role and validity."""
        return issue_certificate(
            authority or self.ca, common_name, role, days=days, not_before=not_before, usage=usage
        )

    def expired(self, device_id: str) -> Credential:
        """A device certificate from the real CA that expired about two years ago."""
        key = pki.new_key()
        two_years_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=730)
        cert = self.ca.issue(key.public_key(), device_id, pki.DEVICE, days=1, not_before=two_years_ago)
        return credential_for(key, cert)

    @staticmethod
    def from_another_ca(common_name: str, role: str) -> Credential:
        """A certificate with the right shape from a CA this fleet does not trust."""
        intruder = pki.CertificateAuthority.create("edgefleet fleet CA")  # same name, other key
        key = pki.new_key()
        return credential_for(key, intruder.issue(key.public_key(), common_name, role, days=30))

    # ---- operator and devices ------------------------------------------------------------------------

    async def create_token(self, group: str = "default", uses: int = 1) -> str:
        reply = await self.operator_stub.CreateEnrollmentToken(
            operator_pb2.CreateEnrollmentTokenRequest(group=group, uses=uses), timeout=10
        )
        return reply.token

    def enrollment_request(self, name: str, token: str, key: ec.EllipticCurvePrivateKey) -> Any:
        return device_pb2.EnrollRequest(
            enrollment_token=token,
            device_name=name,
            capabilities=CAPABILITIES,
            csr_pem=pki.make_csr(key, name),
        )

    async def enroll(self, name: str, *, group: str = "default", token: str = "") -> Device:
        """Enrolls for real: a token from the operator, Enroll with a CSR over the enrollment port (no client
        certificate, server-authenticated TLS), then an mTLS channel with the certificate it returned."""
        token = token or await self.create_token(group)
        key = pki.new_key()
        enroller = self.channel(enroll_port=True)
        reply = await device_pb2_grpc.DeviceServiceStub(enroller).Enroll(
            self.enrollment_request(name, token, key), timeout=10
        )
        credential = Credential(pki.key_pem(key), reply.certificate_pem)
        assert reply.ca_certificate_pem == self.ca_pem
        return Device(reply.device_id, name, reply.group, credential, self.channel(credential))

    async def enroll_devices(self, count: int, prefix: str = "dev", group: str = "default") -> list[Device]:
        token = await self.create_token(group, uses=count)
        return [await self.enroll(f"{prefix}-{i}", group=group, token=token) for i in range(count)]

    async def publish_model(self, name: str, version: str, content: bytes = b"") -> ModelRecord:
        """A servable model file in the store, marked signed, without the upload/validate/sign path (that
        has tests of its own; here only the RPC surface around it matters). Returns its record."""
        content = content or f"not a real model: {name} {version}".encode() * 64
        fleet = self.fleet

        def put() -> ModelRecord:
            sha = fleet.blobs.put_bytes(content)
            record = ModelRecord(
                target_path(name, version),
                name,
                version,
                "float32",
                sha,
                len(content),
                {"inputs": [], "outputs": []},
                now_ms(),
                details={"wire_bytes": len(content), "wire_sha256": sha, "wire_encoding": "identity"},
            )
            fleet.store.add_model(record)
            fleet.store.mark_signed([record.target_path])
            record.signed = True
            return record

        return await asyncio.to_thread(put)

    # ---- what the server holds -----------------------------------------------------------------------

    def _rows(self) -> dict[str, list[tuple[Any, ...]]]:
        engine = self.fleet.store.engine  # type: ignore[attr-defined]
        tables = sa.MetaData()
        tables.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted((tuple(map(repr, row)) for row in conn.execute(sa.select(table))), key=repr)
                for name, table in tables.tables.items()
            }

    async def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of the fleet's store (to show that nothing was written)."""
        return await asyncio.to_thread(self._rows)

    @contextlib.contextmanager
    def fleet_calls(self) -> Iterator[list[str]]:
        """Records which methods of the fleet's parts (repository, deployments, devices, control streams)
        the handlers call meanwhile: every handler that does anything goes through them, so an empty list
        means no handler ran. (The authentication gate looks devices up through a reference it took at
        start-up, so it does not show here.)"""
        calls: list[str] = []
        patched = []
        for part in self.fleet.parts:
            for name in dir(type(part)):
                if name.startswith("_") or not callable(getattr(type(part), name)):
                    continue
                label = f"{type(part).__name__}.{name}"
                setattr(part, name, _spy(calls, label, getattr(part, name)))
                patched.append((part, name))
        try:
            yield calls
        finally:
            for part, name in patched:
                delattr(part, name)

    async def healthy(self, *, enroll_port: bool = False) -> bool:
        """Health Check answers SERVING (on the main port with the operator certificate)."""
        channel = self.channel(
            NO_CERTIFICATE if enroll_port else self.operator_credential, enroll_port=enroll_port
        )
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _spy(calls: list[str], name: str, original: Any) -> Any:
    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(*args, **kwargs)

    return spy


@contextlib.asynccontextmanager
async def running_harness(folder: Path, **config: Any) -> AsyncIterator[Harness]:
    harness = await Harness.start(folder, **config)
    try:
        yield harness
    finally:
        await harness.close()


class ServerThread:
    """A Harness on an event loop in a thread of its own, for synchronous tests (hypothesis): `run(coro)`
    runs a coroutine there (e.g. `run(harness.enroll("x"))`), `harness.sync_channel(...)` talks to it."""

    def __init__(self, folder: Path, **config: Any):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="edgefleet-test-server", daemon=True
        )
        self.thread.start()
        self.harness: Harness = self.run(Harness.start(folder, **config))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.harness.close())
            self.run(self.loop.shutdown_asyncgens())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()
