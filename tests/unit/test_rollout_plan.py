"""The rollout plan, windows and settings: pure parts of the rollout engine."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest

from edgefleet.errors import InvalidRequestError
from edgefleet.server.rollouts import plan
from edgefleet.server.rollouts.settings import (
    RolloutSettings,
    build_gates,
    parse_override,
    wave_gates,
    without_control,
)
from edgefleet.server.rollouts.windows import parse_duration, parse_window

UTC = dt.timezone.utc


def fleet(n: int) -> list[plan.Candidate]:
    runtimes = ["ai-edge-litert", "tflite-runtime"]
    variants = ["float32", "int8", "float16"]
    return [
        plan.Candidate(f"dev-{i:04d}", runtimes[i % 2], variants[i % 3], "small" if i % 5 == 0 else "big")
        for i in range(n)
    ]


def test_waves_parse_counts_and_percentages_cumulatively() -> None:
    steps = plan.parse_waves("5,10%,50%,100%")
    assert plan.wave_sizes(steps, 200) == (5, 20, 100, 200)
    assert plan.wave_sizes(plan.parse_waves("5,10%"), 20) == (5,)  # 10 % of 20 adds nobody: dropped


@pytest.mark.parametrize("bad", ["", "0", "10%,5%", "abc", "150%", "5,3", ",".join(["1"] * 51)])
def test_bad_waves_are_refused_saying_what_to_write(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        plan.parse_waves(bad)


def test_a_ramp_grows_by_its_factor_and_ends_at_the_whole_target() -> None:
    steps = plan.ramp_steps(plan.parse_ramp("2,2,60"), 30)
    assert plan.wave_sizes(steps, 30) == (2, 6, 14, 30)
    with pytest.raises(InvalidRequestError):
        plan.parse_ramp("2,1,60")


def test_the_plan_is_deterministic_and_differs_between_rollouts() -> None:
    devices = fleet(300)
    sizes = plan.wave_sizes(plan.parse_waves("10%,50%,100%"), 300)
    a = plan.plan_waves("ro-aaaa", devices, sizes)
    assert a == plan.plan_waves("ro-aaaa", list(reversed(devices)), sizes)
    assert a[0].members != plan.plan_waves("ro-bbbb", devices, sizes)[0].members


def test_each_wave_is_representative_and_its_control_matches_its_strata() -> None:
    devices = fleet(600)
    by_id = {c.device_id: c for c in devices}
    waves = plan.plan_waves("ro-cccc", devices, plan.wave_sizes(plan.parse_waves("10%,50%,100%"), 600), 1)
    everyone = Counter(plan.stratum_of(c) for c in devices)
    first = Counter(plan.stratum_of(by_id[d]) for d in waves[0].members)
    for key, count in everyone.items():
        assert abs(first[key] - count / 10) <= 1.5, key  # every stratum within one device of its share
    control = Counter(plan.stratum_of(by_id[d]) for d in waves[0].control)
    assert control == first
    assert not set(waves[0].control) & set(waves[0].members)
    assert waves[0].shadow and not waves[1].shadow
    assert waves[-1].control == ()  # nobody is left on the incumbent
    members = [d for w in waves for d in w.members]
    assert sorted(members) == sorted(by_id)  # every device exactly once


def test_windows_open_for_their_duration_in_utc_or_in_the_device_zone() -> None:
    nightly = parse_window("0 2 * * *;2h")
    assert nightly.is_open(dt.datetime(2026, 1, 1, 2, 30, tzinfo=UTC))
    assert not nightly.is_open(dt.datetime(2026, 1, 1, 4, 30, tzinfo=UTC))
    local = parse_window("0 2 * * *;1h;device-local")
    at = dt.datetime(2026, 1, 1, 1, 30, tzinfo=UTC)  # 02:30 in Berlin, 01:30 in UTC
    assert local.is_open(at, "Europe/Berlin")
    assert not local.is_open(at, "")
    assert parse_duration("10m") == 600
    for bad in ("0 2 * *;1h", "0 2 * * *", "61 2 * * *;1h", "0 2 * * *;0s"):
        with pytest.raises(InvalidRequestError):
            parse_window(bad)


def test_every_threshold_is_settable_and_unknown_ones_are_refused() -> None:
    gates = build_gates(
        [parse_override("latency.tolerance=1.5"), parse_override("drift-top-score.enabled=false")],
        shadow=False,
    )
    latency = next(g for g in gates if g.name == "latency")
    assert latency.max_slowdown_percent == pytest.approx(50)  # type: ignore[attr-defined]
    assert "drift-top-score" not in {g.name for g in gates}
    # The shadow candidate runs at a lower CPU priority on purpose: its latency gate is off unless enabled.
    assert {g.name for g in build_gates([], shadow=True)} == {"install-failures", "shadow-agreement"}
    # A shadow wave with nobody left on the incumbent is still judged on agreement, not on installs alone.
    assert {g.name for g in without_control(build_gates([], shadow=True))} == {
        "install-failures",
        "shadow-agreement",
    }
    enabled = build_gates([parse_override("shadow-latency.enabled=true")], shadow=True)
    assert {g.name for g in enabled} == {"install-failures", "shadow-agreement", "shadow-latency"}
    bad_values = ("latency.confidence=1.5", "latency.min_calls=many", "latency.tolerance=fast")
    for bad in ("nope.x=1", "latency.nope=1", *bad_values):
        with pytest.raises(InvalidRequestError):
            build_gates([parse_override(bad)], shadow=False)
    settings = RolloutSettings(waves="5,100%", gates=(parse_override("latency.min_calls=10"),))
    assert RolloutSettings.from_json(settings.to_json()) == settings


def test_only_the_last_wave_is_judged_without_a_control_an_earlier_one_without_holds() -> None:
    last = wave_gates([], shadow=False, last=True, has_control=False)
    assert [g.name for g in last] == ["install-failures"]  # nobody is left on the incumbent
    earlier = {g.name for g in wave_gates([], shadow=False, last=False, has_control=False)}
    assert {"drift-top-class", "latency", "error-rate"} <= earlier  # kept: with no control, inconclusive
    assert earlier == {g.name for g in wave_gates([], shadow=False, last=False, has_control=True)}
    # A shadow wave compares the candidate with the serving model on the same devices: no control needed.
    assert "shadow-agreement" in {g.name for g in wave_gates([], shadow=True, last=False, has_control=False)}
