"""`edgefleet keys init`: the operator's signing keys and the fleet's root.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgefleet import errors, signing
from edgefleet.cli.client import CliError


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
