"""Staged rollouts over a real server process with 200 simulated devices speaking the real protocol
(edgefleet.devtools.rolloutsim): waves advance only on healthy devices, each gate aborts a bad candidate
with its numbers, the devices already updated are ordered back (the RollbackCommand names the rollout),
inconclusive holds, late joiners join, a maintenance window holds the rollout, a killed server resumes it,
and every action reaches the audit log (each entry also goes to the server's log).

One server and one fleet for the module: each scenario rolls out its own version and leaves every device
on a good one, so the next starts from a known fleet. Soaks are a second, telemetry every 0.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from edgefleet import signing
from edgefleet.devtools.rolloutsim import FAST_GATES, RolloutRig
from edgefleet.devtools.simbehaviour import ModelBehaviour
from edgefleet.devtools.simdevices import SimDevice
from edgefleet.v1 import device_pb2, operator_pb2, rollout_pb2

GOOD = ModelBehaviour()
BEHAVIOURS = {
    "1": GOOD,
    "2": GOOD,
    "3": ModelBehaviour(latency_median_ms=GOOD.latency_median_ms * 1.6),  # 60 % slower
    "4": GOOD.swapped(0, 9),  # two classes swapped: passes every offline check, drifts live
    "5": ModelBehaviour(error_rate=0.05),
    "6": ModelBehaviour(crashes_per_report=0.5),
    "7": ModelBehaviour(install_failure_rate=0.5),
    "8": ModelBehaviour(agreement=0.7),  # a shadow candidate that disagrees
    "9": GOOD,
    "10": GOOD,
    "11": GOOD,
    "12": GOOD,
}
DEVICES = 200

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RolloutRig]:
    keys = signing.init_keys(tmp_path_factory.mktemp("rollout-keys"))
    rig = await RolloutRig.create(
        tmp_path_factory.mktemp("rollout-server"),
        keys,
        devices=DEVICES,
        versions=list(BEHAVIOURS),
        behaviours=BEHAVIOURS,
    )
    try:
        yield rig
    finally:
        await rig.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def no_rollout_left_holding_devices(rig: RolloutRig) -> AsyncIterator[None]:
    """A scenario that fails with its rollout still running would hold the rig's devices, and every later
    scenario would be refused them: one failure, reported once. Its rollout is aborted with rollback, so
    devices on its candidate go back to what they ran."""
    yield
    reply = await rig.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), timeout=30)
    for r in reply.rollouts:
        if r.state in ("running", "paused"):
            request = rollout_pb2.AbortRolloutRequest(rollout_id=r.id, reason="the scenario ended")
            with contextlib.suppress(grpc.aio.AioRpcError):  # it finished meanwhile
                await rig.rollouts.AbortRollout(request, timeout=30)


def finished(s: rollout_pb2.GetRolloutResponse) -> bool:
    return s.rollout.state in ("completed", "aborted")


def gate(s: rollout_pb2.GetRolloutResponse, wave: int, name: str) -> rollout_pb2.GateResult:
    return next(g for g in s.waves[wave].gates if g.gate == name)


async def assert_aborted_by(rig: RolloutRig, version: str, gate_name: str, **start: object) -> None:
    before = rig.versions_now()
    rollout_id = await rig.start(version, **start)  # type: ignore[arg-type]
    s = await rig.wait(rollout_id, finished)
    assert s.rollout.state == "aborted", s
    failed = gate(s, 0, gate_name)
    assert failed.outcome == "fail", failed
    assert gate_name in s.rollout.reason and failed.explanation in s.rollout.reason
    assert failed.canary_n > 0 and failed.HasField("threshold")
    assert s.waves[1].state == "pending"  # the next wave never started
    assert any(a.model.version == version for d in rig.devices for a in d.received)
    await rig.wait_running_all(before)
    # Every device that ran the candidate was ordered back by a rollback command naming the rollout, one
    # that finished installing just after the abort too (its order was left pending: test_rollout_interleavings.py).
    served = [d for d in rig.devices if any(path.split("/")[1] == version for path in d.served)]
    assert served or gate_name == "shadow-agreement"
    for d in served:
        assert any(c.rollout_id == rollout_id for c in d.rollbacks), d.id


async def test_a_good_version_advances_wave_by_wave_only_on_healthy_devices(rig: RolloutRig) -> None:
    rollout_id = await rig.start("2", waves="10%,30%,100%")
    s = await rig.wait(rollout_id, lambda s: s.waves[0].state == "soaking")
    assert s.waves[1].state == "pending"  # wave 1 waits for wave 0's judgement
    s = await rig.wait(rollout_id, finished)
    assert s.rollout.state == "completed", s.rollout.reason
    assert [w.state for w in s.waves] == ["passed", "passed", "passed"]
    assert s.waves[0].device_states["healthy"] == 20 and s.waves[0].control_devices == 20
    assert {g.gate for g in s.waves[0].gates} >= {"latency", "drift-top-class", "error-rate", "crash-rate"}
    assert all(g.outcome == "pass" for g in s.waves[0].gates)
    assert [g.gate for g in s.waves[2].gates] == [
        "install-failures",
        "installs-finished",
    ]  # nobody left on v1 to compare with
    await rig.wait_running("2", rig.devices)
    log = rig.log()
    assert f"rollout.start {rollout_id}" in log and f"rollout.gate {rollout_id}" in log


async def test_a_much_slower_candidate_is_aborted_by_the_latency_gate(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "3", "latency")


async def test_two_swapped_classes_are_aborted_by_the_drift_gate(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "4", "drift-top-class")


async def test_more_errors_abort_on_the_error_rate_gate(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "5", "error-rate")


async def test_crashing_workers_abort_on_the_crash_rate_gate(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "6", "crash-rate")


async def test_install_failures_abort_once_they_pass_the_percentage_and_the_count(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "7", "install-failures", soak_s=30)


async def test_a_disagreeing_shadow_candidate_is_aborted_before_it_serves(rig: RolloutRig) -> None:
    await assert_aborted_by(rig, "8", "shadow-agreement", shadow_waves=1)
    assert not rig.on("8")  # a shadow wave never served it


async def test_inconclusive_holds_the_wave_and_an_operator_abort_rolls_back(rig: RolloutRig) -> None:
    # A floor no soak here can reach: the wave holds, it never passes by default.
    before = rig.versions_now()
    rollout_id = await rig.start("9", gates=["latency.min_calls=100000000"])
    s = await rig.wait(rollout_id, lambda s: s.waves[0].state == "holding", timeout=30)
    assert gate(s, 0, "latency").outcome == "inconclusive"
    await asyncio.sleep(1.5)
    s = await rig.status(rollout_id)
    assert s.waves[0].state == "holding" and s.waves[1].state == "pending"
    reply = await rig.rollouts.AbortRollout(
        rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=30
    )
    assert reply.rollback_command_id
    s = await rig.status(rollout_id)
    assert s.rollout.state == "aborted"
    await rig.wait_running_all(before)
    log = rig.log()
    assert f"rollout.abort {rollout_id}" in log


async def test_a_closed_maintenance_window_holds_every_install(rig: RolloutRig) -> None:
    hour = (time.gmtime().tm_hour + 12) % 24  # half a day away
    closed = rollout_pb2.MaintenanceWindow(cron=f"0 {hour} * * *", duration_seconds=600)
    rollout_id = await rig.start("10", windows=[closed])
    await asyncio.sleep(2)
    s = await rig.status(rollout_id)
    assert s.waves[0].state == "pending" and not rig.on("10")
    assert not any(a.model.version == "10" for d in rig.devices for a in d.received)
    await rig.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=30)


async def test_late_joiners_and_a_killed_server_resume_the_rollout_where_it_was(rig: RolloutRig) -> None:
    rollout_id = await rig.start("11", waves="10%,100%", soak_s=3)
    s = await rig.wait(rollout_id, lambda s: s.waves[0].device_states["healthy"] >= 10)
    started = s.waves[0].started_at_unix_ms
    rig.server.stop(signal.SIGKILL)  # a crash, mid-soak
    await asyncio.to_thread(rig.server.start)
    late = await rig.add_devices(5, "late")
    s = await rig.wait(rollout_id, finished, timeout=90)
    assert s.rollout.state == "completed", s.rollout.reason
    assert s.waves[0].started_at_unix_ms == started  # the soak clock was not restarted
    assert [e.what for e in s.timeline].count("wave 0 started") == 1
    await rig.wait_running("11", late)  # devices that enrolled mid-rollout joined it
    assert any("late joiners" in e.what for e in s.timeline)


async def test_pause_holds_resume_carries_on_and_next_promotes_a_held_wave(rig: RolloutRig) -> None:
    rollout_id = await rig.start("12", waves="10%,50%,100%", gates=["latency.min_calls=100000000"])
    request = {"rollout_id": rollout_id}
    await rig.wait(rollout_id, lambda s: s.waves[0].state == "holding")
    await rig.rollouts.PauseRollout(rollout_pb2.PauseRolloutRequest(**request), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await rig.rollouts.PauseRollout(rollout_pb2.PauseRolloutRequest(**request), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "paused" in (e.value.details() or "")
    reply = await rig.rollouts.NextWave(rollout_pb2.NextWaveRequest(**request), timeout=30)
    assert reply.current_wave == 1
    await asyncio.sleep(1)
    s = await rig.status(rollout_id)
    assert s.rollout.state == "paused" and s.waves[0].state == "promoted" and s.waves[1].state == "pending"
    await rig.rollouts.ResumeRollout(rollout_pb2.ResumeRolloutRequest(**request), timeout=30)
    s = await rig.wait(rollout_id, lambda s: s.waves[1].state == "holding")
    retried = await rig.rollouts.RetryFailed(rollout_pb2.RetryFailedRequest(**request), timeout=30)
    assert retried.devices == 0  # nothing failed
    await rig.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(**request, no_rollback=True), timeout=30)
    s = await rig.status(rollout_id)
    assert s.rollout.state == "aborted" and len(rig.on("12")) >= 20  # --no-rollback leaves them there
    for action in ("pause", "next", "resume", "retry-failed", "abort"):
        assert f"rollout.{action} {rollout_id}" in rig.log(), action


async def test_rollout_requests_are_validated_and_need_the_operator_permit(rig: RolloutRig) -> None:
    bad = [
        dict(rollout_id="nope", model_name="detector", version="2", selector="all", waves="10%"),
        dict(rollout_id="ro-abcd1", model_name="detector", version="2", selector="all", waves="120%"),
        dict(
            rollout_id="ro-abcd1",
            model_name="detector",
            version="2",
            selector="all",
            waves="10%",
            ramp="1,2,3",
        ),
        dict(
            rollout_id="ro-abcd1",
            model_name="detector",
            version="2",
            selector="all",
            waves="5",
            gates=["x.y=1"],
        ),
        dict(
            rollout_id="ro-abcd1",
            model_name="detector",
            version="2",
            selector="all",
            waves="5",
            soak_seconds=-1,
        ),
    ]
    for fields in bad:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rig.rollouts.StartRollout(rollout_pb2.StartRolloutRequest(**fields), timeout=30)  # type: ignore[arg-type]
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
    unsigned = rollout_pb2.StartRolloutRequest(
        rollout_id="ro-unsigned1", model_name="detector", version="2", selector="all", waves="5"
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await rig.rollouts.StartRollout(unsigned, timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "permit" in (e.value.details() or "")


def cli(rig: RolloutRig, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `edgefleet` command, as an operator runs it, against the rig's server."""
    common = [
        "--server", rig.server.address,
        "--tls-dir", str(rig.server.data_dir / "operator"),
        "--keys-dir", str(rig.server.keys.targets.parent),
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", *common, *args], capture_output=True, text=True, timeout=120
    )


