"""The CLI's exit codes, in one place, and the errors that carry them.

A script can tell "the server refused" (1) from "the command line was wrong" (2), "the rollout finished
with failed devices" (3) and "no server answered" (4), as `kubectl rollout status` lets it.
"""

from __future__ import annotations

OK = 0
FAILED = 1  # the operation failed: the server refused it, something was not found, a local file is bad
USAGE = 2  # the command line was wrong (argparse exits with 2 too)
DEVICES_FAILED = 3  # a `--watch` ended with failed devices
UNREACHABLE = 4  # the server could not be reached
INTERRUPTED = 130  # Ctrl-C

HELP = """exit codes:
  0    done
  1    the operation failed (the server refused it, not found, a bad local file)
  2    usage error
  3    devices failed (a --watch ended with failed devices)
  4    the server could not be reached
  130  interrupted"""


class CliError(Exception):
    """A failure explained for the operator: what went wrong and what to do."""

    exit_code = FAILED


class UsageError(CliError):
    """The command line names something invalid (a bad name, an unknown context)."""

    exit_code = USAGE


class DevicesFailed(CliError):
    """The watched deployment ended with failed devices."""

    exit_code = DEVICES_FAILED


class Interrupted(CliError):
    """Ctrl-C, with what the interrupted command left behind and how to finish it."""

    exit_code = INTERRUPTED


class ServerUnreachable(CliError):
    """No answer from the server (down, wrong address, or its database too busy to answer)."""

    exit_code = UNREACHABLE
