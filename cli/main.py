"""`edgefleet`: the operator's command line; this module holds its parser, global settings and exit codes.

    edgefleet keys init                        operator keys and the fleet's root.json
    edgefleet server                           run the fleet server (SQLite + files under edgefleet-data/)
    edgefleet token create --group G           an enrollment token for new devices
    edgefleet model push FILE --name N --version V [--eval EVAL.npz]
    edgefleet model list | model show N V
    edgefleet deploy N V --to all|group:G|device:ID [--variant V]
    edgefleet deployments [--watch]            rollout progress (exit 3 when devices failed)
    edgefleet rollback --to all|group:G|device:ID
    edgefleet rollout start N V --to SEL --waves 5,10%,100% | list | status ID [--watch] | pause | abort ...
    edgefleet devices [--to SELECTOR] | devices label DEVICE site=berlin camera- [--overwrite]
    edgefleet telemetry DEVICE | events
    edgefleet audit [--since 1h] [--action A] [--verify]
    edgefleet config get-contexts | use-context N | set-context N --server ... | view
    edgefleet completion bash|zsh

Every listing takes --json. The commands live in `edgefleet.cli.commands`, imported only when one runs, so
`edgefleet --help` stays fast (no gRPC, no cryptography). Global settings resolve as flag > environment >
context (`edgefleet.cli.config`) > default after parsing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from edgefleet.cli import config, exits
from edgefleet.cli.commands import rollout_args
from edgefleet.cli.exits import CliError, UsageError
from edgefleet.cli.output import escape
from edgefleet.errors import InvalidRequestError
from edgefleet.names import check_utf8

# Arguments that name local files: any bytes the file system allows. Every other text goes to the server.
PATH_ARGUMENTS = {
    "file", "eval", "calibration", "tls_dir", "keys_dir", "token_file", "targets_key", "dir",
    "context_tls_dir", "keys_dir_setting",
}  # fmt: skip

FORMATTER = argparse.RawDescriptionHelpFormatter

TOP_EPILOG = f"""settings (flag > environment > context > default):
  --server     EDGEFLEET_SERVER     default {config.DEFAULTS["server"]}
  --tls-dir    EDGEFLEET_TLS_DIR    default {config.DEFAULTS["tls_dir"]}
  --keys-dir   EDGEFLEET_KEYS_DIR   default {config.DEFAULTS["keys_dir"]}
  --context    EDGEFLEET_CONTEXT    contexts live in $XDG_CONFIG_HOME/edgefleet/config.toml
               EDGEFLEET_TARGETS_KEY, EDGEFLEET_OPERATOR_TOKEN(_FILE) as their flags say

examples:
  edgefleet config set-context lab --server fleet.lab:7443 --tls-dir ./operator
  edgefleet model push model.tflite --name detector --version 3 --eval eval.npz
  edgefleet deploy detector 3 --to group:lab && edgefleet deployments --watch
  edgefleet devices --json | jq '.[] | select(.connected) | .name'

{exits.HELP}"""


class LazyCommand:
    """A command's function named by module and attribute, imported when it runs (fast `--help`)."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def __call__(self, args: argparse.Namespace) -> None:
        fn = getattr(importlib.import_module(f"edgefleet.cli.commands.{self.module}"), self.attribute)
        fn(args)


