"""`edgefleet`: the operator's command line.

    edgefleet keys init                        operator keys and the fleet's root.json
    edgefleet server                           run the fleet server (SQLite + files under edgefleet-data/)
    edgefleet token create --group G           an enrollment token for new devices
    edgefleet model push FILE --name N --version V [--eval EVAL.npz]
    edgefleet model list | model show N V
    edgefleet deploy N V --to all|group:G|device:ID [--variant V]
    edgefleet deployments [--watch]            rollout progress
    edgefleet rollback --to all|group:G|device:ID
    edgefleet devices | telemetry DEVICE | events

The CLI is a client of the server's operator service; it signs targets metadata itself with the operator's
key, so the server never holds that key. Every listing takes --json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from edgefleet import errors, pki, signing
from edgefleet.v1 import operator_pb2, operator_pb2_grpc

CHUNK_BYTES = 256 * 1024


class CliError(Exception):
    """A failure explained for the operator: what went wrong and what to do."""


# ---- connection ------------------------------------------------------------------------------------------


def _channel(args: argparse.Namespace) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """Mutual TLS with the operator certificate the server wrote to <data dir>/operator/, or (only for a
    server run as a plaintext demo) a bearer token."""
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    if args.insecure_plaintext:
        token = os.environ.get("EDGEFLEET_OPERATOR_TOKEN", "")
        path = Path(args.token_file)
        if not token and not path.exists():
            raise CliError(f"no operator token at {path}: pass --token-file or set EDGEFLEET_OPERATOR_TOKEN")
        token = token or path.read_text().strip()
        return grpc.insecure_channel(args.server, options=options), (("authorization", f"Bearer {token}"),)
    tls = pki.TlsFiles(Path(args.tls_dir))
    if not tls.exists():
        raise CliError(
            f"no operator certificate in {tls.folder}: the server writes one to <data dir>/operator/ on first "
            "start; pass --tls-dir (or --insecure-plaintext for a server run with --insecure-plaintext)"
        )
    credentials = grpc.ssl_channel_credentials(
        tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()
    )
    return grpc.secure_channel(args.server, credentials, options=options), ()


class Operator:
    """The operator service with credentials attached and gRPC errors turned into advice."""

    def __init__(self, args: argparse.Namespace):
        self.server = args.server
        self.channel, self.metadata = _channel(args)
        self.stub = operator_pb2_grpc.OperatorServiceStub(self.channel)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise CliError(explain(e, self.server)) from e


def explain(e: grpc.RpcError, server: str) -> str:
    code, details = e.code(), e.details()  # type: ignore[attr-defined]
    hint = {
        grpc.StatusCode.UNAUTHENTICATED: "the operator credentials were refused: check --tls-dir (or --token-file).",
        grpc.StatusCode.PERMISSION_DENIED: "these credentials may not do this.",
        grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time; try again.",
        grpc.StatusCode.UNAVAILABLE: f"the server at {server} is unreachable or its database is busy; try again.",
    }.get(code, "")
    return f"{details} ({code.name.lower()}){' — ' + hint if hint else ''}"


# ---- output ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print_table(rows, columns)


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def ref_text(ref: Any) -> str:
    return f"{ref.model_name} {ref.version} ({ref.variant})" if ref.target_path else "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- commands --------------------------------------------------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> None:
    try:
        files = signing.init_keys(Path(args.dir), force=args.force)
    except errors.InvalidRequestError as e:
        raise CliError(str(e)) from e
    print(f"created the fleet's keys in {args.dir}/:")
    print(f"  {files.root.name:<12} root key: keep it offline; it signs root.json")
    print(f"  {files.targets.name:<12} targets key: signs every model you push")
    print(f"  {files.online.name:<12} the server's online key (snapshot/timestamp): give it to the server")
    print(f"  {files.trust_root.name:<12} the trust root devices pin at enrollment")


def cmd_server(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from edgefleet.server.app import ServerConfig, serve

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    config = ServerConfig(
        data_dir=Path(args.data_dir),
        listen=args.listen,
        enroll_listen=args.enroll_listen,
        insecure_plaintext=args.insecure_plaintext,
        tls_names=tuple(args.tls_name),
        database_url=args.database_url,
        trust_root=Path(args.trust_root),
        online_key=Path(args.online_key),
    )
    try:
        asyncio.run(serve(config, Path(args.ready_file) if args.ready_file else None))
    except errors.EdgefleetError as e:
        raise CliError(str(e)) from e


def cmd_token_create(args: argparse.Namespace) -> None:
    op = Operator(args)
    reply = op.call(
        "CreateEnrollmentToken",
        operator_pb2.CreateEnrollmentTokenRequest(group=args.group, uses=args.uses, ttl_seconds=args.ttl),
    )
    if args.json:
        print(
            json.dumps(
                {"token": reply.token, "group": args.group, "expires_at_unix_ms": reply.expires_at_unix_ms}
            )
        )
    else:
        print(reply.token)


def _upload_requests(header: operator_pb2.UploadModelHeader, data: bytes, quiet: bool) -> Iterator[Any]:
    from tqdm import tqdm

    yield operator_pb2.UploadModelRequest(header=header)
    with tqdm(
        total=len(data),
        unit="B",
        unit_scale=True,
        desc=f"upload {header.name} {header.version}",
        disable=quiet,
        leave=False,
    ) as bar:
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = data[start : start + CHUNK_BYTES]
            yield operator_pb2.UploadModelRequest(chunk=chunk)
            bar.update(len(chunk))


def cmd_model_push(args: argparse.Namespace) -> None:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    data = path.read_bytes()
    for option in ("eval", "calibration"):
        if getattr(args, option) and not Path(getattr(args, option)).is_file():
            raise CliError(f"--{option} {getattr(args, option)} is not a file")
    pushed = push_model(
        Operator(args),
        data,
        args.name,
        args.version,
        _targets_signer(args),
        eval_npz=Path(args.eval).read_bytes() if args.eval else b"",
        calibration_npz=Path(args.calibration).read_bytes() if args.calibration else b"",
        tolerance=args.tolerance,
        quiet=args.json or not sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(pushed, indent=2, sort_keys=True))
        return
    print(
        f"pushed and signed {args.name} {args.version} "
        f"({len(pushed['variants'])} file(s), targets v{pushed['targets_version']})"
    )
    print_variants(pushed["variants"])


def push_model(
    op: Operator,
    data: bytes,
    name: str,
    version: str,
    signer: signing.Signer,
    *,
    eval_npz: bytes = b"",
    calibration_npz: bytes = b"",
    tolerance: float = 1.0,
    quiet: bool = True,
    edit_custom: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Uploads, checks what the server says about the original against this machine's own run of the model,
    then signs every file (original and variants) into targets.json and publishes it.
    `edit_custom(target_path, custom)` may change what is signed (tests use it to sign bad metadata)."""
    from edgefleet.errors import ModelError
    from edgefleet.modelinfo import Golden, run
    from edgefleet.runtime import default_runtime, make_interpreter

    header = operator_pb2.UploadModelHeader(
        name=name,
        version=version,
        length=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        eval_npz=eval_npz,
        calibration_npz=calibration_npz,
        tolerance_points=tolerance,
    )
    try:
        reply = op.stub.UploadModel(_upload_requests(header, data, quiet), metadata=op.metadata, timeout=600)
    except grpc.RpcError as e:
        raise CliError(explain(e, op.server)) from e
    if reply.sha256 != header.sha256:
        raise CliError("the server stored different bytes than were sent; not signing")
    variants = list(reply.variants)
    details = {v.target_path: json.loads(v.details_json) for v in variants}
    try:
        golden = Golden.from_json(details[reply.target_path]["golden"])
        golden.check(run(make_interpreter(default_runtime(), model_content=data), list(golden.inputs)))
    except (ModelError, ValueError, RuntimeError, KeyError) as e:
        raise CliError(
            f"the server's golden data for {reply.target_path} does not match this model: {e}"
        ) from e

    def sign(current: bytes | None) -> bytes:
        # The version's order among the model's versions: what devices compare to refuse downgrades.
        sequences = signing.model_sequences(current)
        sequence = sequences.get((name, version)) or 1 + max(
            (seq for (model, _), seq in sequences.items() if model == name), default=0
        )
        additions = []
        for v in variants:
            target = signing.TargetFile(length=v.length, hashes={"sha256": v.sha256}, path=v.target_path)
            custom = signing.model_custom(name, version, v.variant, details[v.target_path], sequence)
            if edit_custom is not None:
                edit_custom(v.target_path, custom)
            target.unrecognized_fields["custom"] = custom
            additions.append(target)
        # A new version ends any permission to go back that an earlier rollback signed.
        return signing.sign_targets(current, additions, signer, rollback={name: None})

    versions = _publish(op, sign)
    return {
        "targets_version": versions.targets_version,
        "variants": [_variant_row(v.variant, v.length, details[v.target_path]) for v in variants],
    }


