"""`edgefleet token create`: one-time enrollment tokens for new devices."""

from __future__ import annotations

import argparse

from edgefleet import labels
from edgefleet.cli.client import Operator
from edgefleet.cli.exits import UsageError
from edgefleet.cli.output import print_json, rfc3339
from edgefleet.errors import InvalidRequestError
from edgefleet.names import check_name
from edgefleet.v1 import operator_pb2


def token_labels(words: list[str]) -> dict[str, str]:
    """`--label site=berlin` given any number of times; a bad or repeated one is a usage error."""
    found: dict[str, str] = {}
    try:
        for word in words:
            key, value = labels.parse_label(word)
            if key in found:
                raise InvalidRequestError(f"label {key!r} is given twice")
            found[key] = value
        return labels.check_labels(found)
    except InvalidRequestError as e:
        raise UsageError(str(e)) from None


def cmd_token_create(args: argparse.Namespace) -> None:
    check_name("group", args.group)
    given = token_labels(args.label)
    op = Operator(args)
    reply = op.call(
        "CreateEnrollmentToken",
        operator_pb2.CreateEnrollmentTokenRequest(
            group=args.group, uses=args.uses, ttl_seconds=args.ttl, labels=given
        ),
    )
    if args.json:
        print_json(
            {
                "token": reply.token,
                "group": args.group,
                "labels": given,
                "expires_at": rfc3339(reply.expires_at_unix_ms),
            }
        )
    else:
        print(reply.token)