async def test_the_cli_signs_the_permit_starts_watches_and_lists_a_rollout(rig: RolloutRig) -> None:
    fresh = await rig.add_devices(60, "cli", group="cli")  # a group of its own, on v1
    await rig.server.deploy("detector", "1", "group:cli")
    await rig.wait_running("1", fresh)
    usage = await asyncio.to_thread(cli, rig, "rollout", "start", "detector", "9", "--to", "all")
    assert usage.returncode == 2 and "--waves" in usage.stderr
    refused = await asyncio.to_thread(
        cli, rig, "rollout", "start", "detector", "9", "--to", "group:nobody", "--waves", "5"
    )
    assert refused.returncode == 1 and "reaches no device" in refused.stderr
    gates = [f"--gate={g}" for g in FAST_GATES]
    started = await asyncio.to_thread(
        cli, rig, "rollout", "start", "detector", "9", "--to", "group:cli", "--waves", "20,100%",
        "--soak", "1s", "--json", *gates,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    plan = json.loads(started.stdout)
    rollout_id = plan["id"]
    assert plan["started"] and [w["size"] for w in plan["waves"]] == [20, 60]
    permit = await rig.permit(rollout_id)
    assert permit is not None and permit.model == "detector"
    watched = await asyncio.to_thread(
        cli, rig, "rollout", "status", rollout_id, "--watch", "--json", "--interval", "0.5"
    )
    assert watched.returncode == 0, watched.stderr
    last = json.loads(watched.stdout.splitlines()[-1])
    assert (
        last["state"] == "completed"
        and last["waves_status"][0]["devices"]["healthy"] == plan["waves"][0]["size"]
    )
    assert isinstance(last["waves_status"][0]["gates"][0]["threshold"], float)
    listed = json.loads((await asyncio.to_thread(cli, rig, "rollout", "list", "--json")).stdout)
    assert rollout_id in {r["id"] for r in listed}
    paused = await asyncio.to_thread(cli, rig, "rollout", "pause", rollout_id)
    assert paused.returncode == 1 and "completed" in paused.stderr  # nothing to pause any more


async def labelled(rig: RolloutRig, devices: list[SimDevice], key: str) -> str:
    """Labels `devices` `key=yes` (a rollout of their own, apart from the rig's others); returns the selector."""
    for d in devices:
        label = operator_pb2.LabelDeviceRequest(device_id=d.id, set={key: "yes"})
        await rig.server.operator.LabelDevice(label, timeout=30)
    return f"{key}=yes"


# retry-failed: about half the devices fail their first install of this candidate (a transient fault; a retry
# works). Added to the rig's versions here, beside its scenario, so that appending it changed nothing above.
BEHAVIOURS["31"] = ModelBehaviour(install_failure_rate=0.5, transient_install_failure=True)


async def test_retry_failed_assigns_the_failed_devices_again_with_retry_and_each_wave_then_passes(
    rig: RolloutRig,
) -> None:
    # 20 devices labelled for it (a rollout of their own, apart from the rig's others), each on the good
    # version earlier scenarios left it on. min_devices is a wave's size: a wave is judged only once all 10
    # are healthy, so its failed devices hold it (the install gate is told to tolerate them) until a retry
    # heals them.
    fresh = rig.devices[:20]
    rollout_id = await rig.start(
        "31",
        waves="10,100%",
        min_devices=10,
        gates=["install-failures.min_failed_devices=100000"],
        selector=await labelled(rig, fresh, "retry"),
    )
    request = rollout_pb2.RetryFailedRequest(rollout_id=rollout_id)
    failed: dict[str, int] = {}  # retry order -> devices it retried
    for wave in (0, 1):

        def done(s: rollout_pb2.GetRolloutResponse, wave: int = wave) -> bool:
            states = s.waves[wave].device_states
            return s.rollout.current_wave == wave and states["failed"] + states["healthy"] == 10

        s = await rig.wait(rollout_id, done)
        order = f"{rollout_id}-w{wave}-retry1"
        failed[order] = s.waves[wave].device_states["failed"]
        await asyncio.sleep(1.2)  # a soak and more: its failures hold the wave
        s = await rig.status(rollout_id)
        assert s.waves[wave].state == "soaking" and s.waves[wave].device_states["failed"] == failed[order]
        # and the timeline says why, with what the operator can do
        why = f"wave {wave} soaked, but {10 - failed[order]} of the 10 healthy devices it needs are healthy"
        said = [e.what for e in s.timeline if e.what.startswith(why)]
        assert said and f"{failed[order]} failed: `edgefleet rollout retry-failed {rollout_id}`" in said[0], (
            said
        )
        assert (await rig.rollouts.RetryFailed(request, timeout=30)).devices == failed[order]

    s = await rig.wait(rollout_id, finished)
    assert s.rollout.state == "completed", s.rollout.reason
    assert [(w.state, w.device_states["healthy"]) for w in s.waves] == [("passed", 10), ("passed", 10)]
    assert sum(failed.values()) > 0  # half of them, drawn per device
    await rig.wait_running("31", fresh)
    for d in fresh:  # told again under its wave's retry order, with retry: it lifted the mark once
        orders = [a.deployment_id for a in d.received if a.retry]
        assert len(orders) <= 1 and all(o in failed for o in orders), (d.id, orders)
        assert d.retries == ({d.current.target_path: orders} if orders else {}), d.id  # type: ignore[union-attr]
        if orders:  # and the periodic check says the same (what a device that missed the stream gets)
            reply = await d.stub.GetAssignment(device_pb2.GetAssignmentRequest(), timeout=30)
            assert reply.assignment.retry and reply.assignment.deployment_id == orders[0], d.id
    assert sum(1 for d in fresh if d.retries) == sum(failed.values())
    assert f"rollout.retry-failed {rollout_id}" in rig.log()


# A shadow wave whose failed devices must stay out of the serving wave (they bad-listed the candidate).
BEHAVIOURS["32"] = ModelBehaviour(install_failure_rate=0.4)


async def test_devices_that_failed_a_shadow_wave_are_not_moved_into_the_serving_wave(rig: RolloutRig) -> None:
    shadowed = rig.devices[20:40]
    rollout_id = await rig.start(
        "32",
        waves="10,100%",
        shadow_waves=1,
        min_devices=1,  # judged however many failed: the install gate is told to tolerate them
        gates=["install-failures.min_failed_devices=100000"],
        selector=await labelled(rig, shadowed, "shadowed"),
    )
    s = await rig.wait(rollout_id, finished, timeout=90)
    assert s.rollout.state == "completed", s.rollout.reason
    failed_in_shadow = s.waves[0].device_states["failed"]
    assert failed_in_shadow > 0, "no device failed the shadow wave (4 in 10 should, drawn per device)"
    assert sum(s.waves[0].device_states.values()) == failed_in_shadow  # the others moved on to serve it
    assert sum(s.waves[1].device_states.values()) == 20 - failed_in_shadow
    assert s.waves[1].device_states["pending"] == 0
    told = [{a.shadow for a in d.received if a.model.version == "32"} for d in shadowed]
    assert told.count({True}) == failed_in_shadow  # never told to serve it


# ---- device-local maintenance windows ------------------------------------------------------------------
# The server runs in its own process on the real clock, so the zones are chosen from the real UTC time: a
# nightly 02:MM local window that opened 10 minutes ago (in one fixed-offset zone) is open for 50 more
# minutes there and closed in every other offset. Etc/GMT zones have no summer time and no half hours.


def etc_zone(hours_east: int) -> str:
    """The fixed zone `hours_east` of UTC (mod 24, as Etc/GMT-11 .. Etc/GMT+12: their signs are inverted)."""
    east = (hours_east + 12) % 24 - 12
    return "Etc/GMT" if east == 0 else f"Etc/GMT{-east:+d}"


async def joined_by(rig: RolloutRig) -> dict[str, int]:
    """Members of each rollout to `all` that still takes late joiners (running or completed)."""
    listed = await rig.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), timeout=30)
    counts = {}
    for r in listed.rollouts:
        if r.state in ("running", "completed") and r.selector == "all":
            s = await rig.status(r.id)
            counts[r.id] = sum(sum(w.device_states.values()) for w in s.waves)
    return counts


