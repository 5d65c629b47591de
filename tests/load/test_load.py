"""Load: a simulated fleet against one real server process (docs/reliability.md, "Load").

The server runs in a subprocess of its own (edgefleet.devtools.serverprocess: `server.app.serve`, what
`edgefleet server` runs, with ServerConfig fields a test chooses), so its RSS, file descriptors and threads
are measured with psutil on a process that holds nothing but the server. The devices are simulated in this
process (edgefleet.devtools.simdevices): each one is a real enrolled device (Enroll over the enrollment port
with a CSR of its own key, then an mTLS channel with the certificate the server issued), with a channel
(TCP + TLS connection) of its own and a Connect control stream, reconnecting with the agent's own jittered
exponential `Backoff` as `edgefleet.agent.control` does.

The same simulation, at a larger scale and printing figures instead of asserting, is `bench/fleet_load.py`.

The telemetry flood ("one device flooding telemetry is rate-limited") is covered by
tests/integration/test_security.py::test_device_flooding_telemetry_is_rate_limited_and_others_are_not and not repeated
here; the rest of that line (the agent's bounded queue drops oldest first and counts the drops) is the last
test below. bench/fleet_load.py measures what a flood costs the other devices at scale.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet import signing
from edgefleet.agent.telemetry import Outbox
from edgefleet.devtools.fleetstats import (
    LoopLag,
    RestartFigures,
    busiest_window,
    percentile,
    quiet_gc,
    status_times,
)
from edgefleet.devtools.modelgen import build_large_mlp
from edgefleet.devtools.serverprocess import MIB, UsageSampler, server_process
from edgefleet.devtools.simdevices import (
    AGENT_BACKOFF_INITIAL_S,
    SimDevice,
    close_all,
    connect_all,
    enroll,
    wait_assigned,
    wait_back,
)
from edgefleet.v1 import device_pb2

OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyFiles:
    return signing.init_keys(tmp_path_factory.mktemp("load-keys"))


@pytest.fixture(scope="module")
def model() -> bytes:
    """A real ~8 MiB TFLite model (random float32 weights: compresses as poorly as a trained one)."""
    return build_large_mlp(8 * MIB)


# ---- bounded memory, file descriptors and threads under many control streams ------------------------------


async def test_hundreds_of_control_streams_keep_server_memory_fds_and_threads_bounded_and_a_deployment_reaches_every_device(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Thousands of simulated devices on one server process: bounded memory, file descriptors and threads.

    400 devices hold control streams: the server pays a bounded amount of memory per device, one socket per
    device and no thread per device; a deployment reaches every stream; when the devices go away their
    sockets are released, and a second fleet-wide reconnect costs (almost) nothing more than the first."""
    n = 400
    async with asyncio.timeout(90), server_process(tmp_path, keys) as server:
        devices = await enroll(server, n)
        try:
            idle = server.usage()
            await connect_all(devices, server)
            await asyncio.sleep(1)  # let the handlers settle
            streams = server.usage()
            per_device = (streams.rss - idle.rss) / n
            print(f"\nidle: {idle}; {n} streams: {streams}; {per_device / 1024:.0f} KiB per device")
            assert per_device < 256 * 1024, (
                f"{per_device / 1024:.0f} KiB of server memory per connected device"
            )
            assert streams.fds - idle.fds <= n + 16, f"{streams.fds - idle.fds} fds for {n} devices"
            assert streams.threads - idle.threads <= 4, (
                f"threads grew from {idle.threads} to {streams.threads}"
            )

            await asyncio.to_thread(server.push_model, model, "load", "1")
            started = time.monotonic()
            async with UsageSampler(server) as sampler:
                deployment = await server.deploy("load", "1")
                await wait_assigned(devices, deployment.id, started, timeout=30)
            fan_out = max(d.first_assignment(deployment.id) or math.inf for d in devices) - started
            print(f"deployment to {n} streams: {fan_out:.2f} s; peak during it: {sampler.peak}")
            assert deployment.devices_targeted == n and deployment.devices_notified == n, deployment
            assert all(d.assignments[-1][1] == deployment.id for d in devices)
            assert fan_out < 15, fan_out
            assert sampler.peak.rss - streams.rss < 64 * MIB, sampler.peak

            await close_all(devices)  # every device goes away: its socket must be released
            await server.wait_disconnected((d.id for d in devices), timeout=30)
            await asyncio.sleep(1)
            gone = server.usage()
            print(f"after the {n} devices left: {gone}")
            assert gone.fds <= idle.fds + 4, f"{gone.fds - idle.fds} fds still held after every device left"

            # All of them again, on new connections; the assignment is still pending, so it comes again.
            reconnected = time.monotonic()
            await connect_all(devices, server)
            await wait_assigned(devices, deployment.id, reconnected, timeout=30)
            await asyncio.sleep(1)
            again = server.usage()
            print(f"{n} streams again: {again}")
            assert again.fds - idle.fds <= n + 16
            # The first round grew the heap for n connections; the second reuses it (no per-connect leak).
            first_round = streams.rss - idle.rss
            assert again.rss - max(streams.rss, gone.rss) < max(0.25 * first_round, 16 * MIB), (
                streams,
                again,
            )
        finally:
            await close_all(devices)


