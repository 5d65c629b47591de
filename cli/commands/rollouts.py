"""`edgefleet rollout start | list | status | pause | resume | next | abort | retry-failed`: staged rollouts.

`rollout start` asks the server to plan the rollout first (validate_only: selector, model, waves, gates),
then signs the rollout permit into the targets metadata with the operator's targets key (the permission
for devices to go back to the incumbent if this rollout is aborted, limited to it), then starts it. The CLI
proposes the rollout id so the permit can name it; the server refuses a duplicate.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from typing import Any

import grpc

from edgefleet import signing
from edgefleet.cli.client import Operator, failure
from edgefleet.cli.exits import CliError, DevicesFailed, UsageError
from edgefleet.cli.output import Column, emit, escape, print_json, print_json_line, rfc3339, wants_json
from edgefleet.cli.publish import publish_targets, targets_signer
from edgefleet.v1 import operator_pb2, rollout_pb2, rollout_pb2_grpc

FINISHED = ("completed", "aborted")


def _call(op: Operator, method: str, request: Any, timeout: float = 60.0, *, usage: bool = False) -> Any:
    """With `usage`, a request the server calls invalid is the command line's fault: a usage error (exit 2)."""
    stub = rollout_pb2_grpc.RolloutServiceStub(op.channel)
    try:
        return getattr(stub, method)(request, metadata=op.metadata, timeout=timeout)
    except grpc.RpcError as e:
        if usage and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise UsageError(e.details() or "the server refused the command line") from e
        raise failure(e, op.server, op.tls_dir) from e


def authorize_rollout(
    op: Operator, signer: signing.Signer, rollout_id: str, model: str, version: str, selector: str
) -> signing.RolloutPermit:
    """Signs and publishes the rollout permit: devices running `model` `version` may go back to their
    previous version, if it is no older than the oldest version the targeted devices run now, on an order
    naming `rollout_id`. Raises CliError when the version is not signed."""
    devices = op.call("ListDevices", operator_pb2.ListDevicesRequest(selector=selector)).devices
    running = {d.current.version for d in devices if d.current.model_name == model}
    signed: list[signing.RolloutPermit] = []

    def sign(current: bytes | None) -> bytes:
        sequences = signing.model_sequences(current)
        candidate = sequences.get((model, version))
        if candidate is None:
            raise CliError(f"{model} {version} is not in the signed targets; push it first")
        incumbents = [sequences[(model, v)] for v in running if (model, v) in sequences and v != version]
        permit = signing.RolloutPermit(model, candidate, min(incumbents, default=candidate))
        signed[:] = [permit]
        return signing.sign_targets(current, [], signer, rollouts={rollout_id: permit})

    publish_targets(op, sign)
    return signed[0]


def _plan_row(reply: Any) -> dict[str, Any]:
    return {
        "id": reply.rollout_id,  # as `rollout list` and `status` name it
        "selector": reply.selector,
        "target": reply.target,
        "started": reply.started,
        "waves": [
            {
                "index": w.index,
                "shadow": w.shadow,
                "size": w.size,
                "members": len(w.members),
                "control": len(w.control),
            }
            for w in reply.waves
        ],
        "unassigned": list(reply.unassigned),
    }


def cmd_rollout_start(args: argparse.Namespace) -> None:
    if bool(args.waves) == bool(args.ramp):
        raise UsageError(
            "give --waves (e.g. 5,10%,100%) or --ramp BASE,FACTOR,MAX_PER_MIN, not both or neither"
        )
    op = Operator(args)
    rollout_id = args.id or "ro-" + secrets.token_hex(5)
    request = rollout_pb2.StartRolloutRequest(
        rollout_id=rollout_id,
        name=args.rollout_name or rollout_id,
        model_name=args.name,
        version=args.version,
        selector=args.to,
        waves=args.waves,
        ramp=args.ramp,
        soak_seconds=args.soak,
        min_devices=args.min_devices,
        shadow_waves=args.shadow_waves,
        gates=args.gate,
        windows=[
            rollout_pb2.MaintenanceWindow(cron=c, duration_seconds=d, device_local=local)
            for c, d, local in args.window
        ],
        start_at_unix_ms=args.start_at,
        validate_only=True,
    )
    # The planning call checks every argument (selector, waves, gates, the windows' cron expressions).
    plan = _call(op, "StartRollout", request, usage=True)
    if args.dry_run:
        _print_plan(args, plan)
        return
    authorize_rollout(op, targets_signer(args), rollout_id, args.name, args.version, plan.selector)
    request.validate_only = False
    _print_plan(args, _call(op, "StartRollout", request))


def _print_plan(args: argparse.Namespace, reply: Any) -> None:
    row = _plan_row(reply)
    if wants_json(args):
        print_json(row)
        return
    verb = "started" if reply.started else "planned"
    print(f"rollout {reply.rollout_id} {verb}: {reply.target} device(s) of {escape(reply.selector)}")
    for w in row["waves"]:
        kind = " (shadow)" if w["shadow"] else ""
        print(f"  wave {w['index']}{kind}: +{w['members']} -> {w['size']} devices, control {w['control']}")
        if not w["control"] and not w["shadow"] and w is not row["waves"][-1]:
            print("    no later device is of its kind: nothing to compare with, so it will hold until promoted"
                  f" (`edgefleet rollout next {reply.rollout_id}`)")  # fmt: skip
    for line in reply.unassigned:
        print(f"  not assigned: {escape(line)}")


def _summary_row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "model": r.model_name,
        "version": r.version,
        "selector": r.selector,
        "state": r.state,
        "wave": r.current_wave,
        "waves": r.waves,
        "created": rfc3339(r.created_at_unix_ms),
        "finished": rfc3339(r.finished_at_unix_ms),
        "actor": r.actor,
        "reason": r.reason or None,
    }