async def quiet(devices: list[SimDevice], for_s: float = 2.0) -> None:
    """Waits until no device is sent or activates anything for `for_s` seconds."""

    def state() -> list[tuple[str, int]]:
        return [(d.current.target_path if d.current else "", len(d.received)) for d in devices]

    deadline = time.monotonic() + 60
    seen, calm = state(), time.monotonic()
    while time.monotonic() - calm < for_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the devices are still being sent versions: {seen}")
        await asyncio.sleep(0.2)
        if (now := state()) != seen:
            seen, calm = now, time.monotonic()


async def on_incumbent(rig: RolloutRig, count: int, group: str, timezones: list[str]) -> list[SimDevice]:
    """New devices on version 1, once the newest earlier rollout to `all` placed them as its late joiners
    (only the newest takes them) and sent them its version: after that, what is deployed to them stays."""
    before = await joined_by(rig)
    new = await rig.add_devices(count, group, group=group, timezones=timezones)
    deadline = time.monotonic() + 60
    while sum((now := await joined_by(rig)).values()) != sum(before.values()) + (count if before else 0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"late joiners not placed: {before} -> {now}")
        await asyncio.sleep(0.2)
    await quiet(new)
    for _ in range(3):  # a late push of an earlier rollout's version (seen under load) is deployed over
        await rig.server.deploy("detector", "1", f"group:{group}")
        await rig.wait_running("1", new)
        await quiet(new)
        if all(d.current is not None and d.current.version == "1" for d in new):
            return new
    raise AssertionError(f"the new devices do not stay on 1: {rig.versions_now()}")


