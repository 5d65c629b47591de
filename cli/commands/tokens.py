"""`edgefleet token create`: one-time enrollment tokens for new devices."""

from __future__ import annotations

import argparse

from edgefleet.cli.client import Operator
from edgefleet.cli.output import print_json, rfc3339
from edgefleet.names import check_name
from edgefleet.v1 import operator_pb2


def cmd_token_create(args: argparse.Namespace) -> None:
    check_name("group", args.group)
    op = Operator(args)
    reply = op.call(
        "CreateEnrollmentToken",
        operator_pb2.CreateEnrollmentTokenRequest(group=args.group, uses=args.uses, ttl_seconds=args.ttl),
    )
    if args.json:
        print_json(
            {"token": reply.token, "group": args.group, "expires_at": rfc3339(reply.expires_at_unix_ms)}
        )
    else:
        print(reply.token)
