"""Assembles and runs the fleet server: config -> storage -> Fleet (the logic) -> servicers -> grpc.aio server.

Everything defaults to one data folder (`edgefleet-data/`): the SQLite database, the blob store and the
operator token. Configuration is parsed at the edge (the CLI) into a frozen `ServerConfig`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import logging
import resource
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgefleet import pki, signing
from edgefleet.durable import write_atomic
from edgefleet.errors import ConflictError, InvalidRequestError
from edgefleet.process_lock import LockHeldError, ProcessLock
from edgefleet.runtime import default_runtime
from edgefleet.server.auth import (
    Authenticator,
    AuthInterceptor,
    build_policy,
    enrollment_policy,
    load_or_create_operator_token,
)
from edgefleet.server.device_service import DeviceLimits, DeviceServicer
from edgefleet.server.fleet import Fleet
from edgefleet.server.limits import RateLimiter
from edgefleet.server.operator_service import OperatorServicer
from edgefleet.server.rollout_service import RolloutServicer
from edgefleet.server.storage import open_store
from edgefleet.server.storage.blobs import FilesystemBlobStore
from edgefleet.v1 import device_pb2_grpc, operator_pb2_grpc, rollout_pb2_grpc

log = logging.getLogger("edgefleet.server")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path("edgefleet-data")
    listen: str = "127.0.0.1:7443"  # devices and operators, mutual TLS
    enroll_listen: str = "127.0.0.1:7444"  # Enroll only, server-authenticated TLS (devices have no cert yet)
    reuse_port: bool = (
        False  # SO_REUSEPORT: off, so a second server on the same port fails instead of sharing
    )
    insecure_plaintext: bool = False  # a local demo without TLS: bearer tokens, one port, never in the field
    tls_names: tuple[str, ...] = ()  # extra DNS names / IPs for the server certificate
    device_cert_days: float = 365
    database_url: str = ""  # "" = sqlite:///<data_dir>/fleet.db
    trust_root: Path = Path("edgefleet-keys/root.json")
    online_key: Path = Path("edgefleet-keys/online.key")
    validate_runtime: str = ""  # "" = the default runtime installed here
    max_model_bytes: int = 512 * 2**20
    max_message_bytes: int = 16 * 2**20  # uploads stream in chunks; this bounds one message (eval sets)
    max_connected_devices: int = 50_000  # control streams; more devices are told to retry later
    rpc_headroom: int = 10_000  # calls beyond the control streams (downloads, operators, health)
    grace_seconds: float = 5.0
    renew_interval_seconds: int = 3600
    telemetry_per_device_per_s: float = 0.5  # sustained (the agent sends one per 10 s by default)
    telemetry_burst: int = 10
    rollout_tick_seconds: float = 1.0  # how often the rollout engine looks at every running rollout

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"


@dataclass
class RunningServer:
    servers: list[grpc.aio.Server]
    fleet: Fleet
    port: int
    enroll_port: int
    operator_token: str
    scheduler: AsyncIOScheduler
    health: health.aio.HealthServicer
    lock: ProcessLock | None = None

    async def stop(self, grace: float = 5.0) -> None:
        # NOT_SERVING first, so load balancers and health checks move devices elsewhere before the cut.
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.scheduler.shutdown(wait=False)
        await self.fleet.rollout_engine.stop()
        await asyncio.gather(*(server.stop(grace) for server in self.servers))
        self.fleet.store.close()
        if self.lock is not None:
            self.lock.release()


_SERVER_OPTIONS = [
    ("grpc.max_metadata_size", 16 * 1024),
    # Bursts of reconnecting devices must queue, not be cancelled.
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 32),  # per connection: one device cannot open thousands of calls
]


def tls_material(config: ServerConfig) -> tuple[pki.CertificateAuthority, pki.TlsFiles]:
    """The fleet CA, the server's certificate and the operator's client certificate, created on first start
    under the data folder: ca/, tls/ and operator/ (copy operator/ to where the CLI runs)."""
    ca = pki.CertificateAuthority.load_or_create(config.data_dir / "ca")
    server_files = pki.TlsFiles(config.data_dir / "tls")
    if not server_files.exists():
        key = pki.new_key()
        names = ("localhost", socket.gethostname(), *config.tls_names)
        dns = tuple(n for n in names if not _is_ip(n))
        ips = ("127.0.0.1", "::1", *(n for n in names if _is_ip(n)))
        server_files.write(
            key,
            ca.issue(key.public_key(), "edgefleet-server", pki.SERVER, days=825, dns_names=dns, ips=ips),
            ca.cert,
        )
    operator_files = pki.TlsFiles(config.data_dir / "operator")
    if not operator_files.exists():
        key = pki.new_key()
        operator_files.write(key, ca.issue(key.public_key(), "operator", pki.OPERATOR, days=365), ca.cert)
    return ca, server_files


def _raise_fd_limit() -> None:
    """Every connected device holds a socket: use all the descriptors the system allows this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str
) -> int:
    """The port bound. Raises ConflictError saying which address could not be had (grpc reports it as 0 or a
    RuntimeError, depending on its version)."""
    try:
        port = int(
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConflictError(
            f"cannot listen{what} on {address}: the port is in use (another server?) or the address is "
            "not this machine's"
        )
    return port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


async def start_server(config: ServerConfig) -> RunningServer:
    """Opens storage, checks keys and starts serving. Raises EdgefleetError subclasses with what to fix."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(config.data_dir)
    try:
        running = await _start(config)
    except BaseException:
        lock.release()
        raise
    running.lock = lock
    return running


def _lock_data_dir(data_dir: Path) -> ProcessLock:
    """One server per data folder: two would share one database and blob store behind each other's back.
    Raises ConflictError naming the running server's pid."""
    try:
        return ProcessLock(data_dir / "server.lock").acquire()
    except LockHeldError as e:
        holder = f" (pid {e.pid})" if e.pid else ""
        raise ConflictError(
            f"another edgefleet server{holder} already uses the data folder {data_dir}; stop it first"
        ) from e


# What the server's extra installs that is imported only when first needed (a push that compresses):
# checked at start so a partial install fails now, saying how to fix it, not at the first push.
_LAZY_EXTRAS = {"ai_edge_quantizer": "ai-edge-quantizer", "flatbuffers": "flatbuffers", "psutil": "psutil"}


def check_server_extras() -> None:
    """Raises InvalidRequestError naming what is missing and the command that installs it."""
    missing = [dist for module, dist in _LAZY_EXTRAS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise InvalidRequestError(
            f"the server's dependencies are not all installed (missing: {', '.join(missing)}): "
            'pip install "edgefleet[server]"'
        )


async def _start(config: ServerConfig) -> RunningServer:
    check_server_extras()
    _raise_fd_limit()
    for path, what in ((config.trust_root, "root.json"), (config.online_key, "online key")):
        if not path.exists():
            raise InvalidRequestError(
                f"{what} not found at {path}: run `edgefleet keys init` first, or pass its path"
            )
    trust_root = config.trust_root.read_bytes()
    online = signing.OnlineRoles(trust_root, signing.load_signer(config.online_key))
    ca, server_files = (None, None) if config.insecure_plaintext else tls_material(config)
    store = open_store(config.db_url)
    blobs = FilesystemBlobStore(config.data_dir / "blobs", max_bytes=config.max_model_bytes)
    fleet = Fleet(
        store,
        blobs,
        online,
        trust_root,
        config.validate_runtime or default_runtime(),
        config.max_model_bytes,
        ca=ca,
        device_cert_days=config.device_cert_days,
        rollout_tick_s=config.rollout_tick_seconds,
    )
    await fleet.repository.init_repository()
    await fleet.repository.renew_online_metadata()

    operator_token = load_or_create_operator_token(config.data_dir / "operator.token")
    authenticator = Authenticator(
        tls=not config.insecure_plaintext,
        operator_token=operator_token,
        device_status=fleet.devices.device_status,
    )
    telemetry_limit = RateLimiter(config.telemetry_per_device_per_s, config.telemetry_burst)
    device_servicer = DeviceServicer(
        fleet,
        authenticator,
        telemetry_limit,
        DeviceLimits(max_connected_devices=config.max_connected_devices),
    )
    message_limits = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]

    def new_server(policy: dict[str, str], limits: list[tuple[str, int]], *closed: str) -> grpc.aio.Server:
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator, policy, *closed)],
            # Control streams hold a slot each: leave room for everything else above them.
            maximum_concurrent_rpcs=config.max_connected_devices + config.rpc_headroom,
            options=[*_SERVER_OPTIONS, ("grpc.so_reuseport", int(config.reuse_port)), *limits],
        )
        device_pb2_grpc.add_DeviceServiceServicer_to_server(device_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        return server

    health_servicer = health.aio.HealthServicer()
    main = new_server(build_policy(), message_limits)
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(
        OperatorServicer(fleet, authenticator.forget, authenticator.principal), main
    )
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(fleet, authenticator), main)
    servers = [main]
    enroll_port = 0
    if config.insecure_plaintext:
        port = _bind(main, config.listen, None, "")
        log.warning(
            "PLAINTEXT: this server is running WITHOUT TLS as a local demo (--insecure-plaintext). Anyone on the "
            "network can read and forge its traffic. Never run it like this in the field."
        )
    else:
        assert server_files is not None
        key_cert = [(server_files.key.read_bytes(), server_files.cert.read_bytes())]
        ca_pem = server_files.ca.read_bytes()
        port = _bind(
            main,
            config.listen,
            grpc.ssl_server_credentials(key_cert, root_certificates=ca_pem, require_client_auth=True),
            "",
        )
        # Devices without a certificate yet reach only Enroll, on a port of its own with small messages.
        enroller = new_server(
            enrollment_policy(),
            [("grpc.max_receive_message_length", 64 * 1024)],
            # An agent given this port as --server: say where it should connect instead.
            "this is the server's enrollment port, which serves only Enroll: give the agent the main port as "
            "--server (7443 by default; the enrollment port is the next one)",
        )
        enroll_port = _bind(
            enroller, config.enroll_listen, grpc.ssl_server_credentials(key_cert), " for enrollment"
        )
        servers.append(enroller)
    for server in servers:
        await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await fleet.rollout_engine.start()  # resumes every rollout where the database says it was

    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        fleet.repository.renew_online_metadata, "interval", seconds=config.renew_interval_seconds
    )
    scheduler.start()
    host = config.listen.rsplit(":", 1)[0]
    log.info(
        "edgefleet server on %s:%d%s (database %s)",
        host,
        port,
        f", enrollment on {host}:{enroll_port}" if enroll_port else "",
        config.db_url.split("@")[-1],
    )
    return RunningServer(servers, fleet, port, enroll_port, operator_token, scheduler, health_servicer)


async def serve(config: ServerConfig, ready_file: Path | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully (in-flight calls get `grace_seconds`)."""
    running = await start_server(config)
    if ready_file is not None:
        write_atomic(
            ready_file, json.dumps({"port": running.port, "enroll_port": running.enroll_port}).encode()
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await running.stop(config.grace_seconds)
