"""`edgefleet server`: runs the fleet server, reached through one lazy import of its entry module.

The CLI keeps none of the server's flags: everything after `server` goes to `edgefleet.server.main`, which
parses it into a ServerConfig. Where the server's extra is not installed, the command says so.
"""

from __future__ import annotations

import argparse

from edgefleet import errors
from edgefleet.cli.client import CliError

NOT_INSTALLED = 'the server is not installed here: pip install "edgefleet[server]"'


def cmd_server(args: argparse.Namespace) -> None:
    try:
        from edgefleet.server.main import main as run_server
    except ModuleNotFoundError as e:
        # A missing dependency of the server (sqlalchemy, ...) means the extra is not installed; a missing
        # module of our own is a bug and keeps its traceback.
        missing = e.name or ""
        if missing.startswith("edgefleet.") and missing not in ("edgefleet.server", "edgefleet.server.main"):
            raise
        raise CliError(NOT_INSTALLED) from e
    try:
        run_server(args.server_args)
    except errors.EdgefleetError as e:
        raise CliError(str(e)) from e
