"""Publishing as the operator: upload a model, check it, sign every file of it into targets.json, publish.

    push_model          upload -> compare the server's golden data with this machine's own run -> sign -> publish
    authorize_rollback  sign the devices' permission to go back to older versions
    publish_targets     sign on top of the current targets.json and publish, again if another operator won

The targets key never leaves the operator: the server only stores what is signed here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from edgefleet import errors, model_targets, signing
from edgefleet.cli.client import CliError, Operator, failure
from edgefleet.cli.exits import Interrupted
from edgefleet.cli.output import variant_row
from edgefleet.v1 import operator_pb2

CHUNK_BYTES = 256 * 1024
MAX_SIDE_FILE_BYTES = 64 * 2**20  # the server's limit on an eval or calibration set


def targets_signer(args: argparse.Namespace) -> signing.Signer:
    """The targets key named by `--targets-key`; raises CliError when it cannot be loaded."""
    try:
        return signing.load_signer(Path(args.targets_key))
    except errors.SignatureError as e:
        raise CliError(f"{e}: pass --targets-key (created by `edgefleet keys init`)") from e


def _upload_requests(
    header: operator_pb2.UploadModelHeader, data: bytes, quiet: bool, eval_npz: bytes, calibration_npz: bytes
) -> Iterator[Any]:
    """The header, then the eval and calibration sets in chunks (any size up to the server's limit), then
    the model's chunks."""
    from tqdm import tqdm

    yield operator_pb2.UploadModelRequest(header=header)
    for start in range(0, len(eval_npz), CHUNK_BYTES):
        yield operator_pb2.UploadModelRequest(eval_chunk=eval_npz[start : start + CHUNK_BYTES])
    for start in range(0, len(calibration_npz), CHUNK_BYTES):
        yield operator_pb2.UploadModelRequest(calibration_chunk=calibration_npz[start : start + CHUNK_BYTES])
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
    measure_without_eval: bool = False,
    quiet: bool = True,
    edit_custom: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Uploads, checks what the server says about the original against this machine's own run of the model,
    then signs every file (original and variants) into targets.json and publishes it.
    `edit_custom(target_path, custom)` may change what is signed (tests use it to sign bad metadata).
    Raises Interrupted on Ctrl-C, saying what was left on the server."""
    header = operator_pb2.UploadModelHeader(
        name=name,
        version=version,
        length=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        eval_length=len(eval_npz),
        calibration_length=len(calibration_npz),
        tolerance_points=tolerance,
        measure_without_eval=measure_without_eval,
    )
    if max(len(eval_npz), len(calibration_npz)) > MAX_SIDE_FILE_BYTES:
        raise CliError(
            f"the eval and calibration sets are limited to {MAX_SIDE_FILE_BYTES} bytes each: keep fewer rows"
        )
    try:
        requests = _upload_requests(header, data, quiet, eval_npz, calibration_npz)
        reply = op.stub.UploadModel(requests, metadata=op.metadata, timeout=600)
    except grpc.RpcError as e:
        raise failure(e, op.server, op.tls_dir) from e
    except KeyboardInterrupt:
        # The upload is one stream: cancelled, the server stores nothing of it.
        raise Interrupted(f"interrupted during the upload: nothing of {name} {version} was stored") from None
    try:
        return _check_and_sign(op, data, name, version, signer, reply, edit_custom)
    except KeyboardInterrupt:
        # Uploaded, not (or not surely) signed: an unsigned version is refused by deploy until pushed again.
        raise Interrupted(
            f"interrupted while signing: {name} {version} is on the server; while `edgefleet model list` shows "
            "it not SIGNED, no device can get it: run the same `edgefleet model push` again to sign it"
        ) from None


def _check_and_sign(
    op: Operator,
    data: bytes,
    name: str,
    version: str,
    signer: signing.Signer,
    reply: Any,
    edit_custom: Callable[[str, dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from edgefleet.errors import ModelError
    from edgefleet.modelinfo import Golden, run
    from edgefleet.runtime import default_runtime, make_interpreter, runtime_chatter_held_back

    header_sha256 = hashlib.sha256(data).hexdigest()
    if reply.sha256 != header_sha256:
        raise CliError("the server stored different bytes than were sent; not signing")
    variants = list(reply.variants)
    details = {v.target_path: json.loads(v.details_json) for v in variants}
    try:
        original = details[reply.target_path]
        if "golden_file" in original:
            golden_file = model_targets.GoldenFile.from_json(original["golden_file"])
            npz = bytes(reply.original_golden_npz)
            if len(npz) != golden_file.length or hashlib.sha256(npz).hexdigest() != golden_file.sha256:
                raise ModelError("the golden file the server sent is not the one its details name")
            golden = Golden.from_npz(npz)
        else:
            golden = Golden.from_json(original["golden"])
        with runtime_chatter_held_back():  # XNNPACK's "Created delegate" line is not for the operator
            golden.check(run(make_interpreter(default_runtime(), model_content=data), list(golden.inputs)))
    except (ModelError, ValueError, RuntimeError, KeyError, TypeError) as e:
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
            custom = model_targets.model_custom(name, version, v.variant, details[v.target_path], sequence)
            if edit_custom is not None:
                edit_custom(v.target_path, custom)
            target.unrecognized_fields["custom"] = custom
            additions.append(target)
            if "golden_file" in custom:
                # The golden data as a target of its own, signed here with the model that names it.
                golden_file = model_targets.GoldenFile.from_json(custom["golden_file"])
                golden_target = signing.TargetFile(
                    length=golden_file.length, hashes={"sha256": golden_file.sha256}, path=golden_file.path
                )
                golden_target.unrecognized_fields["custom"] = {"golden_of": v.target_path}
                additions.append(golden_target)
        # A new version ends any permission to go back that an earlier rollback signed.
        return signing.sign_targets(current, additions, signer, rollback={name: None})

    versions = publish_targets(op, sign)
    return {
        "already_pushed": reply.already_pushed,  # the same bytes and inputs as before: nothing changed
        "targets_version": versions.targets_version,
        "variants": [
            {
                **variant_row(v.variant, v.length, details[v.target_path]),
                "measured_on": details[v.target_path].get("measured_on"),
            }
            for v in variants
        ],
    }


def _current_targets(op: Operator) -> bytes | None:
    try:
        return bytes(
            op.stub.GetSignedMetadata(
                operator_pb2.GetSignedMetadataRequest(name="targets"), metadata=op.metadata, timeout=30
            ).content
        )
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise failure(e, op.server, op.tls_dir) from e
        return None


def publish_targets(op: Operator, sign: Callable[[bytes | None], bytes]) -> Any:
    """Signs `sign(current targets.json)` and publishes it; signs again on top of another operator's
    publication when that one won the race."""
    for _attempt in range(5):
        signed = sign(_current_targets(op))
        try:
            return op.stub.PublishTargets(
                operator_pb2.PublishTargetsRequest(targets_json=signed), metadata=op.metadata, timeout=30
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not follow" in (e.details() or ""):
                continue
            raise failure(e, op.server, op.tls_dir) from e
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
            found = sequences.get((model, version))
            if found is not None and found < newest.get(model, 0):
                allowed[model] = min(allowed.get(model, found), found)
        return allowed

    signed: dict[str, int] = {}

    def sign(current: bytes | None) -> bytes:
        signed.clear()
        signed.update(lowest(current))
        return signing.sign_targets(current, [], signer, rollback=dict(signed))

    if lowest(_current_targets(op)):
        publish_targets(op, sign)
    return signed