async def test_a_device_local_window_sends_the_candidate_only_where_it_is_open(rig: RolloutRig) -> None:
    opened = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    east = 2 - opened.hour  # where it was 02:MM local ten minutes ago
    open_zone = etc_zone(east)
    zones = [
        open_zone,
        open_zone,
        etc_zone(east + 1),
        etc_zone(east - 1),
        etc_zone(east + 12),
        "",
        "Mars/Olympus_Mons",
    ]
    # closed: an hour east (it closed 10 minutes ago), an hour west (it opens in 50), half a day away; a
    # device with no zone or one nobody knows is judged in UTC (open only when UTC is the open offset).
    per_zone = 3
    tz = await on_incumbent(rig, per_zone * len(zones), "tz", zones)

    def is_open(zone: str) -> bool:
        return zone == open_zone or (zone in ("", "Mars/Olympus_Mons") and open_zone == "Etc/GMT")

    opens = [d for d in tz if is_open(d.capabilities.timezone)]
    held = [d for d in tz if not is_open(d.capabilities.timezone)]
    window = f"{opened.minute} 2 * * *;1h;device-local"
    gates = [f"--gate={g}" for g in FAST_GATES]
    started = await asyncio.to_thread(
        cli, rig, "rollout", "start", "detector", "10", "--to", "group:tz", "--waves", "100%", "--soak", "1s",
        "--window", window, "--json", *gates,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    rollout_id = json.loads(started.stdout)["id"]
    s = await rig.wait(
        rollout_id,
        lambda s: s.waves[0].state == "holding" and s.waves[0].device_states["healthy"] == len(opens),
    )
    await asyncio.sleep(1)  # a few more ticks: nobody else is sent it
    s = await rig.status(rollout_id)
    assert {d.id for d in rig.on("10")} == {d.id for d in opens}
    # Never sent the candidate, not failed. (Not "still on 1": in 2 of 5 full runs a completed rollout to
    # `all` sent one of these late joiners its own version seconds after it settled on 1.)
    for d in held:
        assert d.current is not None and d.current.version != "10", d.capabilities.timezone
        assert not any(a.model.version == "10" for a in d.received), d.capabilities.timezone
        assert not any(x.startswith(rollout_id) for _, x in d.assignments), d.capabilities.timezone
    states = s.waves[0].device_states
    assert states["pending"] == len(held) and states["failed"] == 0 and states["rolled_back"] == 0
    assert s.waves[0].state == "holding" and s.rollout.state == "running"
    finished = gate(s, 0, "installs-finished")
    assert finished.outcome == "inconclusive"
    assert f"{len(held)} wait for their maintenance window" in finished.explanation, finished
    assert gate(s, 0, "install-failures").outcome != "fail"
    why = [e.what for e in s.timeline if "wait for their maintenance window" in e.what]
    assert why and why[0].startswith(f"wave 0: {len(held)} devices wait"), why
    listed = dict(part.rsplit(" ", 1) for part in why[0].split("own time zone (", 1)[1][:-1].split(", "))
    assert listed[etc_zone(east + 1)] == str(per_zone) and open_zone not in listed, listed
    if open_zone != "Etc/GMT":
        unknown = "'Mars/Olympus_Mons' (unknown zone: read as UTC)"
        assert listed[unknown] == listed["UTC"] == str(per_zone), listed
    shown = await asyncio.to_thread(cli, rig, "rollout", "status", rollout_id)
    assert shown.returncode == 0 and "wait for their maintenance window" in shown.stdout, shown.stdout
    await rig.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=30)
    await rig.wait_running("1", opens)  # the open ones went back


