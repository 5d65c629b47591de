"""`edgefleet`: the operator's command line; this module holds its parser and exit codes.

    edgefleet keys init                        operator keys and the fleet's root.json
    edgefleet server                           run the fleet server (SQLite + files under edgefleet-data/)
    edgefleet token create --group G           an enrollment token for new devices
    edgefleet model push FILE --name N --version V [--eval EVAL.npz]
    edgefleet model list | model show N V
    edgefleet deploy N V --to all|group:G|device:ID [--variant V]
    edgefleet deployments [--watch]            rollout progress
    edgefleet rollback --to all|group:G|device:ID
    edgefleet devices | telemetry DEVICE | events

Every listing takes --json. The commands themselves are in `edgefleet.cli.commands`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from edgefleet.cli.client import CliError
from edgefleet.cli.commands.deployments import cmd_deploy, cmd_deployments, cmd_rollback
from edgefleet.cli.commands.devices import cmd_devices, cmd_events, cmd_revoke, cmd_telemetry
from edgefleet.cli.commands.keys import cmd_keys_init
from edgefleet.cli.commands.models import cmd_model_list, cmd_model_push, cmd_model_show
from edgefleet.cli.commands.server import cmd_server
from edgefleet.cli.commands.tokens import cmd_token_create


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

    # The server's flags belong to the server (edgefleet.server.main): everything after `server` goes there.
    sp = sub.add_parser("server", help="run the fleet server", add_help=False)
    sp.set_defaults(fn=cmd_server)

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
    sp.add_argument(
        "--allow-empty",
        action="store_true",
        help="deploy even when the selector reaches no device yet (devices enrolling later get it)",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `fn` runs the command. `server` keeps what follows it in `server_args`, for
    the server's own parser. A usage error exits with 2 (argparse)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "server":
        args.server_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs one command. Exit codes: 0 done, 1 a failure explained on stderr, 2 a usage error, 130 interrupted."""
    args = parse_args(argv)
    try:
        args.fn(args)
    except CliError as e:
        print(f"edgefleet: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
