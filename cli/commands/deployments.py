"""`edgefleet deploy | deployments | rollback`: assign versions, watch rollouts, send devices back."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from edgefleet.cli.client import Operator
from edgefleet.cli.output import emit, when
from edgefleet.cli.publish import authorize_rollback, targets_signer
from edgefleet.v1 import operator_pb2


def cmd_deploy(args: argparse.Namespace) -> None:
    """Asks the server to check the whole deployment first (selector, model, version, variant, that it reaches
    a device), then signs what it needs, then creates it: a command that fails leaves no signed trace."""
    op = Operator(args)
    request = operator_pb2.CreateDeploymentRequest(
        model_name=args.name,
        version=args.version,
        selector=args.to,
        variant=args.variant,
        allow_empty=args.allow_empty,
    )
    plan = op.call("CreateDeployment", _validate_only(request)).deployment
    if plan.devices_targeted == 0 and not args.json:
        print(
            f"{args.to} reaches no device yet: devices that enroll into it later get {args.name} {args.version}"
        )
    signed = authorize_rollback(op, targets_signer(args), {(args.name, args.version)})
    if signed and not args.json:
        print(
            f"{args.name} {args.version} is older than the newest version: signed the permission to go back to it"
        )
    reply = op.call("CreateDeployment", request)
    d = reply.deployment
    if args.json:
        print(json.dumps(_deployment_row(d), indent=2, sort_keys=True))
        return
    print(
        f"deployment {d.id}: {d.model_name} {d.version} to {d.selector}: {d.devices_targeted} device(s), "
        f"{d.devices_notified} told at once"
    )
    for line in d.choices:
        print(f"  {line}")
    for line in d.unassigned:
        print(f"  not assigned: {line}")


def _validate_only(request: Any) -> Any:
    checked = type(request)()
    checked.CopyFrom(request)
    checked.validate_only = True
    return checked


def _deployment_row(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "kind": d.kind,
        "model": f"{d.model_name} {d.version}".strip() or "-",
        "selector": d.selector,
        "variant": d.variant or ("-" if d.kind == "rollback" else "per device"),
        "created": when(d.created_at_unix_ms),
        "targeted": d.devices_targeted,
        "healthy": d.devices_healthy,
        "failed": d.devices_failed,
        "pending": d.devices_pending,
        "superseded": d.devices_superseded,
        "unassigned": list(d.unassigned),
        "choices": list(d.choices),
    }


def cmd_deployments(args: argparse.Namespace) -> None:
    op = Operator(args)
    while True:
        rows = [
            _deployment_row(d)
            for d in op.call("ListDeployments", operator_pb2.ListDeploymentsRequest()).deployments
        ]
        emit(
            args,
            rows,
            [
                "id",
                "kind",
                "model",
                "selector",
                "variant",
                "targeted",
                "healthy",
                "failed",
                "pending",
                "superseded",
            ],
        )
        if not args.watch or not rows or rows[-1]["pending"] == 0:
            return
        time.sleep(args.interval)
        print()


def cmd_rollback(args: argparse.Namespace) -> None:
    """Checked by the server first, then signed, then ordered (see `cmd_deploy`)."""
    op = Operator(args)
    request = operator_pb2.RollbackDevicesRequest(selector=args.to, reason=args.reason)
    plan = op.call("RollbackDevices", _validate_only(request))
    if plan.devices_targeted:
        # Devices go back only with an operator's signature: sign it for the models they would go back to.
        devices = op.call("ListDevices", operator_pb2.ListDevicesRequest(selector=args.to)).devices
        previous = {(d.previous.model_name, d.previous.version) for d in devices if d.previous.target_path}
        authorize_rollback(op, targets_signer(args), previous)
    reply = op.call("RollbackDevices", request)
    result = {
        "command_id": reply.command_id,
        "targeted": reply.devices_targeted,
        "notified": reply.devices_notified,
        "skipped": list(reply.skipped),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"rollback {reply.command_id}: {reply.devices_targeted} device(s), {reply.devices_notified} told at once"
    )
    for line in reply.skipped:
        print(f"  skipped: {line}")
