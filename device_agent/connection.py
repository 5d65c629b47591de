"""The agent's link to the fleet server: enrollment at first start, then the one channel every call uses.

    first start: pin the fleet's root.json (and CA) -> a key pair here, a CSR to the enrollment port
                 (server-authenticated TLS) with the one-time token -> the device certificate, kept in tls/
    every start: the credentials on disk -> one mutual-TLS channel (plaintext only when configured so)

`Backoff` is the jittered exponential delay every retry loop of the agent waits with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgefleet import errors, pki
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.exits import ConfigCannotWorkError
from edgefleet.agent.state import StateStore
from edgefleet.device_trust import DeviceTrust
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger("edgefleet.agent")
PINNED_ROOT = "pinned-root.json"  # edgefleet.device_trust keeps the pinned root under this name

# Status codes worth retrying; anything else from the server is a refusal.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


def refused_as_revoked(exc: BaseException | None) -> bool:
    """Whether the server refused a call because this device is revoked (its distinct trailing metadata)."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return False
    return (pki.REFUSAL_METADATA, pki.REFUSAL_REVOKED) in tuple(exc.trailing_metadata() or ())


def describe_failure(exc: BaseException | None) -> str:
    """One line for why a call to the server failed: a status code and its detail, never a traceback."""
    if exc is None:
        return "the server ended the stream"
    if isinstance(exc, grpc.aio.AioRpcError):
        detail = (exc.details() or "").splitlines()[0][:200] if exc.details() else ""
        if exc.code() not in RETRYABLE:
            return f"refused: {exc.code().name} {detail}".rstrip()
        return f"{exc.code().name} {detail}".rstrip()
    return f"{type(exc).__name__}: {exc}"[:300]


class Backoff:
    """Jittered exponential backoff, so a fleet that lost its server does not reconnect in one stampede."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.current = initial, maximum, initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.5)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


@dataclass
class Connection:
    """The open channel to the server and who this device is on it."""

    device_id: str
    token: str  # only in plaintext demo mode; with TLS the client certificate is the credential
    channel: grpc.aio.Channel
    stub: device_pb2_grpc.DeviceServiceStub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def close(self) -> None:
        await self.channel.close()

    async def reopen(self, channel: grpc.aio.Channel, grace_s: float = 5.0) -> None:
        """Every later call goes over `channel` (new credentials); the old one closes after `grace_s`, which
        ends the control stream on it so that it reconnects over the new one."""
        old, self.channel = self.channel, channel
        self.stub = device_pb2_grpc.DeviceServiceStub(channel)
        await asyncio.sleep(grace_s)
        await old.close()


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_receive_message_length", 8 * 2**20),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


async def connect(
    config: AgentConfig,
    store: StateStore,
    trust: DeviceTrust,
    capabilities: Callable[[], common_pb2.Capabilities],
) -> Connection:
    """First start: pin the fleet's root.json (and CA), trade the enrollment token for credentials.
    Then open the one channel every later call uses: mutual TLS, or plaintext only when configured so.
    Raises InvalidRequestError for what the first start lacks, AccessDeniedError when enrollment is refused."""
    metadata_dir = store.folder / "metadata"
    creds = store.load_credentials()
    if config.reset_trust_root:
        reset_trust_root(metadata_dir, read_trust_root(config))
    elif not trust.is_pinned() or (creds is None and config.trust_root is not None):
        # Until enrollment succeeds the root given now is the one to pin: a start refused for the wrong root
        # is fixed by starting again with the right one.
        DeviceTrust.pin_root(metadata_dir, read_trust_root(config))
    tls = pki.TlsFiles(store.folder / "tls")
    if creds is None:
        creds = await _enroll(config, store, tls, capabilities())
    if config.insecure_plaintext:
        channel = open_channel(config.server, None)
    else:
        tls.finish_replacement()  # a certificate renewal a crash interrupted
        if not tls.exists():
            raise errors.InvalidRequestError(f"{tls.folder} lacks the device's certificate: enroll again")
        channel = mutual_tls_channel(config, tls)
    return Connection(
        creds["device_id"], creds.get("device_token", ""), channel, device_pb2_grpc.DeviceServiceStub(channel)
    )


def mutual_tls_channel(config: AgentConfig, tls: pki.TlsFiles) -> grpc.aio.Channel:
    """A channel to the server authenticated with the device's key and certificate as they are on disk."""
    return open_channel(
        config.server,
        grpc.ssl_channel_credentials(
            root_certificates=tls.ca.read_bytes(),
            private_key=tls.key.read_bytes(),
            certificate_chain=tls.cert.read_bytes(),
        ),
    )


