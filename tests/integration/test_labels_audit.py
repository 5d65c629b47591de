"""Labels, label selectors and the audit log through real RPCs, against a real in-process server on every
database: token labels, `LabelDevice` (kubectl's overwrite rule), deploy / rollback / listing / late
joiners by label selector, an audit entry for each operator action with the caller's certificate name,
and no RPC, called with anything, changing an entry already written."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import database_url

from edgefleet import signing
from edgefleet.audit_chain import AuditEntry, verify
from edgefleet.devtools.raw_rpc import OPERATOR_SERVICE, call, rpcs
from edgefleet.devtools.rpc_harness import Harness, running_harness
from edgefleet.server.storage.records import now_ms
from edgefleet.v1 import operator_pb2
from edgefleet.values import ModelRef

CONFLICT = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    url = "memory://" if request.param == "memory" else database_url(request.param, tmp_path)
    async with running_harness(tmp_path, database_url=url) as h:
        yield h


async def _token(harness: Harness, group: str = "default", uses: int = 1, **labels: str) -> str:
    request = operator_pb2.CreateEnrollmentTokenRequest(group=group, uses=uses, labels=labels)
    return (await harness.operator_stub.CreateEnrollmentToken(request, timeout=10)).token


async def _labels(harness: Harness, selector: str = "") -> dict[str, dict[str, str]]:
    reply = await harness.operator_stub.ListDevices(
        operator_pb2.ListDevicesRequest(selector=selector), timeout=10
    )
    return {d.name: dict(d.labels) for d in reply.devices}


async def _label(harness: Harness, device: str, overwrite: bool = False, *remove: str, **set: str) -> Any:
    request = operator_pb2.LabelDeviceRequest(
        device_id=device, set=set, remove=list(remove), overwrite=overwrite
    )
    return await harness.operator_stub.LabelDevice(request, timeout=10)


async def _deploy(harness: Harness, selector: str, version: str = "1", **flags: bool) -> Any:
    request = operator_pb2.CreateDeploymentRequest(
        model_name="digits", version=version, selector=selector, **flags
    )
    return (await harness.operator_stub.CreateDeployment(request, timeout=10)).deployment


async def _audit(harness: Harness, **fields: Any) -> list[operator_pb2.AuditEntry]:
    reply = await harness.operator_stub.ListAudit(
        operator_pb2.ListAuditRequest(limit=1000, **fields), timeout=10
    )
    return list(reply.entries)


async def _whole_log(harness: Harness) -> tuple[list[AuditEntry], int, str]:
    reply = await harness.operator_stub.ListAudit(
        operator_pb2.ListAuditRequest(from_seq=1, limit=1000), timeout=10
    )
    entries = [
        AuditEntry(
            e.seq, e.at_unix_ms, e.actor, e.action, e.subject, e.details_json, e.previous_sha256, e.sha256
        )
        for e in reply.entries
    ]
    return entries, reply.head_seq, reply.head_sha256


async def test_devices_carry_their_tokens_labels_and_an_operator_changes_them_as_kubectl_does(
    harness: Harness,
) -> None:
    await harness.enroll("cam-1", token=await _token(harness, "lab", site="berlin", camera="v2"))
    await harness.enroll("cam-2")
    assert await _labels(harness) == {"cam-1": {"site": "berlin", "camera": "v2"}, "cam-2": {}}

    reply = await _label(harness, "cam-2", site="paris", tier="")  # by name
    assert dict(reply.labels) == {"site": "paris", "tier": ""}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _label(harness, "cam-2", site="rome")
    assert refused.value.code() == CONFLICT and "--overwrite" in (refused.value.details() or "")
    assert (await _labels(harness))["cam-2"] == {"site": "paris", "tier": ""}  # nothing changed
    reply = await _label(harness, "cam-2", True, "tier", "missing", site="rome")
    assert dict(reply.labels) == {"site": "rome"}


@pytest.mark.parametrize(
    ("request_fields", "why"),
    [
        ({"device_id": "cam-1"}, "give labels"),
        ({"device_id": "cam-1", "set": {"Bad Key": "x"}}, "bad label key"),
        ({"device_id": "cam-1", "set": {"a=b": "c"}}, "bad label key 'a=b'"),
        ({"device_id": "cam-1", "remove": ["a=b1"]}, "bad label key 'a=b1'"),
        ({"device_id": "cam-1", "set": {"site": "a\x1bb"}}, "bad value"),
        ({"device_id": "cam-1", "set": {"site": "x"}, "remove": ["site"]}, "both set and removed"),
        ({"device_id": "cam-1", "set": {f"k{i}": "v" for i in range(65)}}, "at most 64"),
        ({"device_id": "nobody", "set": {"site": "x"}}, "no device"),
        ({"device_id": "", "set": {"site": "x"}}, "bad device id"),
    ],
)
async def test_bad_label_requests_are_refused_saying_what_to_fix(
    harness: Harness, request_fields: dict[str, Any], why: str
) -> None:
    await harness.enroll("cam-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.operator_stub.LabelDevice(operator_pb2.LabelDeviceRequest(**request_fields), timeout=10)
    assert why in (refused.value.details() or "")
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert (await _labels(harness))["cam-1"] == {}


async def test_a_token_with_a_bad_label_is_refused(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _token(harness, site="no spaces")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad value" in (
        refused.value.details() or ""
    )


async def test_deploy_rollback_listing_and_late_joiners_follow_label_selectors(harness: Harness) -> None:
    berlin = await _token(harness, "lab", uses=3, site="berlin")
    await harness.enroll("b-1", token=berlin)
    await harness.enroll("b-2", token=berlin)
    await harness.enroll("p-1", token=await _token(harness, "lab", site="paris"))
    await _label(harness, "b-2", camera="v1")
    await harness.publish_model("digits", "1")
    await harness.publish_model("digits", "2")

    assert set(await _labels(harness, "site=berlin,camera!=v1")) == {"b-1"}
    assert set(await _labels(harness, "group:lab,site in (berlin,paris)")) == {"b-1", "b-2", "p-1"}
    deployment = await _deploy(harness, "site=berlin,camera!=v1")
    assert deployment.selector == "site=berlin,camera!=v1" and deployment.devices_targeted == 1

    await harness.enroll("b-3", token=berlin)  # enrolls later, matches: gets it
    await harness.enroll("p-2", token=await _token(harness, site="paris"))  # does not match
    devices = {
        d.name: d
        for d in (await harness.operator_stub.ListDevices(operator_pb2.ListDevicesRequest())).devices
    }
    assert devices["b-3"].desired.version == "1" and devices["b-1"].desired.version == "1"
    assert not devices["p-2"].desired.target_path and not devices["b-2"].desired.target_path

    with pytest.raises(grpc.aio.AioRpcError) as refused:  # a plan over b-1, b-2, b-3: none can go back yet
        await harness.operator_stub.RollbackDevices(
            operator_pb2.RollbackDevicesRequest(selector="site notin (paris)", validate_only=True), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    skipped = (refused.value.details() or "").count("has no previous model")
    assert skipped == 3, refused.value.details()


async def test_a_bad_selector_is_refused_with_the_valid_forms(harness: Harness) -> None:
    await harness.publish_model("digits", "1")
    for selector in ("site in (a", "group:a,group:b", "host:x", "site=\x1b"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _deploy(harness, selector)
        details = refused.value.details() or ""
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "key in (a,b)" in details
        with pytest.raises(grpc.aio.AioRpcError):
            await harness.operator_stub.ListDevices(operator_pb2.ListDevicesRequest(selector=selector))


async def test_every_operator_action_is_audited_with_who_what_and_the_evidence(harness: Harness) -> None:
    await harness.enroll("cam-1", token=await _token(harness, "lab", uses=2, site="berlin"))
    cam2 = await harness.enroll("cam-2", token=await _token(harness, "lab"))
    await harness.publish_model("digits", "1")
    await _label(harness, "cam-2", site="paris")
    await _deploy(harness, "site=berlin", validate_only=True)  # a plan changes nothing: not audited
    deployment = await _deploy(harness, "site=berlin")
    # What cam-1's report would say after running two versions: a rollback (refused otherwise) can take it back.
    cam1 = next(d for d in harness.fleet.store.list_devices() if d.name == "cam-1")
    ran = [ModelRef(f"digits/{v}/float32.tflite", "digits", v, "float32", "a" * 64, 10) for v in ("0", "1")]
    assert harness.fleet.store.record_status(
        cam1.id, current=ran[1], previous=ran[0], capabilities=cam1.capabilities, bad_targets=(),
        sequence=1, clock_skew_ms=0, seen_ms=now_ms(),
    )  # fmt: skip
    rollback = await harness.operator_stub.RollbackDevices(
        operator_pb2.RollbackDevicesRequest(selector="group:lab", reason="v1 misses cats"), timeout=10
    )
    await harness.operator_stub.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="cam-2"), timeout=10)

    entries = await _audit(harness)
    assert [e.action for e in entries] == [
        "token.create",
        "token.create",
        "device.label",
        "deployment.create",
        "deployment.rollback",
        "device.revoke",
    ]
    assert {e.actor for e in entries} == {"operator"}  # the operator certificate's name
    token, _, label, deploy, back, revoke = entries
    assert token.subject == "lab" and json.loads(token.details_json)["labels"] == {"site": "berlin"}
    assert "enr_" not in token.details_json  # never the token itself
    assert label.subject == cam2.id
    assert json.loads(label.details_json) == {
        "before": {},
        "after": {"site": "paris"},
        "set": {"site": "paris"},
        "removed": [],
        "overwrite": False,
    }
    assert deploy.subject == deployment.id
    evidence = json.loads(deploy.details_json)
    assert (evidence["selector"], evidence["targeted"], evidence["version"]) == ("site=berlin", 1, "1")
    assert back.subject == rollback.command_id and json.loads(back.details_json)["reason"] == "v1 misses cats"
    assert revoke.subject == cam2.id
    assert all(e.at_unix_ms > 0 for e in entries)

    assert [e.action for e in await _audit(harness, action="deployment")] == [
        "deployment.create",
        "deployment.rollback",
    ]
    assert await _audit(harness, since_unix_ms=entries[-1].at_unix_ms + 60_000) == []
    log, head_seq, head = await _whole_log(harness)
    assert verify(log, head_seq, head) == "" and head_seq == 6


async def test_no_operator_rpc_changes_an_audit_entry_already_written(harness: Harness) -> None:
    """Walks every OperatorService method (a new one is covered too) with an empty request and with bytes
    that name the existing entries; the entries written before are unchanged and the chain still holds."""
    await harness.enroll("cam-1", token=await _token(harness, site="berlin"))
    await _label(harness, "cam-1", camera="v2")
    before, _, _ = await _whole_log(harness)
    assert len(before) == 2
    aimed = [
        b"",
        operator_pb2.ListAuditRequest(from_seq=1, limit=1).SerializeToString(),
        operator_pb2.LabelDeviceRequest(
            device_id="cam-1", remove=["camera"], overwrite=True
        ).SerializeToString(),
        b"\x08\x01\x12\x00" + before[0].sha256.encode(),
    ]
    answered: dict[str, set[grpc.StatusCode]] = {}
    for method in rpcs(OPERATOR_SERVICE):
        for message in aimed:
            outcome = await call(harness.operator, method, [message])
            answered.setdefault(method.name, set()).add(outcome.code)
    assert grpc.StatusCode.OK in answered["ListAudit"] and grpc.StatusCode.OK in answered["LabelDevice"]
    after, head_seq, head = await _whole_log(harness)
    assert after[: len(before)] == before
    assert verify(after, head_seq, head) == ""
    assert not any(
        m.name.lower().startswith(("update", "delete", "remove", "edit")) for m in rpcs(OPERATOR_SERVICE)
    )


async def test_bad_audit_queries_are_refused(harness: Harness) -> None:
    for fields in ({"action": "Deploy Now"}, {"since_unix_ms": -1}, {"from_seq": -5}, {"limit": -1}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.operator_stub.ListAudit(operator_pb2.ListAuditRequest(**fields), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _publish(harness: Harness) -> Any:
    current = (
        await harness.fleet.repository.current_metadata("targets")
        if harness.fleet.store.repo_versions().targets
        else None
    )
    signed = signing.sign_targets(current, [], signing.load_signer(harness.keys.targets))
    return await harness.operator_stub.PublishTargets(
        operator_pb2.PublishTargetsRequest(targets_json=signed), timeout=10
    )


async def test_a_publish_is_audited_with_its_signing_keys_and_a_key_change_is_called_out(
    harness: Harness,
) -> None:
    await _publish(harness)
    [first] = await _audit(harness, action="targets")
    evidence = json.loads(first.details_json)
    assert (
        first.subject == "targets v1" and evidence["targets_version"] == 1 and evidence["root_version"] == 1
    )
    [targets_key] = evidence["signed_by"]

    # What the server would hold after a root rotation gave targets another key: v1 signed by another key
    # id (root rotation has no RPC yet, so the stored file is rewritten, as a rotation would leave it).
    store = harness.fleet.store
    stored = json.loads(store.get_metadata("1.targets"))
    stored["signatures"][0]["keyid"] = "f" * 64
    versions = store.repo_versions()
    store.put_metadata({"1.targets": json.dumps(stored).encode()}, versions, versions)
    await _publish(harness)
    change = (await _audit(harness, action="keys"))[-1]
    assert change.action == "keys.change" and change.subject == "targets v2"
    assert json.loads(change.details_json) == {
        "role": "targets",
        "before": ["f" * 64],
        "after": [targets_key],
        "root_version": 1,
    }


async def test_large_evidence_is_answered_in_pages_that_fit_a_message(harness: Harness) -> None:
    for i in range(80):  # the rollout engine's evidence can be large: 80 x 60 KiB is past one answer
        await harness.fleet.audit.record("engine", "rollout.gate", f"ro-{i}", {"samples": "x" * 60_000})
    newest = await _audit(harness)
    assert 0 < len(newest) < 80 and newest[-1].seq == 80  # the newest that fit
    log, head_seq, head = await _whole_log(harness)
    assert log[0].seq == 1 and len(log) < 80
    while log[-1].seq < head_seq:
        reply = await harness.operator_stub.ListAudit(
            operator_pb2.ListAuditRequest(from_seq=log[-1].seq + 1, limit=1000), timeout=10
        )
        log += [
            AuditEntry(
                e.seq, e.at_unix_ms, e.actor, e.action, e.subject, e.details_json, e.previous_sha256, e.sha256
            )
            for e in reply.entries
        ]
    assert verify(log, head_seq, head) == ""
