"""`edgefleet token create`: one-time enrollment tokens for new devices."""

from __future__ import annotations

import argparse
import json

from edgefleet.cli.client import Operator
from edgefleet.v1 import operator_pb2


def cmd_token_create(args: argparse.Namespace) -> None:
    op = Operator(args)
    reply = op.call(
        "CreateEnrollmentToken",
        operator_pb2.CreateEnrollmentTokenRequest(group=args.group, uses=args.uses, ttl_seconds=args.ttl),
    )
    if args.json:
        print(
            json.dumps(
                {"token": reply.token, "group": args.group, "expires_at_unix_ms": reply.expires_at_unix_ms}
            )
        )
    else:
        print(reply.token)