# ---- overload ---------------------------------------------------------------------------------------------

# grpc/grpc#36066: when the server ends a client-streaming call while a request write is in flight, the aio
# client replaces the server's status with its own INTERNAL "Internal error from Core" (see
# edgefleet.devtools.rpc_harness `call`). That status never left the server.
CLIENT_SIDE_INTERNAL = (grpc.StatusCode.INTERNAL, "Internal error from Core")


async def test_overload_is_refused_with_resource_exhausted_and_the_server_recovers(
    tmp_path: Path, keys: signing.KeyFiles
) -> None:
    """Overload answers RESOURCE_EXHAUSTED, not out-of-memory.

    With room for 50 calls at once (45 control streams and 5 more), 45 devices hold control streams, 15 more
    try to connect and 2,000 calls
    arrive at once: what does not fit is refused at once with RESOURCE_EXHAUSTED (nothing hangs, no other
    status, the server's memory barely moves), and once load drops the server serves everyone again: the
    refused devices get in by backing off and retrying, as the agent does."""
    limit = 50
    config = {"max_connected_devices": limit - 5, "rpc_headroom": 5}
    async with asyncio.timeout(90), server_process(tmp_path, keys, **config) as server:
        devices = await enroll(server, 60)
        holders, late = devices[:45], devices[45:]
        try:
            await connect_all(holders, server)
            loaded = server.usage()
            async with UsageSampler(server) as sampler:
                for device in late:
                    device.start()
                await asyncio.sleep(0.5)
                started = time.monotonic()
                burst = await asyncio.gather(
                    *(devices[i % len(devices)].get_assignment(timeout=30) for i in range(2000))
                )
                burst_s = time.monotonic() - started
                health = await server.healthy()
            counts = collections.Counter(burst)
            print(
                f"\n2000 calls over a limit of {limit} in {burst_s:.2f} s: {dict(counts)}; peak {sampler.peak}"
            )
            # Every answer is a clean one a device retries: RESOURCE_EXHAUSTED, or UNAVAILABLE when the
            # database is what is busy (its write lock waits are bounded). Never INTERNAL or a hang.
            assert set(counts) <= {OK, EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, counts
            # What does not fit is refused at once, or waits its turn on its own connection (32 streams
            # each): the server never takes on more than it has room for.
            assert counts[EXHAUSTED] > 0, counts
            assert burst_s < 20, burst_s  # refused at once, not queued until a deadline
            refusals = [(code, details) for d in late for _, code, details in d.ends]
            assert refusals, "no late device was refused"
            # A late device's stream may also be refused by HTTP/2 itself: its own connection carries its
            # share of the burst, over the 32-streams-per-connection cap, and a stream can be reset with
            # REFUSED_STREAM (code 7) before any handler ran. gRPC reports that as UNAVAILABLE, which the
            # agent retries with backoff like the others.
            assert all(
                (code, details) == CLIENT_SIDE_INTERNAL
                or code == EXHAUSTED
                or (code == grpc.StatusCode.UNAVAILABLE and "error code 7" in details)
                for code, details in refusals
            ), collections.Counter(refusals)
            assert health in (OK, EXHAUSTED), health
            assert server.alive(), server.log_tail()
            assert sampler.peak.rss - loaded.rss < 96 * MIB, (loaded, sampler.peak)
            assert sampler.peak.threads - loaded.threads <= 4, (loaded, sampler.peak)

            # Load drops: 30 devices go away. The server answers again at once, and every refused device
            # gets its control stream on a later try.
            released = time.monotonic()
            await asyncio.gather(*(d.stop() for d in holders[:30]))
            while await server.healthy() != OK:
                assert time.monotonic() - released < 5, "the server did not recover"
                await asyncio.sleep(0.05)
            print(f"serving again {time.monotonic() - released:.2f} s after load dropped")
            await server.wait_connected((d.id for d in late), 0, timeout=45)
            for device in devices:  # one at a time: well within the limit
                assert await device.get_assignment() == OK
            assert server.alive()
        finally:
            await close_all(devices)


# ---- restart under the whole fleet ------------------------------------------------------------------------


async def test_server_restart_under_the_fleet_reconnects_with_jittered_backoff_without_a_stampede(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Server restart under the whole fleet: agents reconnect with jittered exponential backoff, no stampede.

    300 devices with a pending assignment hold control streams; the server is stopped gracefully (SIGTERM,
    1 s grace) and started again on the same ports. The server cuts every stream at the same instant, so
    only the devices' backoff can spread the reconnects: their retries are jittered (not in lockstep),
    their number grows only logarithmically with the outage (exponential, no hot loop), the new server sees
    the statuses arrive spread out rather than in one burst, and every device is back (the server pushes
    the assignment again on its new stream) within a bound."""
    n = 300
    async with asyncio.timeout(100), server_process(tmp_path, keys, grace_seconds=1.0) as server:
        devices = await enroll(server, n)
        try:
            await connect_all(devices, server)
            await asyncio.to_thread(server.push_model, model, "load", "1")
            deployment = await server.deploy("load", "1")
            await wait_assigned(devices, deployment.id, 0, timeout=30)
            with quiet_gc():
                async with LoopLag() as lag:
                    stopped = time.monotonic()
                    await asyncio.to_thread(server.stop)  # SIGTERM
                    ready = await asyncio.to_thread(server.start)  # the same ports
                    await wait_back(devices, deployment.id, stopped, timeout=45)
            await server.wait_connected((d.id for d in devices), 0, timeout=10)
            seen = await status_times(server)
        finally:
            await close_all(devices)

    r = RestartFigures.of(devices, deployment.id, stopped, ready, seen)
    print(f"\n{r}\nthis process's event loop stalled at most {lag.max * 1000:.0f} ms")
    # All cut together by the server (the grace ends for every stream at once) ...
    assert max(r.cuts) - min(r.cuts) < 0.5
    # ... and spread out again by the jitter: in lockstep these would all be 0.5 s.
    assert percentile(r.first_retries, 90) - percentile(r.first_retries, 10) > 0.2
    assert min(r.first_retries) >= AGENT_BACKOFF_INITIAL_S * 0.5 - 0.01
    # Exponential: the number of tries grows with the log of the outage (a hot loop would make hundreds).
    assert all(t <= b for t, b in zip(r.tries, r.tries_bound, strict=True)), r.tries
    # The new server sees the fleet arrive spread out, not in one burst (in lockstep all n would arrive in
    # the same few ms; the first retry's jitter alone spreads a wave over 0.5 s, about n/5 per 100 ms) ...
    assert percentile(r.arrivals, 90) - percentile(r.arrivals, 10) > 0.25
    assert busiest_window(r.arrivals, 0.1) <= 0.4 * n
    # ... and everyone is back within a bound.
    assert max(r.backs) < 30


# ---- slow and stuck download consumers --------------------------------------------------------------------


async def test_stuck_and_slow_download_consumers_do_not_exhaust_the_server(
    tmp_path: Path, keys: signing.KeyFiles, model: bytes
) -> None:
    """Slow or stuck download consumers do not exhaust the server.

    On an 8 MiB model, 40 devices (and one device with 2 calls, the most one device may hold, and a refused
    third) open DownloadModel
    and read one chunk, then nothing; 10 more read a chunk every 0.5 s. Flow control holds: the server keeps
    a bounded window per stuck call instead of reading the model into memory, its threads are not tied up,
    other devices' calls are answered promptly and their full downloads complete; the slow readers keep
    getting data; and when the stuck consumers go away every file they held is closed."""
    async with asyncio.timeout(90), server_process(tmp_path, keys) as server:
        path = await asyncio.to_thread(server.push_model, model, "big", "1")
        devices = await enroll(server, 40 + 1 + 10 + 10)
        stuck, hog, slow, others = devices[:40], devices[40], devices[41:51], devices[51:]
        for device in [*stuck, hog]:
            # Without BDP probing the client's window stays at 64 KiB: the consumer really takes nothing
            # (with it, grpc's client library would buffer megabytes for the application on its own).
            device.channel_options = [("grpc.http2.bdp_probe", 0)]
        stuck_calls: list[Any] = []
        try:
            assert set(await asyncio.gather(*(d.get_assignment() for d in devices))) == {OK}  # connections up
            idle = server.usage()
            async with UsageSampler(server) as sampler:
                for device in [*stuck, *[hog] * 2]:
                    call = device.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                    first = await call.read()
                    assert first.total_length == len(model)
                    stuck_calls.append(call)
                # The same device may not pile up more: the server refuses a third at once.
                extra = hog.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await extra.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

                async def read_slowly(device: SimDevice, until: float) -> list[float]:
                    call = device.stub.DownloadModel(device_pb2.DownloadModelRequest(target_path=path))
                    waits = []
                    try:
                        while time.monotonic() < until:
                            asked = time.monotonic()
                            await call.read()
                            waits.append(time.monotonic() - asked)
                            await asyncio.sleep(0.5)
                    finally:
                        call.cancel()
                    return waits

                slow_readers = asyncio.gather(*(read_slowly(d, time.monotonic() + 6) for d in slow))
                await asyncio.sleep(1)
                unary_s = []
                for _ in range(10):
                    asked = time.monotonic()
                    codes = await asyncio.gather(
                        *(d.get_assignment() for d in others), *(d.report_telemetry() for d in others)
                    )
                    unary_s.append(time.monotonic() - asked)
                    assert set(codes) == {OK}, codes
                asked = time.monotonic()
                downloads = await asyncio.gather(*(d.download(path) for d in others[:5]))
                download_s = time.monotonic() - asked
                slow_waits = await slow_readers
                held = server.usage()
            stuck_n = len(stuck_calls)
            per_call = (sampler.peak.rss - idle.rss) / (stuck_n + len(slow))
            print(
                f"\nidle {idle}; with {stuck_n} stuck and {len(slow)} slow downloads: {held}, peak "
                f"{sampler.peak} ({per_call / MIB:.2f} MiB per call; the model is {len(model) / MIB:.0f} MiB)\n"
                f"other devices' unary calls: max {max(unary_s) * 1000:.0f} ms per round; 5 full downloads "
                f"{download_s:.2f} s; slow readers' longest wait for a chunk {max(map(max, slow_waits)):.3f} s"
            )
            assert all(data == model for data in downloads)
            assert max(unary_s) < 2, unary_s
            assert download_s < 20, download_s
            assert max(map(max, slow_waits)) < 2, slow_waits
            # Bounded by flow control: far less than the model per stuck call, not tied to its size.
            assert per_call < 3 * MIB, f"{per_call / MIB:.2f} MiB per stuck download"
            assert sampler.peak.threads - idle.threads <= 4, (idle, sampler.peak)
            assert held.fds >= idle.fds + stuck_n  # they really are held open: each keeps its file
            assert server.alive()
        finally:
            for call in stuck_calls:
                call.cancel()
            await asyncio.sleep(0.5)
            after = server.usage()
            await close_all(devices)
        print(f"after the stuck consumers left: {after}")
        assert after.fds <= idle.fds + 2, f"{after.fds - idle.fds} files still open after the downloads ended"


# ---- the agent's telemetry queue ----------------------------------------------------------------------------


async def test_agent_telemetry_queue_keeps_the_newest_reports_and_counts_what_it_drops() -> None:
    """The agent's bounded queue drops oldest first and counts the drops.

    A device that cannot send (server down, or rate-limited) keeps the newest `telemetry_queue_size`
    reports; each one pushed out is counted (the count goes out with the next report sent), and a report
    whose sending failed goes back to the front unless the queue filled up meanwhile (then it is the
    oldest, and the one dropped)."""
    outbox = Outbox(telemetry_size=5)
    for i in range(12):
        outbox.put_telemetry(device_pb2.TelemetryReport(at_unix_ms=i))
    assert [r.at_unix_ms for r in outbox.telemetry] == [7, 8, 9, 10, 11]
    assert outbox.dropped == 7

    failed = await outbox.get_telemetry()  # sending it fails: back to the front
    assert failed.at_unix_ms == 7
    outbox.put_telemetry(failed, front=True)
    assert [r.at_unix_ms for r in outbox.telemetry] == [7, 8, 9, 10, 11] and outbox.dropped == 7

    failed = await outbox.get_telemetry()
    outbox.put_telemetry(device_pb2.TelemetryReport(at_unix_ms=12))  # a new one arrives meanwhile
    outbox.put_telemetry(failed, front=True)  # full again: the failed (oldest) one is dropped
    assert [r.at_unix_ms for r in outbox.telemetry] == [8, 9, 10, 11, 12]
    assert outbox.dropped == 8
    assert len(outbox.telemetry) <= 5
