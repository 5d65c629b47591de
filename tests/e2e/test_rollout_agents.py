"""Staged rollouts through the server's rollout engine with real agents: one fleet for the module (a plaintext
server, three digits agents, an application calling each agent's local API the whole time), driven by the
operator CLI as a user runs it.

    v1 deployed -> rollout of a good v2 in waves 1,2,3, the first in shadow -> completed, every wave passed
                -> rollout of a bad v3 (signed, passes the golden check and the tensor contract, classes 3 and
                   8 swapped) in waves 2,3 -> the drift gate fails it -> aborted, its two devices back on v2

One agent ("cam-r") reaches the server through `devtools.relay.Relay` with `drop_rollbacks`: a middlebox that
loses the control stream's rollback orders. It is a member of v3's first wave (the rollout id is chosen so
that the recorded plan puts it there), and goes back to v2 only because its periodic check
(`--check-interval 1`) reads the pending order and its rollout id from GetAssignment.

The traffic is a camera's unbalanced scene (`devtools.rolloutdemo.scene_calls`), which is what lets a swap of
two classes move the top-class histogram; the gate floors are those a three-device fleet can meet
(`rolloutdemo.SMALL_FLEET_GATES`, the demo's).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.devtools.localfleet import AgentProcess, InferenceLoad, LoadReport, LocalFleet, wait_for
from edgefleet.devtools.modelgen import DigitsData, build_swapped_digits_model
from edgefleet.devtools.relay import Relay
from edgefleet.devtools.rolloutdemo import SMALL_FLEET_GATES, TELEMETRY_ARGS, scene_calls
from edgefleet.server.rollouts.plan import Candidate, plan_waves

V1 = "digits/1/float32.tflite"
V2 = "digits/2/float32.tflite"
V3 = "digits/3/float32.tflite"
GROUP = "cams"
SOAK = "4s"
# Shadow agreement passes on the Wilson lower bound (99 %): even at 100 % agreement that needs ~130 compared
# calls; 50 a second instead of the default 10 gets them within a short soak. Telemetry at the rate the
# server keeps up with, or the gates read reports ever further behind (rolloutdemo.TELEMETRY_ARGS).
AGENT_ARGS = ("--shadow-max-per-s", "50", *TELEMETRY_ARGS)
PERIODIC_REASON = "ordered by an operator (periodic check)"  # device_agent/control.py periodic_check


@dataclass
class Fleet:
    fleet: LocalFleet
    relay: Relay
    agents: list[AgentProcess]  # cam-1, cam-2, cam-r (the relayed one)
    data: DigitsData
    models: Path

    @property
    def relayed(self) -> AgentProcess:
        return self.agents[-1]

    def traffic(self) -> InferenceLoad:
        first, more = scene_calls(self.data.x_test, self.data.y_test)
        return InferenceLoad([a.socket for a in self.agents], first, more=more)


@dataclass
class Rollout:
    rollout_id: str
    started: dict[str, Any]
    status: dict[str, Any]
    load: LoadReport


@pytest.fixture(scope="module")
def on_v1(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[bytes, bytes, DigitsData]
) -> Iterator[Fleet]:
    v1, v2, data = digits
    models = tmp_path_factory.mktemp("rollout-models")
    for name, blob in (("v1", v1), ("v2", v2), ("v3", build_swapped_digits_model(seed=1))):
        (models / f"{name}.tflite").write_bytes(blob)
    fleet = LocalFleet(tmp_path_factory.mktemp("rollout-agents") / "fleet", plaintext=True)
    fleet.init_keys()
    fleet.start_server()
    try:
        with Relay(fleet.port) as relay:
            relay.drop_rollbacks = True
            token = fleet.enrollment_token(group=GROUP, uses=3)
            agents = [fleet.start_agent(n, token, *AGENT_ARGS, wait=False) for n in ("cam-1", "cam-2")]
            agents.append(
                fleet.start_agent(
                    "cam-r",
                    token,
                    *AGENT_ARGS,
                    "--server",
                    relay.address,
                    "--check-interval",
                    "1",
                    wait=False,
                )
            )
            wait_for(
                lambda: len(fleet.devices()) == 3 and all(d["connected"] for d in fleet.devices()),
                60,
                "three devices to enroll and connect",
                interval=0.25,
            )
            fleet.cli("model", "push", str(models / "v1.tflite"), "--name", "digits", "--version", "1")
            fleet.cli("deploy", "digits", "1", "--to", f"group:{GROUP}")
            for agent in agents:
                fleet.wait_running(agent, V1)
            yield Fleet(fleet, relay, agents, data, models)
            for agent in agents:  # before the relay goes: no stream of theirs is cut mid-call
                agent.stop()
    finally:
        fleet.close()


def status(f: Fleet, rollout_id: str) -> dict[str, Any]:
    found: dict[str, Any] = f.fleet.cli_json("rollout", "status", rollout_id)
    return found


def finished(f: Fleet, rollout_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (s := status(f, rollout_id))["state"] in ("completed", "aborted") and s,
        timeout,
        f"rollout {rollout_id} to finish",
        interval=0.5,
    )


@pytest.fixture(scope="module")
def good_v2(on_v1: Fleet) -> Rollout:
    f = on_v1
    f.fleet.cli("model", "push", str(f.models / "v2.tflite"), "--name", "digits", "--version", "2")
    with f.traffic() as load:
        started = f.fleet.cli_json(
            "rollout", "start", "digits", "2", "--to", f"group:{GROUP}", "--waves", "1,2,3",
            "--shadow-waves", "1", "--soak", SOAK, "--min-devices", "1", *SMALL_FLEET_GATES,
        )  # fmt: skip
        rollout_id = started["id"]
        done = finished(f, rollout_id)
        for agent in f.agents:
            f.fleet.wait_running(agent, V2)
        report = copy.deepcopy(load.report)
    return Rollout(rollout_id, started, done, report)


def v3_id_with_relayed_in_first_wave(f: Fleet) -> str:
    """A rollout id whose plan puts the relayed device among the first wave's two. The three devices are one
    stratum (same runtime, variant and hardware), so the order is the devices' sha256 draws alone, as the
    server computes it (rollouts/plan.py); the test checks the recorded plan agrees."""
    candidates = [Candidate(a.device_id()) for a in f.agents]
    for i in range(100):
        rollout_id = f"ro-badv3n{i}"  # ro- and 4-32 lowercase letters or digits
        if f.relayed.device_id() in plan_waves(rollout_id, candidates, (2, 3))[0].members:
            return rollout_id
    raise AssertionError("no rollout id among 100 puts the relayed device in the first wave")


@pytest.fixture(scope="module")
def bad_v3(good_v2: Rollout, on_v1: Fleet) -> Rollout:
    f = on_v1
    f.fleet.cli("model", "push", str(f.models / "v3.tflite"), "--name", "digits", "--version", "3")
    rollout_id = v3_id_with_relayed_in_first_wave(f)
    with f.traffic() as load:
        started = f.fleet.cli_json(
            "rollout", "start", "digits", "3", "--to", f"group:{GROUP}", "--waves", "2,3", "--id", rollout_id,
            "--soak", SOAK, "--min-devices", "1", *SMALL_FLEET_GATES,
        )  # fmt: skip
        done = finished(f, rollout_id)
        for agent in f.agents:
            back_on_v2(f, agent)
        report = copy.deepcopy(load.report)
    return Rollout(rollout_id, started, done, report)


def back_on_v2(f: Fleet, agent: AgentProcess) -> None:
    """Until the agent runs v2 healthily again; fails at once, with the agent's reason, when it refused the
    order (what a device told of it without the rollout's id does: no signed rollback floor allows v2)."""

    def back() -> bool:
        refused = [e["reason"] for e in events(f, agent) if "rollback refused" in e["reason"]]
        if refused:
            raise AssertionError(f"{agent.name} refused the rollback: {refused[-1]}")
        return agent.running() == V2

    wait_for(back, 60, f"{agent.name} to go back to v2", interval=0.5)
    f.fleet.wait_running(agent, V2)


def events(f: Fleet, agent: AgentProcess) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = f.fleet.cli_json("events", "--device", agent.device_id(), "--limit", "300")
    return found


def previous(agent: AgentProcess) -> str:
    return str((agent.state().get("previous") or {}).get("target_path", ""))


def test_a_good_v2_passes_a_shadow_wave_and_two_more_and_every_agent_runs_it(
    good_v2: Rollout, on_v1: Fleet
) -> None:
    s = good_v2.status
    assert s["state"] == "completed", s
    waves = s["waves_status"]
    assert [w["shadow"] for w in waves] == [True, False, False]
    assert [(w["state"], w["outcome"]) for w in waves] == [("passed", "pass")] * 3, waves
    for w in waves:
        assert all(g["outcome"] == "pass" for g in w["gates"]), w["gates"]
    agreement = next(g for g in waves[0]["gates"] if g["gate"] == "shadow-agreement")
    assert agreement["statistic"] == "top1_agreement" and agreement["sample_unit"] == "compared calls"
    assert agreement["threshold"] == pytest.approx(0.95)
    assert agreement["canary_n"] >= 50 and agreement["bound"] >= 0.95 and agreement["value"] >= 0.95
    assert all(a.running() == V2 for a in on_v1.agents)
    # As the operator reads it: the shadow wave's device is counted where it serves now.
    text = on_v1.fleet.cli("rollout", "status", good_v2.rollout_id)
    assert "wave 0 shadow [passed] 1 devices; its devices moved on to the next serving wave" in text, text
    assert good_v2.load.calls > 1000 and good_v2.load.failures == 0, good_v2.load.errors
    # The shadow wave served v1 to the application: v2 answered only once a wave served it.
    assert set(good_v2.load.by_model) == {V1, V2}


def test_a_bad_v3_is_aborted_by_the_drift_gate_with_its_numbers_and_its_devices_go_back_to_v2(
    bad_v3: Rollout, on_v1: Fleet
) -> None:
    s = bad_v3.status
    assert s["state"] == "aborted", s
    assert bad_v3.started["waves"][0]["members"] == 2 and bad_v3.started["waves"][0]["control"] == 1
    first = s["waves_status"][0]
    assert (first["state"], first["outcome"]) == ("failed", "fail")
    failed = [g for g in first["gates"] if g["outcome"] == "fail"]
    drift = next(g for g in failed if g["gate"] == "drift-top-class")
    assert drift["statistic"] == "population_stability_index" and drift["sample_unit"] == "calls"
    assert drift["threshold"] == pytest.approx(0.25) and drift["value"] > drift["threshold"]
    assert drift["canary_n"] >= 200 and drift["control_n"] >= 200
    assert s["waves_status"][1]["state"] == "pending"  # the last wave never started

    had_v3 = [a for a in on_v1.agents if previous(a) == V3]
    assert len(had_v3) == 2 and on_v1.relayed in had_v3
    assert all(a.running() == V2 for a in on_v1.agents)
    control = next(a for a in on_v1.agents if a not in had_v3)
    assert previous(control) == V1  # the control cohort stayed on v2 throughout
    assert bad_v3.load.calls > 500 and bad_v3.load.failures == 0, bad_v3.load.errors
    assert V3 in bad_v3.load.by_model


def test_a_device_whose_stream_lost_the_rollback_order_obeys_it_from_its_periodic_check(
    bad_v3: Rollout, on_v1: Fleet
) -> None:
    relayed, order = on_v1.relayed, f"{bad_v3.rollout_id}-rb"  # the engine's rollback order id
    assert on_v1.relay.dropped_rollbacks >= 1
    assert relayed.state()["rollbacks_done"][-1] == order
    back = [e for e in events(on_v1, relayed) if e["stage"] == "rolled_back" and e["target"] == V2]
    assert [e["reason"] for e in back] == [PERIODIC_REASON], back
    # The device that kept its stream had the order from it.
    other = next(a for a in on_v1.agents if a is not relayed and previous(a) == V3)
    assert other.state()["rollbacks_done"][-1] == order
    assert all(e["reason"] != PERIODIC_REASON for e in events(on_v1, other) if e["stage"] == "rolled_back")