class VersionAction(argparse.Action):
    """`--version`: the installed package's version (importlib.metadata is imported only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("edgefleet")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        print(f"edgefleet {text}")
        parser.exit(0)


def add_global_flags(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--context", default=default(None), help="the named context to use (see `edgefleet config`)"
    )
    p.add_argument(
        "--server", default=default(None), help="fleet server HOST:PORT (the mutual-TLS port, 7443)"
    )
    p.add_argument(
        "--tls-dir",
        default=default(None),
        help="the operator's certificate, key and the fleet CA (the server writes them on first start)",
    )
    p.add_argument("--keys-dir", default=default(None), help="the operator's keys (`edgefleet keys init`)")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=default(False),
        help="talk to a server run with --insecure-plaintext (a local demo), using --token-file",
    )
    p.add_argument(
        "--token-file",
        default=default(os.environ.get("EDGEFLEET_OPERATOR_TOKEN_FILE", "edgefleet-data/operator.token")),
        help="the operator token, only for a plaintext demo server",
    )


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 3600]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefleet",
        description="Ship signed TFLite models to fleets of edge devices.",
        epilog=TOP_EPILOG,
        formatter_class=FORMATTER,
    )
    p.add_argument("--version", action=VersionAction)
    add_global_flags(p, defaults=True)
    # The same flags after the command (`edgefleet devices --server X`), as kubectl takes them; SUPPRESS
    # keeps a command's parser from overwriting what was given before it.
    anywhere = argparse.ArgumentParser(add_help=False)
    add_global_flags(anywhere, defaults=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        fn: str,
        help: str,
        examples: str,
        parent: Any = sub,
        listing: bool = False,
        global_flags: bool = True,  # False where a command has flags of its own by those names
    ) -> Any:
        sp = parent.add_parser(
            name,
            help=help,
            description=help,
            parents=[anywhere] if global_flags else [],
            epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
            formatter_class=FORMATTER,
        )
        sp.set_defaults(fn=LazyCommand(*fn.split(":")))
        if listing:
            sp.add_argument("--json", action="store_true", help="print typed JSON instead of a table")
        return sp

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help, description=help).add_subparsers(
            dest=f"{name}_command", required=True, metavar="COMMAND"
        )

    def targets_key(sp: Any, help: str) -> None:
        sp.add_argument("--targets-key", default=None, help=help + " (default: KEYS_DIR/targets.key)")

    keys = group("keys", "operator signing keys")
    sp = add(
        "init", "keys:cmd_keys_init", "create the operator's keys and the fleet's root.json",
        "edgefleet keys init --dir /secure/edgefleet-keys", keys,
    )  # fmt: skip
    sp.add_argument("--dir", default=None, help="where (default: KEYS_DIR)")
    sp.add_argument(
        "--force", action="store_true", help="replace existing keys (devices must be re-provisioned)"
    )

    # The server's flags belong to the server (edgefleet.server.main): everything after `server` goes there.
    sp = sub.add_parser(
        "server", help="run the fleet server (its flags: edgefleet server --help)", add_help=False
    )
    sp.set_defaults(fn=LazyCommand("server", "cmd_server"))

    token = group("token", "enrollment tokens")
    sp = add(
        "create", "tokens:cmd_token_create", "create an enrollment token",
        "edgefleet token create --group lab --uses 10 --ttl 3600", token, listing=True,
    )  # fmt: skip
    sp.add_argument("--group", default="default")
    sp.add_argument("--uses", type=int, default=1, help="how many devices may enroll with it")
    sp.add_argument("--ttl", type=int, default=7 * 86400, help="seconds it stays valid")
    sp.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label its devices get (repeatable)",
    )

    model = group("model", "model versions")
    sp = add(
        "push", "models:cmd_model_push", "upload, validate, compress and sign a model version",
        "edgefleet model push model.tflite --name detector --version 3 --eval eval.npz\n"
        "edgefleet model push model.tflite --name detector --version 4 --calibration calib.npz --json",
        model, listing=True,
    )  # fmt: skip
    sp.add_argument("file")
    sp.add_argument("--name", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument(
        "--eval", default="", help=".npz with x and y (labels) or reference outputs: builds variants"
    )
    sp.add_argument("--calibration", default="", help=".npz with x: also builds a static int8 variant")
    sp.add_argument("--tolerance", type=float, default=1.0, help="accuracy drop (points) a variant may have")
    sp.add_argument(
        "--measure", action="store_true",
        help="without --eval: build variants anyway, measured against the model's own outputs on generated inputs",
    )  # fmt: skip
    targets_key(sp, "signs the version")
    sp = add(
        "list", "models:cmd_model_list", "list model versions and their variants",
        "edgefleet model list --name detector", model, listing=True,
    )  # fmt: skip
    sp.add_argument("--name", default="")
    sp = add(
        "show", "models:cmd_model_show", "the variants table of one version",
        "edgefleet model show detector 3", model, listing=True,
    )  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("version")

    sp = add(
        "deploy", "deployments:cmd_deploy", "assign a version to devices",
        "edgefleet deploy detector 3 --to group:lab\nedgefleet deploy detector 3 --to device:cam-17 --variant int8-dynamic",
        listing=True,
    )  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("version")
    sp.add_argument("--to", required=True, help=SELECTORS)
    sp.add_argument("--variant", default="", help="pin one variant instead of the per-device choice")
    targets_key(sp, "signs the permission to go back when the version is older than the newest")
    sp.add_argument(
        "--allow-empty",
        action="store_true",
        help="deploy even when the selector reaches no device yet (devices enrolling later get it)",
    )

    sp = add(
        "deployments", "deployments:cmd_deployments", "deployments and rollbacks with their progress",
        "edgefleet deployments\n"
        "edgefleet deployments --watch || echo 'devices failed (exit 3)'\n"
        "edgefleet deployments --watch --json      # one JSON object per line (NDJSON)",
        listing=True,
    )  # fmt: skip
    sp.add_argument(
        "--watch",
        action="store_true",
        help="refresh until the newest one has no pending device; exit 3 when devices failed",
    )
    sp.add_argument("--interval", type=positive_seconds, default=2.0, help="seconds between refreshes")

    sp = add(
        "rollback", "deployments:cmd_rollback", "send devices back to their previous model",
        'edgefleet rollback --to group:lab --reason "v3 misses cats"', listing=True,
    )  # fmt: skip
    sp.add_argument("--to", required=True, help=SELECTORS)
    sp.add_argument("--reason", default="ordered by an operator")
    targets_key(sp, "signs the devices' permission to go back")

    sp = add(
        "devices", "devices:cmd_devices", "devices and what they run",
        "edgefleet devices --to group:lab\nedgefleet devices --to 'site in (berlin,paris),camera!=v1'\n"
        "edgefleet devices --json\nedgefleet devices label cam-17 site=berlin camera=v2", listing=True,
    )  # fmt: skip
    sp.add_argument("--to", default="", help=f"only these: {SELECTORS}")
    add_labels_and_audit(sp, add, sub)

    sp = add(
        "revoke", "devices:cmd_revoke", "refuse a device's credentials from now on",
        "edgefleet revoke dev-3f2a9c",
    )  # fmt: skip
    sp.add_argument("device")

    sp = add(
        "telemetry", "devices:cmd_telemetry", "a device's health and inference telemetry",
        "edgefleet telemetry cam-17 --limit 5", listing=True,
    )  # fmt: skip
    sp.add_argument("device", help="the device's id or name")
    sp.add_argument("--limit", type=int, default=20)

    sp = add(
        "events", "devices:cmd_events", "update events reported by devices",
        "edgefleet events --device cam-17\nedgefleet events --json --limit 500", listing=True,
    )  # fmt: skip
    sp.add_argument("--device", default="", help="the device's id or name")
    sp.add_argument("--limit", type=int, default=50)

    # Staged rollouts (cli/commands/rollout_args.py; the commands in rollouts.py).
    rollout_args.add_parsers(add, group, targets_key, positive_seconds)

    cfg = group("config", f"named contexts in {config.config_path()}")
    add(
        "get-contexts", "config:cmd_get_contexts", "list the contexts", "edgefleet config get-contexts",
        cfg, listing=True, global_flags=False,
    )  # fmt: skip
    sp = add(
        "use-context", "config:cmd_use_context", "make a context the current one",
        "edgefleet config use-context lab", cfg, global_flags=False,
    )  # fmt: skip
    sp.add_argument("name")
    sp = add(
        "set-context", "config:cmd_set_context", "create or change a context (paths are stored absolute)",
        "edgefleet config set-context lab --server fleet.lab:7443 --tls-dir ./operator --keys-dir ./keys",
        cfg, global_flags=False,
    )  # fmt: skip
    sp.add_argument("name")
    sp.add_argument("--server", dest="context_server", default=None)
    sp.add_argument("--tls-dir", dest="context_tls_dir", default=None)
    sp.add_argument("--keys-dir", dest="keys_dir_setting", default=None)
    add(
        "view", "config:cmd_view", "the settings a command run here uses, and where each comes from",
        "edgefleet --context lab config view", cfg, listing=True,
    )  # fmt: skip

    sp = add(
        "completion", "completion:cmd_completion", "print a shell completion script",
        "edgefleet completion bash > /etc/bash_completion.d/edgefleet\n"
        'eval "$(edgefleet completion zsh)"   # in ~/.zshrc',
    )  # fmt: skip
    sp.add_argument("shell", choices=("bash", "zsh"))
    return p


# ---- labels and the audit log ------------------------------------------------------------------------------

SELECTORS = "all, device:ID, or group:NAME and/or labels (site=berlin,camera!=v1, 'site in (a,b)', !site)"


def add_labels_and_audit(devices: Any, add: Any, top: Any) -> None:
    """`devices label` under the `devices` listing, and `audit` among the commands (`top`)."""
    sub = devices.add_subparsers(dest="devices_command", required=False, metavar="label")
    sp = add(
        "label", "devices:cmd_label", "set (key=value) or remove (key-) a device's labels",
        "edgefleet devices label cam-17 site=berlin camera=v2\n"
        "edgefleet devices label cam-17 camera-              # removes camera\n"
        "edgefleet devices label cam-17 site=paris --overwrite", sub, listing=True,
    )  # fmt: skip
    sp.add_argument("device", help="the device's id or name")
    sp.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    sp.add_argument("--overwrite", action="store_true", help="allow changing the value of a label it has")
    sp = add(
        "audit", "audit:cmd_audit", "who did what, when: the append-only log of operator actions",
        "edgefleet audit --since 1h\nedgefleet audit --action deployment --json\n"
        "edgefleet audit --verify      # checks the log's hash chain; exit 1 when it was tampered with",
        top, listing=True,
    )  # fmt: skip
    sp.add_argument(
        "--since", default="", help="a duration ago (30m, 1h, 2d) or an ISO time (UTC if no offset)"
    )
    sp.add_argument("--action", default="", help="only this action, or all of a kind (deployment, rollout)")
    sp.add_argument("--limit", type=int, default=100, help="the newest this many (1..1000)")
    sp.add_argument("--verify", action="store_true", help="check the whole log's hash chain")


def _resolve_settings(args: argparse.Namespace) -> None:
    """Fills the global settings by flag > environment > context > default (edgefleet.cli.config)."""
    env = dict(os.environ)
    resolved = config.resolve(
        config.load(),
        {"server": args.server, "tls_dir": args.tls_dir, "keys_dir": args.keys_dir},
        args.context,
        env,
    )
    args.resolved = resolved
    args.server, args.tls_dir, args.keys_dir = resolved.server, resolved.tls_dir, resolved.keys_dir
    if getattr(args, "targets_key", "unset") is None:
        args.targets_key = env.get("EDGEFLEET_TARGETS_KEY") or os.path.join(resolved.keys_dir, "targets.key")
    if getattr(args, "keys_command", "") == "init" and args.dir is None:
        args.dir = resolved.keys_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line with its settings resolved; `fn` runs the command. `server` keeps what follows
    it in `server_args`, for the server's own parser. A usage error exits with 2 (argparse). Raises CliError
    for a config file that cannot be read or an unknown context."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "server":
        args.server_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for key, value in vars(args).items():
        if isinstance(value, str) and key not in PATH_ARGUMENTS:
            try:
                check_utf8(key.replace("_", "-"), value)
            except InvalidRequestError as e:
                raise UsageError(str(e)) from None
    _resolve_settings(args)
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs one command and exits with one of the codes in `edgefleet.cli.exits` (listed in --help)."""
    try:
        args = parse_args(argv)
        args.fn(args)
    except CliError as e:
        # Server details may quote what a device sent: escaped like every human output.
        print(f"edgefleet: {escape(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except InvalidRequestError as e:
        # The shared naming rules refused an argument before any request: the server's own words and code.
        print(f"edgefleet: {escape(str(e))}", file=sys.stderr)
        sys.exit(exits.FAILED)
    except KeyboardInterrupt:
        print("edgefleet: interrupted", file=sys.stderr)
        sys.exit(exits.INTERRUPTED)
    except BrokenPipeError:
        # `edgefleet devices | head`: the reader left; nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(exits.FAILED)


if __name__ == "__main__":
    main()