async def test_a_closed_utc_window_says_when_it_opens_and_bad_windows_are_usage_errors(
    rig: RolloutRig,
) -> None:
    at = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=12)).replace(
        minute=0, second=0, microsecond=0
    )
    closed = rollout_pb2.MaintenanceWindow(cron=f"0 {at.hour} * * *", duration_seconds=600)
    rollout_id = await rig.start("10", windows=[closed], selector="group:tz")
    s = await rig.wait(
        rollout_id, lambda s: any("waiting for a maintenance window" in e.what for e in s.timeline)
    )
    assert s.waves[0].state == "pending"
    shown = await asyncio.to_thread(cli, rig, "rollout", "status", rollout_id, "--json")
    timeline = [e["what"] for e in json.loads(shown.stdout)["timeline"]]
    opens = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"waiting for a maintenance window (UTC): the next opens at {opens}" in timeline, timeline
    await rig.rollouts.AbortRollout(rollout_pb2.AbortRolloutRequest(rollout_id=rollout_id), timeout=30)
    start = ["rollout", "start", "detector", "10", "--to", "group:tz", "--waves", "100%", "--window"]
    bad = {
        "0 2 * * *": "CRON;DURATION",  # no duration
        "0 2 * * *;2 hours": "s, m, h or d",
        "0 2 * * *;1h;Europe/Berlin": "device-local",  # a zone where the mode goes
        "61 2 * * *;1h": "5-field crontab",  # the server's planning call refuses these: still exit 2
        "0 0 30 2 *;1h": "never opens",  # 30 February
        "0 2 * * *;30d": "(0 s, 7 d]",
    }
    refused = await asyncio.gather(*(asyncio.to_thread(cli, rig, *start, w) for w in bad))
    for (window, says), r in zip(bad.items(), refused, strict=True):
        assert r.returncode == 2 and says in r.stderr, (window, r.stderr)


