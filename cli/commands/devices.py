"""`edgefleet devices | revoke | telemetry | events`: what devices run, revoking one, what they reported."""

from __future__ import annotations

import argparse

from edgefleet.cli.client import Operator
from edgefleet.cli.output import emit, human_bytes, ref_text, when
from edgefleet.v1 import operator_pb2


def cmd_devices(args: argparse.Namespace) -> None:
    reply = Operator(args).call("ListDevices", operator_pb2.ListDevicesRequest(selector=args.to))
    rows = [
        {
            "id": d.id,
            "name": d.name,
            "group": d.group,
            "connected": d.connected,
            "runtime": d.capabilities.runtime,
            "running": ref_text(d.current),
            "previous": ref_text(d.previous),
            "desired": ref_text(d.desired),
            "last_stage": d.last_stage or "-",
            "last_reason": d.last_reason,
            "clock_skew_s": round(d.clock_skew_ms / 1000),
            "revoked": d.revoked,
            "last_seen": when(d.last_seen_unix_ms),
        }
        for d in reply.devices
    ]
    emit(
        args,
        rows,
        ["id", "name", "group", "connected", "runtime", "running", "desired", "last_stage", "last_seen"],
    )


def cmd_revoke(args: argparse.Namespace) -> None:
    Operator(args).call("RevokeDevice", operator_pb2.RevokeDeviceRequest(device_id=args.device))
    print(f"revoked {args.device}: its credentials are refused from now on")


def cmd_telemetry(args: argparse.Namespace) -> None:
    reply = Operator(args).call(
        "GetTelemetry", operator_pb2.GetTelemetryRequest(device_id=args.device, limit=args.limit)
    )
    rows = []
    for r in reply.records:
        count = sum(s.count for s in r.inference)
        errors_ = sum(s.errors for s in r.inference)
        latency = sum(s.latency_sum_ms for s in r.inference)
        rows.append(
            {
                "at": when(r.at_unix_ms),
                "cpu_percent": round(r.health.cpu_percent, 1),
                "memory_used": human_bytes(r.health.memory_used_bytes),
                "disk_free": human_bytes(r.health.disk_free_bytes),
                "temperature_c": round(r.health.temperature_celsius, 1)
                if r.health.HasField("temperature_celsius")
                else "-",
                "inferences": count,
                "errors": errors_,
                "mean_latency_ms": round(latency / count, 3) if count else "-",
                "max_latency_ms": round(max((s.latency_max_ms for s in r.inference), default=0), 3),
                "models": ", ".join(s.target_path for s in r.inference),
                "dropped_reports": r.dropped_reports,
            }
        )
    emit(
        args,
        rows,
        [
            "at",
            "cpu_percent",
            "memory_used",
            "inferences",
            "errors",
            "mean_latency_ms",
            "max_latency_ms",
            "models",
        ],
    )


def cmd_events(args: argparse.Namespace) -> None:
    reply = Operator(args).call(
        "ListEvents", operator_pb2.ListEventsRequest(device_id=args.device, limit=args.limit)
    )
    rows = [
        {
            "at": when(e.at_unix_ms),
            "device": e.device_id,
            "stage": e.stage,
            "target": e.target_path,
            "reason": e.reason,
        }
        for e in reply.events
    ]
    emit(args, rows, ["at", "device", "stage", "target", "reason"])
