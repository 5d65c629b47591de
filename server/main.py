"""`edgefleet server`: the fleet server's entry point. Its flags become a `ServerConfig`; then it serves.

The operator CLI forwards everything after `edgefleet server` to `main` through one lazy import of this
module, so the CLI never imports the server's internals and still runs where the server's extra is not
installed. Flags are parsed only here, at the edge; everything below takes the frozen `ServerConfig`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from edgefleet.logs import FORMATS, setup_logging
from edgefleet.server.app import ServerConfig, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet server", description="run the fleet server")
    p.add_argument("--data-dir", default="edgefleet-data")
    p.add_argument("--listen", default="127.0.0.1:7443", help="devices and operators (mutual TLS)")
    p.add_argument(
        "--enroll-listen",
        default="",
        help="device enrollment (server-side TLS); default: the --listen host, its port + 1",
    )
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="let other processes bind the same ports (SO_REUSEPORT); off so a second server fails to start",
    )
    p.add_argument("--tls-name", action="append", default=[], help="extra DNS name or IP for the server cert")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="NO TLS, bearer tokens: only for a local demo on one machine",
    )
    p.add_argument("--database-url", default="", help="default: sqlite:///<data dir>/fleet.db")
    p.add_argument("--trust-root", default="edgefleet-keys/root.json")
    p.add_argument("--online-key", default="edgefleet-keys/online.key")
    p.add_argument(
        "--device-cert-days",
        type=float,
        default=365,
        help="lifetime of device certificates; devices renew theirs with a third of it left",
    )
    p.add_argument("--ready-file", default="", help="write the bound port here once serving")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines, and the libraries' own INFO lines"
    )
    p.add_argument("--log-format", choices=FORMATS, default="text", help="text, or one JSON object per line")
    return p


def next_port(address: str) -> str:
    """HOST:PORT -> HOST:PORT+1 (port 0, "any free port", stays 0)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return address
    return f"{host}:{int(port) + 1 if int(port) else 0}"


def config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        data_dir=Path(args.data_dir),
        listen=args.listen,
        enroll_listen=args.enroll_listen or next_port(args.listen),
        reuse_port=args.reuse_port,
        insecure_plaintext=args.insecure_plaintext,
        tls_names=tuple(args.tls_name),
        database_url=args.database_url,
        trust_root=Path(args.trust_root),
        online_key=Path(args.online_key),
        device_cert_days=args.device_cert_days,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parses `argv` (what follows `edgefleet server`), sets up logging and serves until SIGTERM or SIGINT.
    Raises errors.EdgefleetError when the server cannot start (missing keys, a database from a newer
    edgefleet, ...)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    asyncio.run(serve(config_from(args), Path(args.ready_file) if args.ready_file else None))
