"""`edgefleet deploy | deployments | rollback`: assign versions, watch rollouts, send devices back."""

from __future__ import annotations

import argparse
import difflib
import time
from typing import Any

import grpc

from edgefleet.cli.client import CliError, DevicesFailed, Operator
from edgefleet.cli.output import Column, emit, escape, print_json, print_json_line, rfc3339, wants_json
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
    try:
        plan = op.call("CreateDeployment", _validate_only(request)).deployment
    except CliError as e:
        if isinstance(e.__cause__, grpc.RpcError) and e.__cause__.code() == grpc.StatusCode.NOT_FOUND:
            raise CliError(f"{e}{_what_there_is(op, args.name, args.version)}") from e
        raise
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
        print_json(_deployment_row(d))
        return
    print(
        f"deployment {d.id}: {d.model_name} {d.version} to {d.selector}: {d.devices_targeted} device(s), "
        f"{d.devices_notified} told at once"
    )
    for line in d.choices:
        print(f"  {escape(line)}")
    for line in d.unassigned:
        print(f"  not assigned: {escape(line)}")


def _what_there_is(op: Operator, name: str, version: str) -> str:
    """For a deploy of a model or version the server does not have (a typo): the versions that model has,
    or the model names close to the one given."""
    models = op.call("ListModels", operator_pb2.ListModelsRequest()).models
    versions = sorted({m.version for m in models if m.name == name} - {version})
    if versions:
        return f"; {name} has version(s) {', '.join(versions[-10:])}"
    close = difflib.get_close_matches(name, sorted({m.name for m in models}), n=3)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _validate_only(request: Any) -> Any:
    checked = type(request)()
    checked.CopyFrom(request)
    checked.validate_only = True
    return checked


def _deployment_row(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "kind": d.kind,
        "model": d.model_name or None,
        "version": d.version or None,
        "selector": d.selector,
        "variant": d.variant or None,  # None: chosen per device (or a rollback)
        "created": rfc3339(d.created_at_unix_ms),
        "targeted": d.devices_targeted,
        "healthy": d.devices_healthy,
        "failed": d.devices_failed,
        "pending": d.devices_pending,
        "superseded": d.devices_superseded,
        "unassigned": list(d.unassigned),
        "choices": list(d.choices),
    }


def _model_cell(row: dict[str, Any]) -> str:
    return f"{row['model'] or ''} {row['version'] or ''}".strip() or "-"


def _variant_cell(row: dict[str, Any]) -> str:
    return row["variant"] or ("-" if row["kind"] == "rollback" else "per device")


# Two cells are derived from several fields (whole_row); the counts are shown as they are.
DEPLOYMENT_COLUMNS = [
    Column("id"),
    Column("kind"),
    Column("model", show=_model_cell, whole_row=True),
    Column("selector"),
    Column("variant", show=_variant_cell, whole_row=True),
    *(Column(c) for c in ("targeted", "healthy", "failed", "pending", "superseded")),
]


def cmd_deployments(args: argparse.Namespace) -> None:
    """Lists deployments; `--watch` refreshes until the newest has no pending device (one NDJSON object per
    deployment and refresh under `--json`) and exits with DEVICES_FAILED when its devices failed."""
    op = Operator(args)
    while True:
        rows = [
            _deployment_row(d)
            for d in op.call("ListDeployments", operator_pb2.ListDeploymentsRequest()).deployments
        ]
        if args.watch and wants_json(args):
            for row in rows[-1:]:
                print_json_line(row)
        else:
            emit(args, rows, DEPLOYMENT_COLUMNS)
        if not args.watch:
            return
        if not rows or rows[-1]["pending"] == 0:
            break
        time.sleep(args.interval)
        if not wants_json(args):
            print()
    if rows and rows[-1]["failed"]:
        newest = rows[-1]
        raise DevicesFailed(
            f"deployment {newest['id']}: {newest['failed']} of {newest['targeted']} device(s) failed; "
            "see `edgefleet events`"
        )


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
        print_json(result)
        return
    print(
        f"rollback {reply.command_id}: {reply.devices_targeted} device(s), {reply.devices_notified} told at once"
    )
    for line in reply.skipped:
        print(f"  skipped: {escape(line)}")