LIST_COLUMNS = [
    Column("id"),
    Column("name"),
    Column("model"),
    Column("version"),
    Column("selector"),
    Column("state"),
    Column("wave", show=lambda r: f"{r['wave'] + 1}/{r['waves']}", whole_row=True),
    Column("created"),
]


def cmd_rollout_list(args: argparse.Namespace) -> None:
    reply = _call(Operator(args), "ListRollouts", rollout_pb2.ListRolloutsRequest())
    emit(args, [_summary_row(r) for r in reply.rollouts], LIST_COLUMNS)


def status_row(reply: Any) -> dict[str, Any]:
    def number(msg: Any, name: str) -> float | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return {
        **_summary_row(reply.rollout),
        "settings": json.loads(reply.settings_json or "{}"),
        "waves_status": [
            {
                "index": w.index,
                "shadow": w.shadow,
                "size": w.size,
                "state": w.state,
                "started": rfc3339(w.started_at_unix_ms),
                "judged": rfc3339(w.judged_at_unix_ms),
                "outcome": w.outcome or None,
                "devices": dict(sorted(w.device_states.items())),
                "control": w.control_devices,
                "gates": [
                    {
                        "gate": g.gate,
                        "outcome": g.outcome,
                        "statistic": g.statistic,
                        "value": number(g, "value"),
                        "threshold": number(g, "threshold"),
                        "canary_n": g.canary_n,
                        "control_n": g.control_n,
                        "sample_unit": g.sample_unit,
                        "p_value": number(g, "p_value"),
                        "bound": number(g, "bound"),
                        "explanation": g.explanation,
                    }
                    for g in w.gates
                ],
            }
            for w in reply.waves
        ],
        "timeline": [{"at": rfc3339(e.at_unix_ms), "what": e.what} for e in reply.timeline],
    }


def _print_status(row: dict[str, Any]) -> None:
    print(
        f"rollout {row['id']} ({escape(row['name'])}): {row['model']} {row['version']} to {escape(row['selector'])}"
        f" - {row['state']}, wave {row['wave'] + 1}/{row['waves']}"
    )
    if row["reason"]:
        print(f"  reason: {escape(row['reason'])}")
    for w in row["waves_status"]:
        counts = ", ".join(f"{k} {v}" for k, v in w["devices"].items() if v)
        if not counts:  # a passed (or promoted) shadow wave's devices count in the wave that serves them
            moved = w["shadow"] and w["state"] in ("passed", "promoted")
            counts = "its devices moved on to the next serving wave" if moved else "none yet"
        kind = " shadow" if w["shadow"] else ""
        print(
            f"  wave {w['index']}{kind} [{w['state']}] {w['size']} devices; {counts}; control {w['control']}"
        )
        for g in w["gates"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
            threshold = "n/a" if g["threshold"] is None else f"{g['threshold']:.4g}"
            print(
                f"    {g['gate']:<20} {g['outcome']:<12} {value} vs {threshold}: {escape(g['explanation'])}"
            )
    print("  timeline:")
    for e in row["timeline"][-20:]:
        print(f"    {e['at']}  {escape(e['what'])}")


def cmd_rollout_status(args: argparse.Namespace) -> None:
    """`--watch` refreshes until the rollout completes (exit 0) or is aborted (exit 3)."""
    op = Operator(args)
    while True:
        row = status_row(_call(op, "GetRollout", rollout_pb2.GetRolloutRequest(rollout_id=args.id)))
        if args.watch and wants_json(args):
            print_json_line(row)
        elif wants_json(args):
            print_json(row)
        else:
            _print_status(row)
        if not args.watch or row["state"] in FINISHED:
            break
        time.sleep(args.interval)
        if not wants_json(args):
            print()
    if args.watch and row["state"] == "aborted":
        raise DevicesFailed(f"rollout {row['id']} was aborted: {row['reason']}")


def _action(args: argparse.Namespace, method: str, request: Any, done: str) -> None:
    reply = _call(Operator(args), method, request)
    row: dict[str, Any] = {"id": args.id, "action": method}
    for field in reply.DESCRIPTOR.fields:
        row[field.name] = getattr(reply, field.name)
    if wants_json(args):
        print_json(row)
    else:
        print(done.format(**row))


def cmd_rollout_pause(args: argparse.Namespace) -> None:
    _action(
        args,
        "PauseRollout",
        rollout_pb2.PauseRolloutRequest(rollout_id=args.id),
        "rollout {id} paused",
    )


def cmd_rollout_resume(args: argparse.Namespace) -> None:
    _action(
        args,
        "ResumeRollout",
        rollout_pb2.ResumeRolloutRequest(rollout_id=args.id),
        "rollout {id} resumed",
    )


def cmd_rollout_next(args: argparse.Namespace) -> None:
    _action(
        args,
        "NextWave",
        rollout_pb2.NextWaveRequest(rollout_id=args.id),
        "rollout {id}: current wave promoted, now at wave {current_wave}",
    )


def cmd_rollout_abort(args: argparse.Namespace) -> None:
    request = rollout_pb2.AbortRolloutRequest(
        rollout_id=args.id, no_rollback=args.no_rollback, reason=args.reason
    )
    said = (
        "rollout {id} aborted; devices on the candidate stay there (--no-rollback)"
        if args.no_rollback
        else "rollout {id} aborted; devices on the candidate go back (rollback order {rollback_command_id})"
    )
    _action(args, "AbortRollout", request, said)


def cmd_rollout_retry_failed(args: argparse.Namespace) -> None:
    _action(
        args,
        "RetryFailed",
        rollout_pb2.RetryFailedRequest(rollout_id=args.id),
        "rollout {id}: {devices} failed device(s) assigned again, each allowed one more try",
    )
