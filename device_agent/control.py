"""The control stream to the server, what the agent says on it, and the metadata bridge for python-tuf.

    connect -> the server's hello (the last sequence it accepted) -> the device's status first (every time)
            -> the last event it sent, again (lost in flight if the server died) -> queued events and status,
               in order, each stamped when sent with the next number of one
               persisted counter (continued from the hello, so a device that lost its state is not stale)
    server  -> assignment: `on_assignment(ref, shadow, retry_order)`; rollback order: `on_rollback(command_id, reason,
               rollout_id)`
    down    -> reconnect with jittered exponential backoff; `periodic_check` asks for the assignment in case
               the stream missed it
    python-tuf, in a worker thread -> `get_metadata_blocking(name)` -> GetMetadata on the event loop

Statuses and events are typed values (`edgefleet.values`) turned into protobuf by `edgefleet.convert`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from edgefleet import __version__, errors
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.connection import Backoff, Connection, describe_failure, refused_as_revoked
from edgefleet.agent.exits import DeviceRevokedError
from edgefleet.agent.state import StateStore, now_ms
from edgefleet.agent.telemetry import Outbox
from edgefleet.convert import event_to_proto, ref_from_proto, status_to_proto
from edgefleet.v1 import device_pb2
from edgefleet.values import Capabilities, DeviceStatus, ModelRef, UpdateEvent

log = logging.getLogger("edgefleet.agent")

HELLO_TIMEOUT_S = 5.0  # an older server sends no hello: then the device's own counter goes on alone
MAX_SEQUENCE = 2**63 - 1  # the highest a server stores (edgefleet.convert refuses more)
SEQUENCE_ROOM = 2**32  # a hello must leave at least this many messages to go, or it is ignored

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Control:
    """Owns the control stream; `connection` is set once the agent has enrolled and connected."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        outbox: Outbox,
        capabilities: Callable[[], Capabilities],
        spawn: Spawn,
        stopping: asyncio.Event,
    ):
        self.config = config
        self.store = store
        self.outbox = outbox
        self.capabilities = capabilities
        self.spawn = spawn
        self.stopping = stopping
        self.connection: Connection | None = None
        self.connected = False
        # The last event sent, sent again after the status on every new stream: a server killed while it
        # was in flight never read it (the server ignores a repeat of one it has).
        self._last_event: device_pb2.DeviceMessage | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # Set by the agent: what an assignment or a rollback order sets going.
        # retry_order: the deployment id of an assignment marked retry (an operator's retry-failed), or ""
        self.on_assignment: Callable[[ModelRef | None, bool, str], None] = lambda ref, shadow, retry: None
        self.on_rollback: Callable[[str, str, str], None] = lambda command_id, reason, rollout_id: None
        self.assigned: tuple[str, str, str] = (
            "",
            "",
            "",
        )  # (target path, sha256, deployment id) last assigned

    # ---- the stream ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keeps the control stream up until `stopping` is set: one log line per change of state (connected,
        lost, retrying in N s at ADDRESS), never a traceback for a server that is down. Raises
        DeviceRevokedError when the server refuses this device as revoked (the agent must stop)."""
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        address = self.config.server
        last_problem = ""
        while not self.stopping.is_set():
            stream = self.spawn(self._stream_attempt(backoff))
            stopper = self.spawn(self.stopping.wait())
            await asyncio.wait({stream, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if self.stopping.is_set():
                stream.cancel()
                break
            was_connected, self.connected = self.connected, False
            exc = stream.result() if not stream.cancelled() else None
            if refused_as_revoked(exc):
                raise DeviceRevokedError(f"the server at {address} refused this device as revoked; stopping")
            problem = describe_failure(exc)
            if was_connected:
                log.warning("connection to %s lost: %s", address, problem)
            elif problem != last_problem:
                log.warning("cannot reach the server at %s: %s", address, problem)
            last_problem = "" if was_connected else problem
            delay = backoff.next()
            log.info("retrying in %.1f s at %s", delay, address)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                pass

    async def _stream_attempt(self, backoff: Backoff) -> BaseException | None:
        """One life of the control stream; how it ended is returned, not raised, so that an expected failure
        (the server is down) is a log line of `run`, not a background task's traceback."""
        try:
            await self._run_stream(backoff)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # what ended the stream: reported by `run`
            return e
        return None

    async def _run_stream(self, backoff: Backoff) -> None:
        assert self.connection is not None

        hello = asyncio.Event()
        ended = asyncio.Event()

        async def outgoing() -> AsyncIterator[device_pb2.DeviceMessage]:
            try:
                await asyncio.wait_for(hello.wait(), HELLO_TIMEOUT_S)
            except TimeoutError:
                pass
            yield self._stamped(self._status_message())  # the truth first, on every connect
            if self._last_event is not None:
                self._last_event.event.repeated = True
                yield self._stamped(self._last_event)
            while (message := await self._next_event(ended)) is not None:
                yield self._stamped(message)

        call = self.connection.stub.Connect(outgoing(), metadata=self.connection.metadata)
        try:
            await call.initial_metadata()  # the server sends it once it has accepted the stream
            if not call.done():
                self._now_connected(backoff)
            async for message in call:
                self._now_connected(backoff)
                kind = message.WhichOneof("kind")
                if kind == "hello":
                    self._continue_from(message.hello.last_sequence)
                    hello.set()
                elif kind == "assignment":
                    self._on_assignment(message.assignment)
                elif kind == "rollback":
                    rollback = message.rollback
                    self.on_rollback(rollback.command_id, rollback.reason, rollback.rollout_id)
                await asyncio.sleep(0)
        finally:
            # However it ended, the stream stops taking messages from the outbox: gRPC does not stop
            # reading `outgoing` of a call that is over, which took the next event and lost it.
            ended.set()
            call.cancel()
        # A stream the server ended cleanly still counts as down: reconnect.

    async def _next_event(self, ended: asyncio.Event) -> device_pb2.DeviceMessage | None:
        """The next message of the outbox for a stream, or None once that stream has `ended` (a message taken
        just as it ended goes back to the front, for the next stream)."""
        getter = asyncio.ensure_future(self.outbox.get_event())
        ender = asyncio.ensure_future(ended.wait())
        try:
            await asyncio.wait({getter, ender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ender.cancel()
            if not getter.done():
                getter.cancel()
        if not getter.done() or getter.cancelled():
            return None
        if ended.is_set():
            self.outbox.put_event(getter.result(), front=True)
            return None
        return getter.result()

    def _on_assignment(self, assignment: device_pb2.Assignment) -> None:
        try:
            ref = ref_from_proto(assignment.model)
        except errors.InvalidRequestError as e:
            # No real target looks like this: one line, and the stream goes on.
            log.warning("ignored an assignment from the server: %s", e)
            return
        self._remember(assignment)
        self.on_assignment(ref, assignment.shadow, assignment.deployment_id if assignment.retry else "")

    def _now_connected(self, backoff: Backoff) -> None:
        if not self.connected:
            assert self.connection is not None
            log.info("connected to %s as %s", self.config.server, self.connection.device_id)
        self.connected = True
        backoff.reset()

    async def periodic_check(self) -> None:
        """The fallback when the control stream missed something (or is down)."""
        assert self.connection is not None
        try:
            reply = await self.connection.stub.GetAssignment(
                device_pb2.GetAssignmentRequest(),
                metadata=self.connection.metadata,
                timeout=self.config.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            log.debug("periodic check failed: %s", e.code().name)
            return
        if reply.rollback_pending:
            self.on_rollback(
                reply.rollback_command_id,
                "ordered by an operator (periodic check)",
                reply.rollback_rollout_id,
            )
        elif reply.HasField("assignment"):
            self._on_assignment(reply.assignment)

    # ---- what the agent says ---------------------------------------------------------------------------

    def _remember(self, assignment: device_pb2.Assignment) -> None:
        model = assignment.model
        self.assigned = (model.target_path, model.sha256, assignment.deployment_id)

    def _continue_from(self, last_accepted: int) -> None:
        """The server's last accepted sequence: a device that lost its state file (or was restored from an
        old backup) continues after it instead of being ignored as stale."""
        state = self.store.state
        if last_accepted > MAX_SEQUENCE - SEQUENCE_ROOM:
            # A hostile or broken server: following it would overflow the counter and silence the device
            # for good, even once a sound server is back (the counter is persisted).
            log.warning(
                "ignored the server's last sequence %d: it leaves no room for more messages", last_accepted
            )
            return
        if last_accepted > state.status_sequence:
            log.info("continuing the message sequence at %d, after the server's last", last_accepted + 1)
            state.status_sequence = last_accepted
            self.store.save()

    def _stamped(self, message: device_pb2.DeviceMessage) -> device_pb2.DeviceMessage:
        """The next number of the one counter, stamped as the message is sent (so a status sent at a connect
        never overtakes events queued before it), and an event tied to the target and deployment it is about."""
        state = self.store.state
        # Persisted before use, so no restart or clock change ever sends an old number.
        state.status_sequence += 1
        self.store.save()
        if message.HasField("status"):
            message.status.sequence = state.status_sequence
        elif message.HasField("event"):
            event = message.event
            event.sequence = state.status_sequence
            path, sha, deployment = self.assigned
            if event.repeated:  # as it was first sent: tied to what it was about then
                return message
            if event.target_path == path and not event.deployment_id:
                event.deployment_id = deployment
            if not event.target_sha256:
                known = {r.target_path: r.sha256 for r in (state.previous, state.current) if r}
                known.setdefault(path, sha)
                event.target_sha256 = known.get(event.target_path, "")
            self._last_event = device_pb2.DeviceMessage()
            self._last_event.CopyFrom(message)
        return message

    def _status_message(self) -> device_pb2.DeviceMessage:
        state = self.store.state
        status = DeviceStatus(
            current=state.current,
            previous=state.previous,
            capabilities=self.capabilities(),
            agent_version=__version__,
            bad_targets=tuple(state.bad_targets),
            sent_at_ms=now_ms(),
            sequence=0,  # stamped when sent (`_stamped`)
        )
        return device_pb2.DeviceMessage(status=status_to_proto(status))

    def queue_status(self) -> None:
        self.outbox.put_event(self._status_message())

    def queue_event(self, target_path: str, stage: str, reason: str = "", command_id: str = "") -> None:
        """`stage` is one of `edgefleet.values.STAGES`."""
        log.info("%s %s %s", stage, target_path, reason)
        event = UpdateEvent(target_path, stage, reason[:1000], now_ms(), command_id)
        self.outbox.put_event(device_pb2.DeviceMessage(event=event_to_proto(event)))

    # ---- metadata over gRPC, for python-tuf running in a worker thread ---------------------------------

    def get_metadata_blocking(self, name: str) -> bytes:
        """Called from a worker thread; runs GetMetadata on the agent's loop. Raises FileNotFoundError when the
        server has no such file (python-tuf's signal that a role version does not exist yet), TransportError
        otherwise."""
        assert self.loop is not None and self.connection is not None
        connection = self.connection

        async def fetch() -> bytes:
            reply = await connection.stub.GetMetadata(
                device_pb2.GetMetadataRequest(name=name),
                metadata=connection.metadata,
                timeout=self.config.rpc_timeout_s,
            )
            return bytes(reply.content)

        try:
            return asyncio.run_coroutine_threadsafe(fetch(), self.loop).result(self.config.rpc_timeout_s + 5)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise FileNotFoundError(name) from e
            raise errors.TransportError(f"GetMetadata {name}: {e.code().name} {e.details()}") from e
        except TimeoutError as e:
            raise errors.TransportError(f"GetMetadata {name} timed out") from e