def read_trust_root(config: AgentConfig) -> bytes:
    """The root.json given with --trust-root. Raises ConfigCannotWorkError (one line) when it is not given or
    cannot be read: no restart can fix that."""
    if config.trust_root is None:
        raise ConfigCannotWorkError("first start needs --trust-root (the fleet's root.json)")
    try:
        return Path(config.trust_root).read_bytes()
    except OSError as e:
        raise ConfigCannotWorkError(
            f"cannot read the trust root {config.trust_root}: {e.strerror or e}"
        ) from e


def reset_trust_root(metadata_dir: Path, trust_root: bytes) -> None:
    """Re-pins: `trust_root` replaces the pinned root.json and every cached metadata file goes, so the next
    update starts python-tuf's chain of trust from the new root (--reset-trust-root)."""
    DeviceTrust.pin_root(metadata_dir, trust_root)  # checks it first: a bad file leaves the old trust alone
    for cached in metadata_dir.glob("*.json"):
        if cached.name != PINNED_ROOT:
            cached.unlink()
    shutil.rmtree(metadata_dir / "root_history", ignore_errors=True)  # the old chain of roots goes too
    log.warning("re-pinned the trust root (sha256 %s) and cleared the metadata cache", _sha256(trust_root))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _enroll(
    config: AgentConfig, store: StateStore, tls: pki.TlsFiles, capabilities: common_pb2.Capabilities
) -> dict[str, str]:
    if not config.enroll_token:
        raise errors.InvalidRequestError("first start needs --enroll-token (from `edgefleet token create`)")
    key = pki.new_key()
    request = device_pb2.EnrollRequest(
        enrollment_token=config.enroll_token,
        device_name=config.name,
        capabilities=capabilities,
        # The server refuses a root that is not its own before spending the token.
        trust_root_sha256=_sha256((store.folder / "metadata" / PINNED_ROOT).read_bytes()),
    )
    if config.insecure_plaintext:
        channel = open_channel(config.server, None)
    else:
        if config.ca_cert is None:
            raise errors.InvalidRequestError(
                "first start needs --ca-cert (the fleet CA, from the server's ca/)"
            )
        try:
            ca_pem = Path(config.ca_cert).read_bytes()
        except OSError as e:
            raise ConfigCannotWorkError(
                f"cannot read the CA certificate {config.ca_cert}: {e.strerror}"
            ) from e
        request.csr_pem = pki.make_csr(key, config.name)
        channel = open_channel(config.enroll_address, grpc.ssl_channel_credentials(ca_pem))
    address = config.server if config.insecure_plaintext else config.enroll_address
    log.info("enrolling as %r at %s (then connecting to %s)", config.name, address, config.server)
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    try:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        while True:
            try:
                reply = await stub.Enroll(request, timeout=config.rpc_timeout_s)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise errors.AccessDeniedError(f"enrollment refused: {e.details()}") from e
                delay = backoff.next()
                log.warning(
                    "enrollment at %s failed (%s); retrying in %.1f s", address, describe_failure(e), delay
                )
                await asyncio.sleep(delay)
    finally:
        await channel.close()
    if not config.insecure_plaintext:
        # Trust stays with the CA we were provisioned with; the reply's copy is not believed.
        tls.write(key, pki.x509.load_pem_x509_certificate(reply.certificate_pem), pki.load_cert(ca_pem))
    creds = {"device_id": reply.device_id, "group": reply.group}
    if reply.device_token:
        creds["device_token"] = reply.device_token
    store.save_credentials(creds)
    log.info("enrolled as %s in group %s", reply.device_id, reply.group)
    return creds
