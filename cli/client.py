"""The CLI's connection to the operator service, and gRPC failures turned into advice for the operator.

`Operator(args)` opens the channel named by the global flags (`--server`, `--tls-dir`, or for a plaintext
demo server `--insecure-plaintext` with `--token-file`); `Operator.call` raises `CliError` with `explain`'s
text instead of a bare `grpc.RpcError`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import grpc

from edgefleet import pki
from edgefleet.v1 import operator_pb2_grpc


class CliError(Exception):
    """A failure explained for the operator: what went wrong and what to do."""


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