BEHAVIOURS["33"] = GOOD


async def test_a_device_offline_while_its_window_is_open_is_told_only_once_it_connects(
    rig: RolloutRig,
) -> None:
    # Told while offline, it would install whenever it reconnected, the window closed or not.
    opened = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    window = rollout_pb2.MaintenanceWindow(cron=f"{opened.minute} {opened.hour} * * *", duration_seconds=3600)
    devices = rig.devices[40:46]
    away = devices[:2]
    for d in away:
        await d.stop()
    rollout_id = await rig.start(
        "33",
        waves="100%",
        min_devices=1,
        windows=[window],
        gates=["install-failures.min_finished_devices=6"],
        selector=await labelled(rig, devices, "away"),
    )
    s = await rig.wait(rollout_id, lambda s: s.waves[0].device_states["healthy"] == 4)
    assert s.waves[0].device_states["pending"] == 2 and s.rollout.state == "running"
    assert any("2 offline devices are told when they connect inside a window" in e.what for e in s.timeline)
    assert not any(a.model.version == "33" for d in away for a in d.received)
    request = operator_pb2.ListDevicesRequest(selector="away=yes")
    desired = {
        d.id: d.desired.version for d in (await rig.server.operator.ListDevices(request, timeout=30)).devices
    }
    assert all(desired[d.id] != "33" for d in away), desired  # not pointed at it: nothing waits for them
    for d in away:
        d.start()
    s = await rig.wait(rollout_id, finished)
    assert s.rollout.state == "completed", s.rollout.reason
    await rig.wait_running("33", devices)
