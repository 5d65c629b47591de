"""What the servicers share: edgefleet errors -> gRPC status codes, and the checks a request's fields pass
before the logic sees them.

`status_for_errors` is the one translator: our errors become their status code with a bounded message;
anything unexpected becomes INTERNAL, logged in full, with nothing of it sent to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from edgefleet import errors, selectors

log = logging.getLogger("edgefleet.server")

_STATUS = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AccessDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.SignatureError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.IncompatibleError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ArtifactError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.MetadataError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.HashMismatchError, grpc.StatusCode.INVALID_ARGUMENT),  # an upload: the caller's bytes are wrong
    (errors.TransportError, grpc.StatusCode.UNAVAILABLE),
)

# A full disk (or quota, or the process's file-size limit) while writing: the write is abandoned and nothing is
# recorded; the caller may try again once there is room.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL = "the server is out of disk space for its data folder; nothing was recorded: free space there, then try again"

# Error messages quote what the caller sent; unbounded, one can exceed the caller's metadata limit (8 KiB by
# default) and turn a clear INVALID_ARGUMENT into a client-side RESOURCE_EXHAUSTED.
MAX_DETAILS = 1000


@contextlib.asynccontextmanager
async def status_for_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Our errors become their status code with their message; anything else is INTERNAL, logged in full."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except DecodeError:
        # A request stream's elements are parsed as the handler reads them, so a malformed one surfaces
        # here: the caller's error, not the server's.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
    except errors.EdgefleetError as e:
        details = str(e) if len(str(e)) <= MAX_DETAILS else str(e)[:MAX_DETAILS] + "..."
        for kind, code in _STATUS:
            if isinstance(e, kind):
                await context.abort(code, details)
        await context.abort(grpc.StatusCode.INTERNAL, details)
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except OSError as e:
        if e.errno not in _DISK_FULL:
            log.exception("unexpected error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        # Not the caller's fault and not a bug: the operator can act on it, so say it (without the path).
        log.error("out of disk space: %s", e)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, DISK_FULL)
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")


def check_name(what: str, value: str, *, optional: bool = False) -> str:
    """`selectors.check_name`, where `optional` lets an empty value through."""
    if optional and not value:
        return value
    return selectors.check_name(what, value)


def check_target_path(path: str) -> str:
    """A repository file: "/"-separated plain names ("digits/2/float32.tflite"), never empty, absolute or
    with "." / ".." segments."""
    if not 0 < len(path) <= 512:
        raise errors.InvalidRequestError("target path must be 1..512 characters")
    for part in path.split("/"):
        check_name("target path segment", part)
    return path
