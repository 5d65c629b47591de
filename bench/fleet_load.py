"""How does one fleet server process hold up under a simulated fleet of `--devices` devices (default 2,000)?

The fleet simulation of tests/test_load.py at a larger scale, printing figures instead of asserting. The
server runs in a subprocess (`server.app.serve` with the default ServerConfig, as `edgefleet server` runs
it), measured with psutil; the devices are simulated in this process: each one is really enrolled (Enroll
with a CSR of its own key over the enrollment port), has an mTLS channel (TCP + TLS connection) of its own
and a Connect control stream, and reconnects with the agent's jittered exponential `Backoff`.

Phases, one after the other:

    enroll      one token with N uses; Enroll per device, 16 at a time: devices/s.
    connect     every device opens its channel (TLS handshake, `channel_ready`), then its control stream
                (status first); until the server lists them all as connected: devices/s for each step.
    idle        the server's RSS / open fds / threads with no device connected, with N connections and with
                N control streams (after a settling pause): the memory each connection and stream costs.
    deploy      push an 8 MiB model (`build_large_mlp`) as `edgefleet model push` does, then CreateDeployment
                to all: the RPC's time and when the Assignment reached each stream (p50 / p99 / all).
    telemetry   `--telemetry-s` seconds in which every device reports at the agent's sustained rate
                (one report per 1 / telemetry_per_device_per_s s, closed loop) while one device floods
                (back to back, ignoring retry-after): accepted reports/s, the others' latency and refusals,
                the flooder's accepted/refused counts.
    restart     SIGTERM (the server's `grace_seconds`, default 5 s), start again on the same ports: how the
                server cut the streams, when each device was back (the server pushes the still-pending
                assignment on its new stream), busiest 100 ms and 1 s, tries per device, the new process's
                peak RSS while the fleet came back.

Everything runs on 127.0.0.1 and is bounded: N devices, fixed phase durations, a timeout on every wait
(the whole run is limited to `--budget-s`, default 170 s). The server process is stopped and every channel
closed on exit, whatever happens. The client (this process) shares the machine's cores with the server:
on 2 cores the figures are a floor, and the client's own event loop shows up in the latencies.

Run: .venv/bin/python bench/fleet_load.py [--devices 2000] [--telemetry-s 5] [--grace-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from edgefleet import signing
from server.app import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _simulation() -> ModuleType:
    """tests/test_load.py: the server process, the simulated devices and their enrollment."""
    spec = importlib.util.spec_from_file_location("fleet_sim", ROOT / "tests" / "test_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sim = _simulation()


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, phase: str, metric: str, value: str) -> None:
        self.rows.append((phase, metric, value))
        print(f"  {phase:<10} {metric:<44} {value}", file=sys.stderr, flush=True)

    def print(self) -> None:
        widths = [max(len(r[i]) for r in self.rows) for i in range(3)]
        line = "+".join("-" * (w + 2) for w in widths)
        print(f"\n+{line}+")
        for i, row in enumerate(self.rows):
            if i and row[0] != self.rows[i - 1][0]:
                print(f"+{line}+")
            print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        print(f"+{line}+")


def pct(values: list[float], q: float) -> float:
    return sim.percentile(values, q)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def usage_text(u: Any) -> str:
    return f"{u.rss / MIB:.0f} MiB RSS, {u.fds} fds, {u.threads} threads"


async def settle(server: Any, seconds: float = 2.0) -> Any:
    await asyncio.sleep(seconds)
    return server.usage()


async def run(args: argparse.Namespace, folder: Path, table: Table) -> None:
    n = args.devices
    keys = signing.init_keys(folder / "keys")
    model = sim.build_large_mlp(8 * MIB)
    config = ServerConfig()
    server = sim.ServerProcess(folder / "server", keys, grace_seconds=args.grace_s)
    devices: list[Any] = []
    try:
        await asyncio.to_thread(server.start)
        started = server.usage()
        table.add("server", "started, no device", usage_text(started))

        # ---- enroll ----
        t0 = time.monotonic()
        devices = await sim.enroll(server, n, prefix="bench")
        enroll_s = time.monotonic() - t0
        table.add(
            "enroll", f"{n} devices (Enroll + CSR, 16 at a time)", f"{enroll_s:.1f} s, {n / enroll_s:.0f}/s"
        )
        idle = await settle(server, 1)
        table.add("idle", "enrolled, no device connected", usage_text(idle))

        # ---- connections, then control streams ----
        t0 = time.monotonic()
        stubs = [d.stub for d in devices]  # opens each device's channel
        await asyncio.gather(*(d.channel.channel_ready() for d in devices))
        del stubs
        tls_s = time.monotonic() - t0
        table.add("connect", f"{n} TLS connections (channel_ready)", f"{tls_s:.1f} s, {n / tls_s:.0f}/s")
        connections = await settle(server)
        table.add("idle", f"{n} connections, no stream", usage_text(connections))
        stream_s = await sim.connect_all(devices, server, timeout=120)
        table.add(
            "connect", f"{n} control streams, status processed", f"{stream_s:.1f} s, {n / stream_s:.0f}/s"
        )
        streams = await settle(server)
        table.add("idle", f"{n} control streams", usage_text(streams))
        per_connection = (connections.rss - idle.rss) / n
        per_stream = (streams.rss - connections.rss) / n
        table.add(
            "idle",
            "memory per device: connection + stream",
            f"{per_connection / 1024:.0f} + {per_stream / 1024:.0f} = {(per_connection + per_stream) / 1024:.0f} KiB",
        )
        table.add("idle", "fds per device", f"{(streams.fds - idle.fds) / n:.2f}")
        table.add(
            "idle",
            f"{n} devices at {config.max_concurrent_rpcs} max_concurrent_rpcs",
            f"{n / config.max_concurrent_rpcs:.0%} of the RPC slots held by streams",
        )

        # ---- deployment fan-out ----
        t0 = time.monotonic()
        await asyncio.to_thread(server.push_model, model, "bench", "1")
        table.add(
            "deploy",
            f"push {len(model) / MIB:.0f} MiB model (upload, check, sign)",
            f"{time.monotonic() - t0:.1f} s",
        )
        async with sim.UsageSampler(server, 0.1) as sampler:
            t0 = time.monotonic()
            deployment = await server.deploy("bench", "1")
            rpc_s = time.monotonic() - t0
            await sim.wait_assigned(devices, deployment.id, t0, timeout=120)
        received = [d.first_assignment(deployment.id, t0) - t0 for d in devices]
        table.add(
            "deploy",
            "CreateDeployment RPC (targets, pushes)",
            f"{rpc_s:.2f} s ({deployment.devices_notified} notified)",
        )
        table.add(
            "deploy",
            f"Assignment on the stream, p50 / p99 / all {n}",
            f"{pct(received, 50):.2f} / {pct(received, 99):.2f} / {max(received):.2f} s",
        )
        table.add("deploy", "server peak during fan-out", usage_text(sampler.peak))

        # ---- telemetry ----
        await telemetry(server, devices, config, args.telemetry_s, table)

        # ---- restart ----
        await restart(server, devices, deployment.id, table)
    finally:
        await sim.close_all(devices)
        await server.close()


async def telemetry(
    server: Any, devices: list[Any], config: ServerConfig, seconds: float, table: Table
) -> None:
    """Every device but one reports at the sustained rate the server allows it; one floods."""
    flooder, others = devices[0], devices[1:]
    period = 1 / config.telemetry_per_device_per_s
    latencies: list[float] = []
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    flood: collections.Counter[grpc.StatusCode] = collections.Counter()
    end = time.monotonic() + seconds

    async def steady(device: Any, offset: float) -> None:
        await asyncio.sleep(offset)
        next_at = time.monotonic()
        while next_at < end:
            asked = time.monotonic()
            code = await device.report_telemetry(timeout=30)
            latencies.append(time.monotonic() - asked)
            codes[code] += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def flooding() -> None:
        while time.monotonic() < end:
            flood[await flooder.report_telemetry(timeout=30)] += 1

    async with sim.UsageSampler(server, 0.1) as sampler:
        t0 = time.monotonic()
        await asyncio.gather(flooding(), *(steady(d, i * period / len(others)) for i, d in enumerate(others)))
        took = time.monotonic() - t0
    accepted = codes[sim.OK] + flood[sim.OK]
    offered = len(others) * config.telemetry_per_device_per_s
    table.add(
        "telemetry",
        f"{len(others)} devices x {config.telemetry_per_device_per_s:g}/s for {seconds:g} s",
        f"offered {offered:.0f}/s",
    )
    table.add(
        "telemetry",
        "accepted reports/s (all devices)",
        f"{accepted / took:.0f}/s ({accepted} in {took:.1f} s)",
    )
    table.add(
        "telemetry",
        "well-behaved devices: latency p50 / p99 / max",
        f"{ms(pct(latencies, 50))} / {ms(pct(latencies, 99))} / {ms(max(latencies))}",
    )
    refused = {c.name: k for c, k in codes.items() if c != sim.OK}
    table.add("telemetry", "well-behaved devices: refused", str(refused or 0))
    table.add(
        "telemetry",
        "flooding device: accepted / refused",
        f"{flood[sim.OK]} / {sum(flood.values()) - flood[sim.OK]} ({dict((c.name, k) for c, k in flood.items())})",
    )
    table.add("telemetry", "server peak", usage_text(sampler.peak))


async def restart(server: Any, devices: list[Any], deployment_id: str, table: Table) -> None:
    n = len(devices)
    before = server.usage()
    stopped = time.monotonic()
    await asyncio.to_thread(server.stop)  # SIGTERM: in-flight calls get grace_seconds
    exited = time.monotonic()
    ready = await asyncio.to_thread(server.start)
    async with sim.UsageSampler(server, 0.1) as sampler:
        await sim.wait_assigned(devices, deployment_id, stopped, timeout=120)
        await server.wait_connected((d.id for d in devices), 0, timeout=60)
    after = server.usage()
    drops, backs, tries, first_retries = [], [], [], []
    codes: collections.Counter[str] = collections.Counter()
    for d in devices:
        ends = [(t, code) for t, code, _ in d.ends if t >= stopped]
        drop = ends[0][0]
        back = d.first_assignment(deployment_id, stopped)
        drops.append(drop - stopped)
        backs.append(back - ready)
        attempts = [t for t in d.attempts if drop < t <= back]
        tries.append(len(attempts))
        first_retries.append(attempts[0] - drop)
        codes.update(code.name for _, code in ends)
    table.add("restart", "before: server with the fleet", usage_text(before))
    table.add(
        "restart",
        "SIGTERM -> process exited",
        f"{exited - stopped:.2f} s (grace {server.config['grace_seconds']:g} s)",
    )
    table.add(
        "restart",
        f"{n} streams cut, after SIGTERM",
        f"{min(drops):.2f} .. {max(drops):.2f} s (spread {ms(max(drops) - min(drops))})",
    )
    table.add("restart", "SIGTERM -> new process ready", f"{ready - stopped:.2f} s")
    table.add("restart", "how the devices' tries ended", str(dict(codes)))
    table.add(
        "restart",
        "first retry after the cut, p10 / p90",
        f"{pct(first_retries, 10):.2f} / {pct(first_retries, 90):.2f} s",
    )
    table.add(
        "restart",
        "back after ready, p10 / p50 / p90 / max",
        f"{pct(backs, 10):.2f} / {pct(backs, 50):.2f} / {pct(backs, 90):.2f} / {max(backs):.2f} s",
    )
    table.add(
        "restart",
        "busiest 100 ms / 1 s of arrivals",
        f"{sim.busiest_window(backs, 0.1)} / {sim.busiest_window(backs, 1.0)} devices ({sim.busiest_window(backs, 1.0) / n:.0%} in 1 s)",
    )
    per_second = collections.Counter(math.floor(b) for b in backs)
    table.add(
        "restart",
        "arrivals per second after ready",
        " ".join(f"{per_second.get(s, 0)}" for s in range(0, math.floor(max(backs)) + 1)),
    )
    table.add("restart", "tries per device until back", str(dict(sorted(collections.Counter(tries).items()))))
    table.add("restart", "new server peak while the fleet came back", usage_text(sampler.peak))
    table.add("restart", "new server with the fleet back", usage_text(after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--telemetry-s", type=float, default=5.0)
    parser.add_argument("--grace-s", type=float, default=ServerConfig().grace_seconds)
    parser.add_argument("--budget-s", type=float, default=170.0, help="the whole run is stopped after this")
    args = parser.parse_args()
    limit = os.sysconf("SC_OPEN_MAX")
    if limit < args.devices + 200:
        sys.exit(f"the open-files limit ({limit}) is too low for {args.devices} devices: raise ulimit -n")
    table = Table()
    print(
        f"fleet_load: {args.devices} simulated devices, one server process, {os.cpu_count()} cores",
        flush=True,
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleet-load-") as folder:

        async def bounded() -> None:
            async with asyncio.timeout(args.budget_s):
                await run(args, Path(folder), table)

        try:
            asyncio.run(bounded())
        finally:
            table.add("total", "wall time", f"{time.monotonic() - t0:.0f} s")
            table.print()


if __name__ == "__main__":
    main()
