"""`edgefleet devices [label] | revoke | telemetry | events`: what devices run, their labels, revoking one,
what they reported."""

from __future__ import annotations

import argparse
from typing import Any

from edgefleet import labels
from edgefleet.cli.client import Operator
from edgefleet.cli.exits import UsageError
from edgefleet.cli.output import (
    Column,
    columns,
    emit,
    human_bytes,
    print_json,
    ref_text,
    ref_value,
    rfc3339,
    when,
)
from edgefleet.errors import InvalidRequestError
from edgefleet.names import check_name
from edgefleet.selectors import parse_selector
from edgefleet.v1 import operator_pb2


def _device_row(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "group": d.group,
        "labels": dict(sorted(d.labels.items())),
        "connected": d.connected,
        "runtime": d.capabilities.runtime,
        "running": ref_value(d.current),
        "previous": ref_value(d.previous),
        "desired": ref_value(d.desired),
        "last_stage": d.last_stage or None,
        "last_reason": d.last_reason,
        "clock_skew_ms": d.clock_skew_ms,
        "revoked": d.revoked,
        "last_seen": rfc3339(d.last_seen_unix_ms),
    }


def cmd_devices(args: argparse.Namespace) -> None:
    if args.to:
        _selector(args.to)
    reply = Operator(args).call("ListDevices", operator_pb2.ListDevicesRequest(selector=args.to))
    emit(
        args,
        [_device_row(d) for d in reply.devices],
        columns(
            "id",
            "name",
            "group",
            Column("labels", show=lambda v: labels.labels_text(v) or "-"),
            "connected",
            "runtime",
            Column("running", show=ref_text),
            Column("desired", show=ref_text),
            "last_stage",
            Column("last_seen", show=when),
        ),
    )


def _selector(text: str) -> None:
    """A bad selector is a usage error, with the forms, before any request."""
    try:
        parse_selector(text)
    except InvalidRequestError as e:
        raise UsageError(str(e)) from None


def cmd_label(args: argparse.Namespace) -> None:
    check_name("device", args.device)
    try:
        change = labels.edits(args.labels)
    except InvalidRequestError as e:
        raise UsageError(str(e)) from None
    reply = Operator(args).call(
        "LabelDevice",
        operator_pb2.LabelDeviceRequest(
            device_id=args.device, set=dict(change.set), remove=list(change.remove), overwrite=args.overwrite
        ),
    )
    now = dict(sorted(reply.labels.items()))
    if args.json:
        print_json({"device": reply.device_id, "labels": now})
    else:
        print(f"{reply.device_id} labeled: {labels.labels_text(now) or '(no labels)'}")


def cmd_revoke(args: argparse.Namespace) -> None:
    check_name("device id", args.device)
    Operator(args).call("RevokeDevice", operator_pb2.RevokeDeviceRequest(device_id=args.device))
    print(f"revoked {args.device}: its credentials are refused from now on")


def _rounded(digits: int) -> Any:
    return lambda v: "-" if v is None else str(round(v, digits))


def cmd_telemetry(args: argparse.Namespace) -> None:
    check_name("device", args.device)
    reply = Operator(args).call(
        "GetTelemetry", operator_pb2.GetTelemetryRequest(device_id=args.device, limit=args.limit)
    )
    rows = []
    for r in reply.records:
        count = sum(s.count for s in r.inference)
        latency = sum(s.latency_sum_ms for s in r.inference)
        rows.append(
            {
                "at": rfc3339(r.at_unix_ms),
                "cpu_percent": r.health.cpu_percent,
                "memory_used_bytes": r.health.memory_used_bytes,
                "disk_free_bytes": r.health.disk_free_bytes,
                "temperature_c": r.health.temperature_celsius
                if r.health.HasField("temperature_celsius")
                else None,
                "inferences": count,
                "errors": sum(s.errors for s in r.inference),
                "mean_latency_ms": latency / count if count else None,
                "max_latency_ms": max((s.latency_max_ms for s in r.inference), default=0.0),
                "models": [s.target_path for s in r.inference],
                "dropped_reports": r.dropped_reports,
            }
        )
    emit(
        args,
        rows,
        [
            Column("at", show=when),
            Column("cpu_percent", show=_rounded(1)),
            Column("memory_used", "memory_used_bytes", human_bytes),
            Column("inferences"),
            Column("errors"),
            Column("mean_latency_ms", show=_rounded(3)),
            Column("max_latency_ms", show=_rounded(3)),
            Column("models", show=", ".join),
        ],
        empty=f"(no telemetry reported by device {args.device} yet)",
    )


def cmd_events(args: argparse.Namespace) -> None:
    if args.device:
        check_name("device", args.device)
    reply = Operator(args).call(
        "ListEvents", operator_pb2.ListEventsRequest(device_id=args.device, limit=args.limit)
    )
    rows = [
        {
            "at": rfc3339(e.at_unix_ms),
            "device": e.device_id,
            "stage": e.stage,
            "target": e.target_path,
            "reason": e.reason,
        }
        for e in reply.events
    ]
    asked = f" from device {args.device}" if args.device else ""
    emit(
        args,
        rows,
        columns(Column("at", show=when), "device", "stage", "target", "reason"),
        empty=f"(no update events{asked} yet)",
    )
