"""Assembles and runs the fleet server: config -> storage -> Fleet -> grpc.aio server.

Everything defaults to one data folder (`edgefleet-data/`): the SQLite database, the blob store and the
operator token. Configuration is parsed at the edge (the CLI) into a frozen `ServerConfig`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgefleet import signing
from edgefleet.errors import InvalidRequestError
from edgefleet.runtime import default_runtime
from edgefleet.v1 import device_pb2_grpc, operator_pb2_grpc
from server.auth import Authenticator, AuthInterceptor, load_or_create_operator_token
from server.fleet import Fleet
from server.limits import RateLimiter
from server.servicers import DeviceServicer, OperatorServicer
from server.storage import FilesystemBlobStore, open_store

log = logging.getLogger("edgefleet.server")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path("edgefleet-data")
    listen: str = "127.0.0.1:7443"
    database_url: str = ""  # "" = sqlite:///<data_dir>/fleet.db
    trust_root: Path = Path("edgefleet-keys/root.json")
    online_key: Path = Path("edgefleet-keys/online.key")
    validate_runtime: str = ""  # "" = the default runtime installed here
    max_model_bytes: int = 512 * 2**20
    max_message_bytes: int = 16 * 2**20  # uploads stream in chunks; this bounds one message (eval sets)
    max_concurrent_rpcs: int = 10_000
    grace_seconds: float = 5.0
    renew_interval_seconds: int = 3600
    telemetry_per_device_per_s: float = 2.0  # sustained; bursts of `telemetry_burst` are fine
    telemetry_burst: int = 20

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"


@dataclass
class RunningServer:
    server: grpc.aio.Server
    fleet: Fleet
    port: int
    operator_token: str
    scheduler: AsyncIOScheduler

    async def stop(self, grace: float = 5.0) -> None:
        self.scheduler.shutdown(wait=False)
        await self.server.stop(grace)
        self.fleet.store.close()


async def start_server(config: ServerConfig) -> RunningServer:
    """Opens storage, checks keys and starts serving. Raises EdgefleetError subclasses with what to fix."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    for path, what in ((config.trust_root, "root.json"), (config.online_key, "online key")):
        if not path.exists():
            raise InvalidRequestError(
                f"{what} not found at {path}: run `edgefleet keys init` first, or pass its path"
            )
    trust_root = config.trust_root.read_bytes()
    online = signing.OnlineRoles(trust_root, signing.load_signer(config.online_key))
    store = open_store(config.db_url)
    blobs = FilesystemBlobStore(config.data_dir / "blobs", max_bytes=config.max_model_bytes)
    fleet = Fleet(
        store, blobs, online, trust_root, config.validate_runtime or default_runtime(), config.max_model_bytes
    )
    await fleet.init_repository()
    await fleet.renew_online_metadata()

    operator_token = load_or_create_operator_token(config.data_dir / "operator.token")

    async def device_lookup(token: str) -> str | None:
        device = await fleet.device_for_token(token)
        return device.id if device else None

    authenticator = Authenticator(operator_token, device_lookup)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(authenticator)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_metadata_size", 16 * 1024),
            # Bursts of reconnecting devices must queue, not be cancelled.
            ("grpc.server.max_pending_requests", 10_000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    telemetry_limit = RateLimiter(config.telemetry_per_device_per_s, config.telemetry_burst)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(
        DeviceServicer(fleet, authenticator, telemetry_limit), server
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(OperatorServicer(fleet), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise InvalidRequestError(f"cannot listen on {config.listen}: is another server running there?")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    scheduler = AsyncIOScheduler()
    scheduler.add_job(fleet.renew_online_metadata, "interval", seconds=config.renew_interval_seconds)
    scheduler.start()
    log.info(
        "edgefleet server listening on %s (database %s)",
        config.listen.rsplit(":", 1)[0] + f":{port}",
        config.db_url.split("@")[-1],
    )
    return RunningServer(server, fleet, port, operator_token, scheduler)


async def serve(config: ServerConfig, ready_file: Path | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully (in-flight calls get `grace_seconds`)."""
    running = await start_server(config)
    if ready_file is not None:
        ready_file.write_text(str(running.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await running.stop(config.grace_seconds)
