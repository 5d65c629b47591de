"""`edgefleet config get-contexts | use-context | set-context | view`: the CLI's named contexts."""

from __future__ import annotations

import argparse

from edgefleet.cli import config
from edgefleet.cli.output import columns, emit, print_json, wants_json


def cmd_get_contexts(args: argparse.Namespace) -> None:
    loaded = config.load()
    rows = [
        {"current": name == loaded.current_context, "name": name, **vars(context)}
        for name, context in sorted(loaded.contexts.items())
    ]
    if not rows and not wants_json(args):
        print(f"no contexts in {loaded.path}; add one with `edgefleet config set-context NAME --server ...`")
        return
    emit(args, rows, columns("current", "name", "server", "tls_dir", "keys_dir"))


def cmd_use_context(args: argparse.Namespace) -> None:
    config.save(config.use_context(config.load(), args.name))
    print(f"using context {args.name}")


def cmd_set_context(args: argparse.Namespace) -> None:
    loaded = config.load()
    changed = config.set_context(
        loaded,
        args.name,
        server=args.context_server,
        tls_dir=args.context_tls_dir,
        keys_dir=args.keys_dir_setting,
    )
    config.save(changed)
    print(
        f"context {args.name} saved in {changed.path}"
        + (" (current)" if changed.current_context == args.name else "")
    )


def cmd_view(args: argparse.Namespace) -> None:
    """What a command run here would use, and where each setting comes from."""
    resolved = args.resolved
    view = {
        "config_file": str(config.config_path()),
        "context": resolved.context or None,
        "server": resolved.server,
        "tls_dir": resolved.tls_dir,
        "keys_dir": resolved.keys_dir,
        "sources": resolved.sources,
    }
    if wants_json(args):
        print_json(view)
        return
    print(f"config file: {view['config_file']}")
    print(f"context:     {resolved.context or '(none)'}")
    for key in config.SETTINGS:
        print(f"{key + ':':<12} {getattr(resolved, key)}  ({resolved.sources[key]})")