def _targets_signer(args: argparse.Namespace) -> signing.Signer:
    try:
        return signing.load_signer(Path(args.targets_key))
    except errors.SignatureError as e:
        raise CliError(f"{e}: pass --targets-key (created by `edgefleet keys init`)") from e


def _current_targets(op: Operator) -> bytes | None:
    try:
        return bytes(
            op.stub.GetSignedMetadata(
                operator_pb2.GetSignedMetadataRequest(name="targets"), metadata=op.metadata, timeout=30
            ).content
        )
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise CliError(explain(e, op.server)) from e
        return None


def _publish(op: Operator, sign: Callable[[bytes | None], bytes]) -> Any:
    """Signs `sign(current targets.json)` and publishes it; signs again on top of another operator's
    publication when that one won the race."""
    for _attempt in range(5):
        signed = sign(_current_targets(op))
        try:
            return op.stub.PublishTargets(
                operator_pb2.PublishTargetsRequest(targets_json=signed), metadata=op.metadata, timeout=30
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not follow" in (e.details() or ""):  # type: ignore[attr-defined]
                continue
            raise CliError(explain(e, op.server)) from e
    raise CliError("targets metadata kept changing while publishing; try again")


def authorize_rollback(
    op: Operator, signer: signing.Signer, versions: set[tuple[str, str]]
) -> dict[str, int]:
    """Signs the operator's permission for devices to go back to these (model, version)s when they are
    older than what a device has run. Returns what it signed (model -> lowest sequence allowed)."""

    def lowest(current: bytes | None) -> dict[str, int]:
        sequences = signing.model_sequences(current)
        newest: dict[str, int] = {}
        for (model, _), seq in sequences.items():
            newest[model] = max(newest.get(model, 0), seq)
        allowed: dict[str, int] = {}
        for model, version in versions:
            seq = sequences.get((model, version))
            if seq is not None and seq < newest.get(model, 0):
                allowed[model] = min(allowed.get(model, seq), seq)
        return allowed

    signed: dict[str, int] = {}

    def sign(current: bytes | None) -> bytes:
        signed.clear()
        signed.update(lowest(current))
        return signing.sign_targets(current, [], signer, rollback=dict(signed))

    if lowest(_current_targets(op)):
        _publish(op, sign)
    return signed


def _variant_row(
    variant: str, length: int, d: dict[str, Any], original: bytes | None = None
) -> dict[str, Any]:
    accuracy = d.get("accuracy")
    return {
        "variant": variant,
        "size_bytes": length,
        "wire_bytes": d.get("wire_bytes", length),
        "wire_encoding": d.get("wire_encoding", "identity"),
        "accuracy": accuracy,
        "accuracy_delta_points": d.get("accuracy_delta_points"),
        "max_abs_error": d.get("max_abs_error"),
        "latency_ms": d.get("latency_ms", {}),
        "peak_memory_bytes": d.get("peak_memory_bytes"),
        "runtimes_ok": d.get("runtimes_ok", []),
        "runtimes_failed": d.get("runtimes_failed", {}),
        "excluded": d.get("excluded", ""),
    }


def print_variants(rows: list[dict[str, Any]]) -> None:
    base = next(
        (r["size_bytes"] for r in rows if r["variant"] == "float32"), rows[0]["size_bytes"] if rows else 1
    )
    table = []
    for r in rows:
        latency = ", ".join(f"{k.split('-')[0]} {v:.3f}" for k, v in sorted(r["latency_ms"].items()))
        table.append(
            {
                "variant": r["variant"],
                "size": human_bytes(r["size_bytes"]),
                "wire": f"{human_bytes(r['wire_bytes'])} ({base / max(r['wire_bytes'], 1):.1f}x smaller)",
                "accuracy": f"{r['accuracy'] * 100:.2f}%" if r["accuracy"] is not None else "-",
                "latency_ms": latency or "-",
                "correct_on": ", ".join(r["runtimes_ok"]) or "none",
                "assignable": "no: " + r["excluded"] if r["excluded"] else "yes",
            }
        )
    print_table(table, ["variant", "size", "wire", "accuracy", "latency_ms", "correct_on", "assignable"])


def cmd_model_list(args: argparse.Namespace) -> None:
    reply = Operator(args).call("ListModels", operator_pb2.ListModelsRequest(name=args.name))
    rows = [
        {
            "name": m.name,
            "version": m.version,
            "variant": m.variant,
            "size_bytes": m.length,
            "signed": m.signed,
            "created": when(m.created_at_unix_ms),
            "sha256": m.sha256,
        }
        for m in reply.models
    ]
    emit(args, rows, ["name", "version", "variant", "size_bytes", "signed", "created"])


def cmd_model_show(args: argparse.Namespace) -> None:
    reply = Operator(args).call("ListModels", operator_pb2.ListModelsRequest(name=args.name))
    models = [m for m in reply.models if m.version == args.version]
    if not models:
        raise CliError(f"no model {args.name} {args.version}; see `edgefleet model list`")
    rows = [_variant_row(m.variant, m.length, json.loads(m.details_json or "{}")) for m in models]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print_variants(rows)


def cmd_deploy(args: argparse.Namespace) -> None:
    op = Operator(args)
    signed = authorize_rollback(op, _targets_signer(args), {(args.name, args.version)})
    if signed and not args.json:
        print(
            f"{args.name} {args.version} is older than the newest version: signed the permission to go back to it"
        )
    reply = op.call(
        "CreateDeployment",
        operator_pb2.CreateDeploymentRequest(
            model_name=args.name, version=args.version, selector=args.to, variant=args.variant
        ),
    )
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
    op = Operator(args)
    # Devices go back only with an operator's signature: sign it for the models they would go back to.
    devices = op.call("ListDevices", operator_pb2.ListDevicesRequest(selector=args.to)).devices
    previous = {(d.previous.model_name, d.previous.version) for d in devices if d.previous.target_path}
    authorize_rollback(op, _targets_signer(args), previous)
    reply = op.call(
        "RollbackDevices", operator_pb2.RollbackDevicesRequest(selector=args.to, reason=args.reason)
    )
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


# ---- argument parsing ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="edgefleet", description="Ship signed TFLite models to fleets of edge devices."
    )
    p.add_argument(
        "--server", default=env("EDGEFLEET_SERVER", "127.0.0.1:7443"), help="fleet server HOST:PORT"
    )
    p.add_argument(
        "--tls-dir",
        default=env("EDGEFLEET_TLS_DIR", "edgefleet-data/operator"),
        help="the operator's certificate, key and the fleet CA (the server writes them on first start)",
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="talk to a server run with --insecure-plaintext (a local demo), using --token-file",
    )
    p.add_argument(
        "--token-file",
        default=env("EDGEFLEET_OPERATOR_TOKEN_FILE", "edgefleet-data/operator.token"),
        help="the operator token, only for a plaintext demo server",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: Callable[[argparse.Namespace], None],
        help: str,
        parent: Any = sub,
        listing: bool = False,
    ) -> Any:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if listing:
            sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    keys = sub.add_parser("keys", help="operator signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    sp = add("init", cmd_keys_init, "create the operator's keys and the fleet's root.json", keys)
    sp.add_argument("--dir", default="edgefleet-keys")
    sp.add_argument(
        "--force", action="store_true", help="replace existing keys (devices must be re-provisioned)"
    )

    sp = add("server", cmd_server, "run the fleet server")
    sp.add_argument("--data-dir", default="edgefleet-data")
    sp.add_argument("--listen", default="127.0.0.1:7443", help="devices and operators (mutual TLS)")
    sp.add_argument("--enroll-listen", default="127.0.0.1:7444", help="device enrollment (server-side TLS)")
    sp.add_argument(
        "--tls-name", action="append", default=[], help="extra DNS name or IP for the server cert"
    )
    sp.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="NO TLS, bearer tokens: only for a local demo on one machine",
    )
    sp.add_argument("--database-url", default="", help="default: sqlite:///<data dir>/fleet.db")
    sp.add_argument("--trust-root", default="edgefleet-keys/root.json")
    sp.add_argument("--online-key", default="edgefleet-keys/online.key")
    sp.add_argument("--ready-file", default="", help="write the bound port here once serving")
    sp.add_argument("-v", "--verbose", action="store_true")

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="token_command", required=True
    )
    sp = add("create", cmd_token_create, "create an enrollment token", token, listing=True)
    sp.add_argument("--group", default="default")
    sp.add_argument("--uses", type=int, default=1, help="how many devices may enroll with it")
    sp.add_argument("--ttl", type=int, default=7 * 86400, help="seconds it stays valid")

    model = sub.add_parser("model", help="model versions").add_subparsers(dest="model_command", required=True)
    sp = add(
        "push", cmd_model_push, "upload, validate, compress and sign a model version", model, listing=True
    )
    sp.add_argument("file")
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument(
        "--eval", default="", help=".npz with x and y (labels) or reference outputs: builds variants"
    )
    sp.add_argument("--calibration", default="", help=".npz with x: also builds a static int8 variant")
    sp.add_argument("--tolerance", type=float, default=1.0, help="accuracy drop (points) a variant may have")
    sp.add_argument("--targets-key", default=env("EDGEFLEET_TARGETS_KEY", "edgefleet-keys/targets.key"))
    sp = add("list", cmd_model_list, "list model versions and their variants", model, listing=True)
    sp.add_argument("--name", default="")
    sp = add("show", cmd_model_show, "the variants table of one version", model, listing=True)
    sp.add_argument("name")
    sp.add_argument("version")

    sp = add("deploy", cmd_deploy, "assign a version to devices", listing=True)
    sp.add_argument("name")
    sp.add_argument("version")
    sp.add_argument("--to", required=True, help="all, group:NAME or device:ID")
    sp.add_argument("--variant", default="", help="pin one variant instead of the per-device choice")
    sp.add_argument(
        "--targets-key",
        default=env("EDGEFLEET_TARGETS_KEY", "edgefleet-keys/targets.key"),
        help="signs the permission to go back when the version is older than the newest",
    )

    sp = add("deployments", cmd_deployments, "deployments and rollbacks with their progress", listing=True)
    sp.add_argument("--watch", action="store_true", help="refresh until the newest one has no pending device")
    sp.add_argument("--interval", type=float, default=2.0)

    sp = add("rollback", cmd_rollback, "send devices back to their previous model", listing=True)
    sp.add_argument("--to", required=True, help="all, group:NAME or device:ID")
    sp.add_argument("--reason", default="ordered by an operator")
    sp.add_argument(
        "--targets-key",
        default=env("EDGEFLEET_TARGETS_KEY", "edgefleet-keys/targets.key"),
        help="signs the devices' permission to go back",
    )

    sp = add("devices", cmd_devices, "devices and what they run", listing=True)
    sp.add_argument("--to", default="", help="only these: all, group:NAME or device:ID")

    sp = add("revoke", cmd_revoke, "refuse a device's credentials from now on")
    sp.add_argument("device")

    sp = add("telemetry", cmd_telemetry, "a device's health and inference telemetry", listing=True)
    sp.add_argument("device")
    sp.add_argument("--limit", type=int, default=20)

    sp = add("events", cmd_events, "update events reported by devices", listing=True)
    sp.add_argument("--device", default="")
    sp.add_argument("--limit", type=int, default=50)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except CliError as e:
        print(f"edgefleet: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
