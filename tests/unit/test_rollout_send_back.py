"""What an abort orders each kind of rollout member (`server.rollouts.send_back.order_back`), on the memory
store: back from the candidate, stopped while installing or in shadow (also a shadow wave's member moved to
a serving wave it was not told yet), left alone when never told, and counted when it has nothing to go back
to. The engine's store is real; its control streams are a recorder (no device is connected here)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from edgefleet.server.rollouts.engine import Loaded
from edgefleet.server.rollouts.send_back import SentBack, order_back
from edgefleet.server.rollouts.settings import RolloutSettings
from edgefleet.server.rules import pending_rollback
from edgefleet.server.storage import open_store
from edgefleet.server.storage.records import DeviceRecord, ModelRecord
from edgefleet.server.storage.rollout_records import MemberRecord, RolloutRecord
from edgefleet.server.streams import AssignmentPush, RollbackPush
from edgefleet.values import ModelRef

V1, V2 = "detector/1/float32.tflite", "detector/2/float32.tflite"
RID = "ro-abcd"


class Pushes:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def push(self, device_id: str, push: Any) -> bool:
        self.sent.append((device_id, push))
        return True


def ref(path: str) -> ModelRef:
    return ModelRef(path, "detector", path.split("/")[1])


def fleet() -> tuple[Any, Pushes, Loaded]:
    store = open_store("memory://")
    for path in (V1, V2):
        store.add_model(ModelRecord(path, "detector", path.split("/")[1], "float32", "00" * 32, 1, {}, 1))
    store.add_enrollment_token("t", "default", 10, 1 << 60)
    devices = {  # id -> (current, previous, desired target, desired deployment)
        "on-v2": (V2, V1, V2, f"{RID}-w0"),
        "installing": (V1, None, V2, f"{RID}-w0"),
        "moved-shadow": (V1, None, V2, f"{RID}-w0"),  # passed a shadow wave; wave 1 has not told it yet
        "no-previous": (V2, None, V2, f"{RID}-w0"),
        "later-wave": (V1, None, V1, "dep-1"),
    }
    for i, (device_id, (current, previous, target, deployment)) in enumerate(devices.items()):
        record = DeviceRecord(
            device_id,
            device_id,
            "default",
            1,
            current=ref(current),
            previous=ref(previous) if previous else None,
            desired_target=target,
            desired_deployment=deployment,
        )
        assert store.enroll_device("t", 2, record, f"credential-{i}")
    members = [
        MemberRecord(RID, "on-v2", 0, "canary", "healthy", V2, assigned_ms=5),
        MemberRecord(RID, "installing", 0, "canary", "downloading", V2, assigned_ms=5),
        MemberRecord(RID, "moved-shadow", 1, "canary", "pending", V2),
        MemberRecord(RID, "no-previous", 0, "canary", "healthy", V2, assigned_ms=5),
        MemberRecord(RID, "later-wave", 1, "canary", "pending", V2),
        MemberRecord(RID, "later-wave", 0, "control"),
    ]
    settings = RolloutSettings(waves="1,100%")
    rollout = RolloutRecord(RID, RID, "detector", "2", "all", 1, "op", settings.to_json())
    pushes = Pushes()

    async def model(path: str) -> ModelRecord:
        return store.get_model(path)

    deployments = SimpleNamespace(streams=pushes, repository=SimpleNamespace(model=model))
    engine = SimpleNamespace(store=store, clock=lambda: 10, tag=lambda *a: None, deployments=deployments)
    return engine, pushes, Loaded(rollout, settings, [], members)


def run(engine: Any, ro: Loaded, order_id: str) -> SentBack:
    devices = {d.id: d for d in engine.store.list_devices()}
    return asyncio.run(order_back(engine, ro, devices, order_id, "wave 0 failed"))


def test_an_abort_sends_back_stops_and_counts_each_kind_of_member() -> None:
    engine, pushes, ro = fleet()
    assert run(engine, ro, f"{RID}-rb") == SentBack(on_candidate=1, stranded=1)
    store = engine.store
    desired = {d.id: (d.desired_target, d.desired_deployment) for d in store.list_devices()}
    assert desired["on-v2"] == (V1, f"{RID}-rb")
    assert desired["installing"] == desired["moved-shadow"] == (V1, f"{RID}-rb")
    assert desired["no-previous"] == (V2, f"{RID}-w0")  # nothing to go back to: it stays
    assert desired["later-wave"] == (V1, "dep-1")  # never told: untouched
    sent = {device_id: push for device_id, push in pushes.sent}
    assert sent["on-v2"] == RollbackPush(f"{RID}-rb", "wave 0 failed", RID)
    for stopped in ("installing", "moved-shadow"):  # told to run what they run: a shadow is dropped
        push = sent[stopped]
        assert isinstance(push, AssignmentPush) and push.model.target_path == V1 and not push.shadow
        assert (push.deployment_id, push.rollout_id) == (f"{RID}-rb", RID)
    assert set(sent) == {"on-v2", "installing", "moved-shadow"}

    # The installing one finishes the candidate after the abort: its report finds the order pending.
    store.record_status(
        "installing",
        current=ref(V2),
        previous=ref(V1),
        capabilities=store.get_device("installing").capabilities,
        bad_targets=(),
        sequence=1,
        clock_skew_ms=0,
        seen_ms=20,
    )
    assert pending_rollback(store.get_device("installing")) == f"{RID}-rb"


def test_an_abort_without_rollback_leaves_the_candidate_and_stops_the_rest() -> None:
    engine, pushes, ro = fleet()
    assert run(engine, ro, "") == SentBack(on_candidate=0, stranded=1)
    desired = {
        d.id: (d.desired_target, d.desired_deployment, d.rollback_command)
        for d in engine.store.list_devices()
    }
    assert desired["on-v2"] == (V2, f"{RID}-w0", "")
    assert desired["installing"] == (V1, f"{RID}-stop", "")
    assert {device_id for device_id, _ in pushes.sent} == {"installing", "moved-shadow"}
    assert not any(isinstance(push, RollbackPush) for _, push in pushes.sent)
