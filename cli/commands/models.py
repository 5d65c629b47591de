"""`edgefleet model push | list | show`: upload and sign a version, list versions, a version's variants."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgefleet.cli.client import CliError, Operator
from edgefleet.cli.output import Column, columns, emit, print_json, print_variants, rfc3339, variant_row, when
from edgefleet.cli.publish import push_model, targets_signer
from edgefleet.names import check_name
from edgefleet.v1 import operator_pb2


def cmd_model_push(args: argparse.Namespace) -> None:
    check_name("model name", args.name)
    check_name("version", args.version)
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
        targets_signer(args),
        eval_npz=Path(args.eval).read_bytes() if args.eval else b"",
        calibration_npz=Path(args.calibration).read_bytes() if args.calibration else b"",
        tolerance=args.tolerance,
        measure_without_eval=args.measure,
        quiet=args.json or not sys.stderr.isatty(),
    )
    if args.json:
        print_json(pushed)
        return
    print(
        f"pushed and signed {args.name} {args.version} "
        f"({len(pushed['variants'])} file(s), targets v{pushed['targets_version']})"
    )
    print_variants(pushed["variants"])
    _say_how_measured(pushed["variants"])


def _say_how_measured(rows: list[dict[str, Any]]) -> None:
    notes = {r["measured_on"] for r in rows if r.get("measured_on")}
    for note in sorted(notes):
        print(f"variants measured on {note}")


def cmd_model_list(args: argparse.Namespace) -> None:
    if args.name:
        check_name("model name", args.name)
    reply = Operator(args).call("ListModels", operator_pb2.ListModelsRequest(name=args.name))
    rows = [
        {
            "name": m.name,
            "version": m.version,
            "variant": m.variant,
            "size_bytes": m.length,
            "signed": m.signed,
            "created": rfc3339(m.created_at_unix_ms),
            "sha256": m.sha256,
        }
        for m in reply.models
    ]
    emit(
        args,
        rows,
        columns("name", "version", "variant", "size_bytes", "signed", Column("created", show=when)),
    )


def cmd_model_show(args: argparse.Namespace) -> None:
    check_name("model name", args.name)
    check_name("version", args.version)
    reply = Operator(args).call("ListModels", operator_pb2.ListModelsRequest(name=args.name))
    models = [m for m in reply.models if m.version == args.version]
    if not models:
        raise CliError(f"no model {args.name} {args.version}; see `edgefleet model list`")
    rows = [_row(m.variant, m.length, json.loads(m.details_json or "{}")) for m in models]
    if args.json:
        print_json(rows)
    else:
        print_variants(rows)
        _say_how_measured(rows)


def _row(variant: str, length: int, details: dict[str, Any]) -> dict[str, Any]:
    """`variant_row` and, for variants measured without an eval set, on what (no labels were given)."""
    return {**variant_row(variant, length, details), "measured_on": details.get("measured_on")}
