"""The CLI's connection to the operator service, and gRPC failures turned into advice for the operator.

`Operator(args)` opens the channel named by the global flags (`--server`, `--tls-dir`, or for a plaintext
demo server `--insecure-plaintext` with `--token-file`); `Operator.call` raises `CliError` (or one of its
kinds in `edgefleet.cli.exits`, which carry the exit code) with `explain`'s text instead of a bare
`grpc.RpcError`. The TLS folder is checked before any call, so a missing, unreadable or mismatched file is
named as such rather than reported as an unreachable server.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature

from edgefleet import pki
from edgefleet.cli.exits import CliError, DevicesFailed, ServerUnreachable, UsageError
from edgefleet.v1 import operator_pb2_grpc

__all__ = ["CliError", "DevicesFailed", "Operator", "ServerUnreachable", "UsageError", "explain", "failure"]

ENROLL_PORT_HINT = (
    "{server} answers, but not as the operator service: it looks like the enrollment port (7444 by default), "
    "which serves only device enrollment. Point --server at the server's main port (7443 by default)"
)


def _read(path: Path, what: str, tls_dir: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CliError(
            f"the operator's TLS folder {tls_dir} has no {path.name} ({what}): the server writes ca.crt, "
            "tls.crt and tls.key to <data dir>/operator/ on first start; copy that folder here or pass "
            "--tls-dir (or --insecure-plaintext for a server run with --insecure-plaintext)"
        ) from None
    except OSError as e:
        raise CliError(f"cannot read {path} ({what}): {e.strerror}") from None


def _check_tls(ca: bytes, cert: bytes, tls_dir: Path) -> None:
    """The operator certificate must be issued by the CA beside it, or the handshake fails obscurely."""
    try:
        ca_cert, own = pki.load_cert(ca), pki.load_cert(cert)
    except ValueError as e:
        raise CliError(f"{tls_dir}: ca.crt or tls.crt is not a PEM certificate ({e})") from None
    try:
        own.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CliError(
            f"{tls_dir}/tls.crt was not issued by {tls_dir}/ca.crt: the folder mixes files of two fleets; "
            "copy <data dir>/operator/ from the server again"
        ) from None


def _channel(args: argparse.Namespace) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    """Mutual TLS with the operator certificate the server wrote to <data dir>/operator/, or (only for a
    server run as a plaintext demo) a bearer token."""
    options = [("grpc.max_send_message_length", 64 * 2**20)]
    if not re.search(r":\d+$", args.server) and not args.server.startswith("unix:"):
        # gRPC would quietly try port 443.
        raise UsageError(
            f"server {args.server!r} has no port: give HOST:PORT (the main port is 7443 by default)"
        )
    if args.insecure_plaintext:
        token = os.environ.get("EDGEFLEET_OPERATOR_TOKEN", "")
        path = Path(args.token_file)
        if not token and not path.exists():
            raise CliError(f"no operator token at {path}: pass --token-file or set EDGEFLEET_OPERATOR_TOKEN")
        token = token or _read(path, "the operator token", path.parent).decode().strip()
        return grpc.insecure_channel(args.server, options=options), (("authorization", f"Bearer {token}"),)
    tls = pki.TlsFiles(Path(args.tls_dir))
    if not tls.folder.is_dir():
        raise CliError(
            f"no operator TLS folder {tls.folder}: the server writes one to <data dir>/operator/ on first "
            "start; pass --tls-dir, set EDGEFLEET_TLS_DIR or a context's tls_dir (or --insecure-plaintext "
            "for a server run with --insecure-plaintext)"
        )
    ca = _read(tls.ca, "the fleet CA certificate", tls.folder)
    cert = _read(tls.cert, "the operator certificate", tls.folder)
    key = _read(tls.key, "the operator's private key", tls.folder)
    _check_tls(ca, cert, tls.folder)
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.secure_channel(args.server, credentials, options=options), ()


class Operator:
    """The operator service with credentials attached and gRPC errors turned into advice."""

    def __init__(self, args: argparse.Namespace):
        self.server = args.server
        self.tls_dir = "" if args.insecure_plaintext else str(args.tls_dir)
        self.channel, self.metadata = _channel(args)
        self.stub = operator_pb2_grpc.OperatorServiceStub(self.channel)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise failure(e, self.server, self.tls_dir) from e


def explain(e: grpc.RpcError, server: str, tls_dir: str = "") -> str:
    """The failure's text for the operator (see `failure`)."""
    return str(failure(e, server, tls_dir))


def failure(e: grpc.RpcError, server: str, tls_dir: str = "") -> CliError:
    """The failure as the operator should read it, as the CliError kind that carries its exit code:
    ServerUnreachable when nothing answered. The server's refusal of a request (invalid, not found, denied)
    is final, never "try again"."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNIMPLEMENTED and details.startswith("Method not found"):
        return CliError(ENROLL_PORT_HINT.format(server=server))
    if code == grpc.StatusCode.UNAVAILABLE:
        if tls_dir and ("handshake" in details.lower() or "certificate" in details.lower()):
            return ServerUnreachable(
                f"the TLS handshake with {server} failed: the server's certificate is not from the CA in "
                f"{tls_dir}/ca.crt, or it refused the operator certificate in {tls_dir}; copy "
                f"<data dir>/operator/ of this server to {tls_dir} ({details})"
            )
        if details.startswith("database unavailable"):  # the server answered: its storage did not
            return ServerUnreachable(
                f"the server at {server} answered, but its database did not ({details}); try again, and see "
                "the server's log if it lasts"
            )
        return ServerUnreachable(
            f"the server at {server} is unreachable; check --server (or EDGEFLEET_SERVER, or the context) "
            f"and that the server runs, then try again ({details})"
        )
    hint = {
        grpc.StatusCode.UNAUTHENTICATED: "the operator credentials were refused: check --tls-dir (or --token-file).",
        grpc.StatusCode.PERMISSION_DENIED: "these credentials may not do this.",
        grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time; try again.",
    }.get(code, "")
    error = ServerUnreachable if code == grpc.StatusCode.DEADLINE_EXCEEDED else CliError
    return error(f"{details} ({code.name.lower()}){' — ' + hint if hint else ''}")
