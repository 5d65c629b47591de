"""How does one fleet server process hold up under a simulated fleet of `--devices` devices (default 2,000)?

The fleet simulation of tests/load/test_load.py at a larger scale, printing figures instead of asserting. The
server runs in a subprocess (edgefleet.devtools.serverprocess: `server.app.serve` with the default
ServerConfig, as `edgefleet server` runs it), measured with psutil; the devices are simulated in this
process (edgefleet.devtools.simdevices): each one is really enrolled (Enroll
with a CSR of its own key over the enrollment port), has an mTLS channel (TCP + TLS connection) of its own
and a Connect control stream, and reconnects with the agent's jittered exponential `Backoff`.

Phases, one after the other (server CPU is given as a share of one core; Python serves on one):

    enroll      one token with N uses; Enroll per device, 16 at a time: devices/s.
    connect     every device opens its channel (TLS handshake, `channel_ready`), then its control stream
                (status first); until the server lists them all as connected: devices/s for each step.
    idle        the server's RSS / open fds / threads with no device connected, with N connections and with
                N control streams (after a settling pause): what each connection and stream costs.
    deploy      push an 8 MiB model (`build_large_mlp`) as `edgefleet model push` does, then CreateDeployment
                to all: the RPC's time and when the Assignment reached each stream (p50 / p99 / all).
    telemetry   every device but one reports at the agent's default rate (1 / telemetry_interval_s, for one
                interval), closed loop; then the same while one device floods (16 calls in flight, ignoring
                retry-after); then at the most the server's per-device limit allows (telemetry_per_device_per_s,
                for `--telemetry-s`) with the flood: reports/s accepted, the others' latency and refusals,
                what the flooder got through.
    download    100 devices open DownloadModel on the model, read one chunk and then nothing (no BDP probing:
                a 64 KiB window); the server's memory and fds per stuck call; 20 full downloads meanwhile.
    restart     SIGTERM (the server's `grace_seconds`, default 5 s), start again on the same ports: how the
                server cut the streams, each device's tries, when the new server processed each status
                (its `last_seen`) and when the assignment (still pending: the simulated devices never install
                it) reached the new stream; busiest 100 ms and 1 s; the new process's peak while the fleet
                came back; this process's longest event-loop stall (the simulation's own noise).

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
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from edgefleet import signing
from edgefleet.agent.config import AgentConfig
from edgefleet.devtools import fleetstats, simdevices
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.devtools.serverprocess import MIB, ServerProcess, UsageSampler
from edgefleet.server.app import ServerConfig
from edgefleet.v1 import device_pb2

OK = grpc.StatusCode.OK


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
    return fleetstats.percentile(values, q)


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
    # --quick: a 1 MiB model and a fifth of every settling pause; its figures only show the bench still runs.
    model = build_large_mlp((1 if args.quick else 8) * MIB)
    pause = 0.2 if args.quick else 1.0
    config = ServerConfig()
    server = ServerProcess(folder / "server", keys, grace_seconds=args.grace_s)
    devices: list[Any] = []
    try:
        await asyncio.to_thread(server.start)
        table.add("server", "started, no device", usage_text(server.usage()))

        # ---- enroll ----
        before, t0 = server.usage(), time.monotonic()
        devices = await simdevices.enroll(server, n, prefix="bench")
        took = time.monotonic() - t0
        table.add(
            "enroll",
            f"{n} devices (Enroll + CSR, 16 at a time)",
            f"{took:.1f} s, {n / took:.0f}/s (server CPU {cpu(before, server.usage(), took)})",
        )
        idle = await settle(server, pause)
        table.add("idle", "enrolled, no device connected", usage_text(idle))

        # ---- connections, then control streams ----
        before, t0 = server.usage(), time.monotonic()
        stubs = [d.stub for d in devices]  # opens each device's channel
        await asyncio.gather(*(d.channel.channel_ready() for d in devices))
        took = time.monotonic() - t0
        del stubs
        table.add(
            "connect",
            f"{n} mTLS connections (channel_ready)",
            f"{took:.1f} s, {n / took:.0f}/s (server CPU {cpu(before, server.usage(), took)})",
        )
        connections = await settle(server, 2 * pause)
        before = connections
        took = await simdevices.connect_all(devices, server, timeout=120)
        table.add(
            "connect",
            f"{n} control streams, status processed",
            f"{took:.1f} s, {n / took:.0f}/s (server CPU {cpu(before, server.usage(), took)})",
        )
        streams = await settle(server, 2 * pause)
        table.add("idle", f"{n} connections, no stream", usage_text(connections))
        table.add("idle", f"{n} control streams", usage_text(streams))
        per_connection = (connections.rss - idle.rss) / n
        per_stream = (streams.rss - connections.rss) / n
        table.add(
            "idle",
            "memory per device: connection + stream",
            f"{per_connection / 1024:.0f} + {per_stream / 1024:.0f} = {(per_connection + per_stream) / 1024:.0f} KiB",
        )
        table.add("idle", "fds per device", f"{(streams.fds - idle.fds) / n:.2f}")
        table.add("idle", "threads with no device / with all", f"{idle.threads} / {streams.threads}")
        quiet = await settle(server, 3 * pause)
        table.add("idle", f"server CPU with {n} idle streams", cpu(streams, quiet, 3 * pause))
        table.add(
            "idle",
            f"RPC slots ({config.max_connected_devices} devices + {config.rpc_headroom} headroom)",
            f"{n / (config.max_connected_devices + config.rpc_headroom):.0%} held by the control streams alone",
        )

        # ---- deployment fan-out ----
        t0 = time.monotonic()
        path = await asyncio.to_thread(server.push_model, model, "bench", "1")
        table.add(
            "deploy",
            f"push {len(model) / MIB:.0f} MiB model (upload, check, sign)",
            f"{time.monotonic() - t0:.1f} s",
        )
        async with UsageSampler(server, 0.1) as sampler:
            t0 = time.monotonic()
            deployment = await server.deploy("bench", "1")
            rpc_s = time.monotonic() - t0
            await simdevices.wait_assigned(devices, deployment.id, t0, timeout=120)
        received = [d.first_assignment(deployment.id, t0) - t0 for d in devices]
        table.add(
            "deploy",
            "CreateDeployment RPC (choose targets, push)",
            f"{rpc_s:.2f} s, {deployment.devices_notified} notified ({rpc_s / n * 1000:.2f} ms per device)",
        )
        table.add(
            "deploy",
            f"Assignment on the stream, p50 / p99 / all {n}",
            f"{pct(received, 50):.2f} / {pct(received, 99):.2f} / {max(received):.2f} s",
        )
        table.add("deploy", "server peak during fan-out", usage_text(sampler.peak))

        # ---- telemetry ----
        # --quick: 10 times the agent's rate, so that each phase (one report per device at least) lasts 1 s, not 10.
        agent_rate = (10 if args.quick else 1) / AgentConfig().telemetry_interval_s
        rate = "10x the agent's rate" if args.quick else "agent's rate"
        await telemetry(server, devices, agent_rate, args.telemetry_s, rate, table, flood=False)
        await telemetry(server, devices, agent_rate, args.telemetry_s, f"{rate} + 1 flooding", table)
        await telemetry(
            server,
            devices,
            config.telemetry_per_device_per_s,
            args.telemetry_s,
            "the most the limit allows",
            table,
        )

        # ---- stuck downloads ----
        await downloads(server, devices, path, len(model), deployment.id, table, pause)

        # ---- restart ----
        await restart(server, devices, deployment.id, table)
    finally:
        await simdevices.close_all(devices)
        await server.close()


async def telemetry(
    server: Any,
    devices: list[Any],
    per_device_s: float,
    seconds: float,
    label: str,
    table: Table,
    flood: bool = True,
) -> None:
    """Every device but one reports `per_device_s` times a second (closed loop: a late reply delays the
    next report, missed ticks are skipped) while the other one floods (`flood`): 16 calls in flight back
    to back, ignoring retry-after."""
    flooder, others = devices[0], devices[1:]
    period = 1 / per_device_s
    seconds = max(seconds, period)  # every device reports at least once
    latencies: list[float] = []
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    flooded: collections.Counter[grpc.StatusCode] = collections.Counter()
    end = time.monotonic() + seconds

    async def steady(device: Any, offset: float) -> None:
        next_at = time.monotonic() + offset
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            asked = time.monotonic()
            code = await device.report_telemetry(timeout=30)
            latencies.append(time.monotonic() - asked)
            codes[code] += 1
            next_at = max(next_at + period, time.monotonic())

    async def flooding() -> None:
        while time.monotonic() < end:
            flooded[await flooder.report_telemetry(timeout=30)] += 1

    before = server.usage()
    async with UsageSampler(server, 0.1) as sampler:
        t0 = time.monotonic()
        await asyncio.gather(
            *(flooding() for _ in range(16 if flood else 0)),
            *(steady(d, (i / len(others)) * period) for i, d in enumerate(others)),
        )
        took = time.monotonic() - t0
    after = server.usage()
    accepted = codes[OK]
    table.add(
        "telemetry",
        f"{label}: {len(others)} devices x {per_device_s:g}/s",
        f"offered {len(others) * per_device_s:.0f}/s for {seconds:g} s",
    )
    table.add(
        "telemetry",
        "  accepted from them",
        f"{accepted / took:.0f}/s ({accepted} in {took:.1f} s; server CPU {cpu(before, after, took)})",
    )
    table.add(
        "telemetry",
        "  their latency p50 / p99 / max",
        f"{ms(pct(latencies, 50))} / {ms(pct(latencies, 99))} / {ms(max(latencies))}",
    )
    refused = {c.name: k for c, k in codes.items() if c != OK}
    table.add("telemetry", "  their refusals", str(refused or "none"))
    if flood:
        refused = {c.name: k for c, k in flooded.items() if c != OK}
        table.add("telemetry", "  flooding device: accepted, refused", f"{flooded[OK]}, {refused or 'none'}")
    table.add("telemetry", "  server peak", usage_text(sampler.peak))


async def downloads(
    server: Any, devices: list[Any], path: str, size: int, deployment_id: str, table: Table, pause: float
) -> None:
    """100 devices open DownloadModel and read one chunk, then nothing (a 64 KiB receive window: no BDP
    probing); meanwhile 20 others download the whole model."""
    stuck_devices, readers = devices[:100], devices[100:120]
    for d in stuck_devices:  # a fresh channel without BDP probing (the stream's window stays at 64 KiB)
        await d.close()
        d.channel_options = [("grpc.http2.bdp_probe", 0)]
    await asyncio.gather(*(d.get_assignment() for d in stuck_devices))  # connected again
    before = await settle(server, pause)
    calls = []
    try:
        for d in stuck_devices:
            call = d.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
            await call.read()
            calls.append(call)
        await asyncio.sleep(pause)
        held = server.usage()
        t0 = time.monotonic()
        got = await asyncio.gather(*(d.download(path) for d in readers))
        took = time.monotonic() - t0
    finally:
        for call in calls:
            call.cancel()
    await asyncio.sleep(pause)
    after = server.usage()
    t_restarted = time.monotonic()
    for d in stuck_devices:  # their control streams again, for the restart
        d.start()
    await simdevices.wait_assigned(stuck_devices, deployment_id, t_restarted, timeout=60)
    per_call = (held.rss - before.rss) / len(calls)
    table.add(
        "download",
        f"{len(calls)} stuck DownloadModel calls ({size / MIB:.0f} MiB model)",
        f"+{(held.rss - before.rss) / MIB:.0f} MiB ({per_call / MIB:.2f} MiB each), +{held.fds - before.fds} fds",
    )
    ok = sum(g == got[0] and len(g) == size for g in got)
    table.add(
        "download",
        f"meanwhile {len(readers)} full downloads at once",
        f"{took:.2f} s, {len(readers) * size / MIB / took:.0f} MiB/s, {ok} complete",
    )
    table.add("download", "after the stuck calls are cancelled", usage_text(after))


async def restart(server: Any, devices: list[Any], deployment_id: str, table: Table) -> None:
    n = len(devices)
    before = server.usage()
    with fleetstats.quiet_gc():
        async with fleetstats.LoopLag() as lag:
            stopped = time.monotonic()
            await asyncio.to_thread(server.stop)  # SIGTERM: in-flight calls get grace_seconds
            exited = time.monotonic()
            ready = await asyncio.to_thread(server.start)
            async with UsageSampler(server, 0.1) as sampler:
                await simdevices.wait_back(devices, deployment_id, stopped, timeout=120)
                back = time.monotonic()
    await server.wait_connected((d.id for d in devices), 0, timeout=60)
    seen = await fleetstats.status_times(server)
    r = fleetstats.RestartFigures.of(devices, deployment_id, stopped, ready, seen)
    table.add("restart", "before: server with the fleet", usage_text(before))
    table.add(
        "restart",
        "SIGTERM -> process exited",
        f"{exited - stopped:.2f} s (grace {server.config['grace_seconds']:g} s)",
    )
    table.add(
        "restart",
        f"{n} streams cut, after SIGTERM",
        f"{min(r.cuts):.2f} .. {max(r.cuts):.2f} s (within {ms(max(r.cuts) - min(r.cuts))})",
    )
    table.add("restart", "SIGTERM -> new process ready", f"{r.ready_after:.2f} s")
    table.add("restart", "failed tries ended with", str(dict(r.codes)))
    table.add("restart", "first retry after the cut, p10 / p50 / p90", spread(r.first_retries, False))
    table.add(
        "restart", "tries per device until back", str(dict(sorted(collections.Counter(r.tries).items())))
    )
    table.add("restart", "status processed, after ready: p10/50/90/max", spread(r.arrivals))
    table.add(
        "restart",
        "  busiest 100 ms / 1 s at the server",
        f"{fleetstats.busiest_window(r.arrivals, 0.1)} / {fleetstats.busiest_window(r.arrivals, 1.0)} devices",
    )
    per_second = collections.Counter(math.floor(a) for a in r.arrivals)
    table.add(
        "restart",
        "  statuses per second after ready",
        " ".join(str(per_second.get(s, 0)) for s in range(min(per_second), max(per_second) + 1)),
    )
    table.add("restart", "assignment on the new stream: p10/50/90/max", spread(r.backs))
    table.add("restart", "new server while the fleet came back", f"peak {usage_text(sampler.peak)}")
    table.add(
        "restart",
        "  its CPU from ready until all back",
        cpu(sampler.samples[0], sampler.samples[-1], back - ready),
    )
    table.add("restart", "this process's longest event-loop stall", ms(lag.max))


def spread(values: list[float], with_max: bool = True) -> str:
    figures = " / ".join(f"{pct(values, q):.2f}" for q in (10, 50, 90))
    return f"{figures} / {max(values):.2f} s" if with_max else f"{figures} s"


def cpu(before: Any, after: Any, seconds: float) -> str:
    return f"{(after.cpu_s - before.cpu_s) / seconds:.0%} of a core"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run: does it still run")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--telemetry-s", type=float, default=5.0)
    parser.add_argument("--grace-s", type=float, default=ServerConfig().grace_seconds)
    parser.add_argument("--budget-s", type=float, default=170.0, help="the whole run is stopped after this")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.telemetry_s, args.budget_s, args.grace_s = 40, 1.0, 90.0, 1.0
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
