"""What the agent observes and how it gets to the server: the device's capabilities, periodic telemetry
(health + inference histograms), and the `Outbox` that holds what waits to be sent.

    every telemetry_interval_s -> `Telemetry.collect` -> Outbox (bounded: the newest kept, drops counted)
    `Telemetry.send` -> ReportTelemetry, one report at a time; the server's retry hint is honoured
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.connection import RETRYABLE, Backoff, Connection
from edgefleet.agent.serving import LATENCY_BOUNDS_MS, Serving, VersionStats
from edgefleet.agent.state import now_ms
from edgefleet.convert import telemetry_to_proto
from edgefleet.runtime import runtime_version
from edgefleet.v1 import device_pb2
from edgefleet.values import Capabilities, HealthSample, InferenceStats, TelemetryReport

log = logging.getLogger("edgefleet.agent")

_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}")


class Outbox:
    """What waits to be sent. Events and status (control stream) are kept, bounded; telemetry (its own RPC)
    keeps the newest `telemetry_size` reports, dropping the oldest first and counting what it drops."""

    def __init__(self, telemetry_size: int, events_size: int = 1000):
        self.events: deque[device_pb2.DeviceMessage] = deque(maxlen=events_size)
        self.telemetry: deque[device_pb2.TelemetryReport] = deque(maxlen=telemetry_size)
        self.dropped = 0
        self._events_ready = asyncio.Event()
        self._telemetry_ready = asyncio.Event()

    def put_event(self, message: device_pb2.DeviceMessage, *, front: bool = False) -> None:
        """`front` puts back a message taken for a stream that ended before it could be sent."""
        if front:
            self.events.appendleft(message)
        else:
            self.events.append(message)
        self._events_ready.set()

    def put_telemetry(self, report: device_pb2.TelemetryReport, *, front: bool = False) -> None:
        """`front` puts back a report whose sending failed; when the queue is full it is the one dropped."""
        if len(self.telemetry) == self.telemetry.maxlen:
            self.dropped += 1
            if front:
                return
        if front:
            self.telemetry.appendleft(report)
        else:
            self.telemetry.append(report)
        self._telemetry_ready.set()

    async def get_event(self) -> device_pb2.DeviceMessage:
        while not self.events:
            self._events_ready.clear()
            await self._events_ready.wait()
        return self.events.popleft()

    async def get_telemetry(self) -> device_pb2.TelemetryReport:
        while not self.telemetry:
            self._telemetry_ready.clear()
            await self._telemetry_ready.wait()
        return self.telemetry.popleft()


def read_capabilities(config: AgentConfig, runtime: str, folder: Path) -> Capabilities:
    """What this device can run: discovered here, plus what whoever provisioned it declared in `config`."""
    memory = psutil.virtual_memory()
    return Capabilities(
        runtime=runtime,
        runtime_version=runtime_version(runtime),
        cpu_arch=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        memory_total_bytes=config.memory_available_override_bytes or memory.total,
        memory_available_bytes=config.memory_available_override_bytes or memory.available,
        disk_free_bytes=psutil.disk_usage(str(folder)).free,
        accelerators=tuple(config.accelerators),
        hardware_class=config.hardware_class,
        latency_budget_ms=config.latency_budget_ms,
        timezone=config.timezone or device_timezone(),
    )


def device_timezone(
    env: dict[str, str] | None = None,
    timezone_file: Path = Path("/etc/timezone"),
    localtime: Path = Path("/etc/localtime"),
) -> str:
    """The device's IANA time zone: TZ, else /etc/timezone (Debian), else the zone /etc/localtime links to;
    "" (UTC) when none says. Only names that look like a zone are reported (it goes into a signed-off
    schedule's evaluation, not a shell)."""
    tz = (os.environ if env is None else env).get("TZ", "").lstrip(":")
    if not tz:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            tz = timezone_file.read_text().strip()
    if not tz:
        with contextlib.suppress(OSError):
            link = os.readlink(localtime)
            tz = link.partition("zoneinfo/")[2]
    if tz.startswith("/"):  # TZ=/usr/share/zoneinfo/Europe/Berlin
        tz = tz.partition("zoneinfo/")[2]
    return tz if _ZONE.fullmatch(tz) and tz not in ("UTC", "Etc/UTC") else ""


class Telemetry:
    """Collects reports into the outbox and sends them; `connection` is set once the agent is connected."""

    def __init__(self, config: AgentConfig, serving: Serving, outbox: Outbox, folder: Path):
        self.config = config
        self.serving = serving
        self.outbox = outbox
        self.folder = folder
        self.connection: Connection | None = None

    async def send(self) -> None:
        """Sends queued reports one at a time; honours the server's retry hint when it is rate-limited."""
        assert self.connection is not None
        stub = self.connection.stub
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while True:
            report = await self.outbox.get_telemetry()
            report.dropped_reports = self.outbox.dropped
            try:
                await stub.ReportTelemetry(
                    device_pb2.ReportTelemetryRequest(report=report),
                    metadata=self.connection.metadata,
                    timeout=self.config.rpc_timeout_s,
                )
                self.outbox.dropped = 0
                backoff.reset()
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    log.warning("telemetry report refused: %s %s", e.code().name, e.details())
                    continue
                hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
                delay = int(hint) / 1000 if hint and str(hint).isdigit() else backoff.next()
            self.outbox.put_telemetry(report, front=True)
            await asyncio.sleep(min(delay, self.config.backoff_max_s))

    async def collect(self) -> None:
        memory = psutil.virtual_memory()
        health = HealthSample(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            disk_free_bytes=psutil.disk_usage(str(self.folder)).free,
            temperature_celsius=_temperature(),
            uptime_seconds=time.time() - psutil.boot_time(),
        )
        self.outbox.put_telemetry(telemetry_to_proto(TelemetryReport(now_ms(), health, self.inference())))

    def inference(self) -> tuple[InferenceStats, ...]:
        """Per model version since the last report: latency, output summary, worker counters; the shadow
        comparison goes inside the serving model's entry (there is one while a shadow runs, even idle)."""
        taken = self.serving.take_stats()
        shadow, serving = self.serving.shadow, self.serving.ref
        if shadow is not None and serving is not None:
            taken.setdefault(serving.target_path, VersionStats())
        return tuple(
            InferenceStats(
                target_path=target,
                count=stats.count,
                errors=stats.errors,
                latency_bounds_ms=LATENCY_BOUNDS_MS,
                latency_counts=tuple(stats.buckets),
                latency_sum_ms=stats.latency_sum_ms,
                latency_max_ms=stats.latency_max_ms,
                outputs=stats.outputs.summary(),
                shadow=shadow.take_stats()
                if shadow is not None and serving is not None and target == serving.target_path
                else None,
                worker_crashes=stats.worker_crashes,
                worker_restarts=stats.worker_restarts,
            )
            for target, stats in taken.items()
        )


def _temperature() -> float | None:
    sensors: Callable[[], dict[str, Any]] | None = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = [t.current for entries in sensors().values() for t in entries if t.current]
    except (OSError, RuntimeError):
        return None
    return max(readings) if readings else None
