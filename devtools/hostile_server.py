"""A hostile fleet server for attack tests: a process of its own that holds the server's TLS identity and so
is, to a device, its server. It relays every DeviceService call to the real server (as the device, with the
device's certificate), so everything works as usual, until the test tells it to lie: then it pushes whatever
assignments it is given down the device's open control stream, as a compromised server can.

    with HostileServer(upstream, server_tls, device_tls, folder) as hostile:   # a subprocess on 127.0.0.1:0
        agent = fleet.start_agent("cam", "", "--server", hostile.address)
        hostile.assign([ModelRef(...), ...])     # queued on the device's stream (waits for the relay's word)
        hostile.send([device_pb2.ServerMessage(hello=...)])  # any message, as the server would send it
        hostile.serve_metadata({"2.root": b"..."})  # GetMetadata answers these itself (until `forget`)
        hostile.downloads()                      # the target paths the device asked to download, in order

The process reads one JSON command a line on stdin ({"send": [serialized ServerMessage as hex, ...]} or
{"metadata": {name: hex}, "forget": [name, ...]}) and answers each with one line on stdout; what it relays
it logs on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import grpc

from edgefleet import pki
from edgefleet.devtools.localfleet import wait_for
from edgefleet.devtools.raw_rpc import DEVICE_SERVICE
from edgefleet.v1 import common_pb2, device_pb2
from edgefleet.values import ModelRef

log = logging.getLogger("edgefleet.hostile")
DOWNLOAD_LOG = "download "  # the relay's log line for each DownloadModel a device sends


class _Relay:
    """The device service, relayed: raw bytes in, raw bytes out, plus injected control-stream messages."""

    def __init__(self, upstream: grpc.aio.Channel):
        self.upstream = upstream
        self.streams: set[asyncio.Queue[bytes | None]] = set()
        self.metadata: dict[str, bytes] = {}  # GetMetadata names answered here, not by the real server

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, grpc.RpcMethodHandler] = {}
        for method in DEVICE_SERVICE.methods:
            path = f"/{DEVICE_SERVICE.full_name}/{method.name}"
            if method.client_streaming:
                methods[method.name] = grpc.stream_stream_rpc_method_handler(self._connect(path))
            elif method.server_streaming:
                methods[method.name] = grpc.unary_stream_rpc_method_handler(self._unary_stream(path))
            else:
                methods[method.name] = grpc.unary_unary_rpc_method_handler(self._unary(path))
        return grpc.method_handlers_generic_handler(DEVICE_SERVICE.full_name, methods)

    def _unary(self, path: str) -> Any:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if path.endswith("/GetMetadata"):
                name = device_pb2.GetMetadataRequest.FromString(request).name
                if name in self.metadata:
                    log.info("metadata %s served by the relay", name)
                    return device_pb2.GetMetadataResponse(content=self.metadata[name]).SerializeToString()
            try:
                reply: bytes = await self.upstream.unary_unary(path)(request, timeout=60)
                return reply
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
                raise

        return call

    def _unary_stream(self, path: str) -> Any:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            if path.endswith("/DownloadModel"):
                log.info(
                    "%s%s", DOWNLOAD_LOG, device_pb2.DownloadModelRequest.FromString(request).target_path
                )
            try:
                async for reply in self.upstream.unary_stream(path)(request):
                    yield reply
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")

        return call

    def _connect(self, path: str) -> Any:
        async def call(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            upstream = self.upstream.stream_stream(path)(requests)
            out: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def pump() -> None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for reply in upstream:
                        await out.put(reply)
                await out.put(None)

            task = asyncio.create_task(pump())
            self.streams.add(out)
            try:
                while (message := await out.get()) is not None:
                    yield message
            finally:
                self.streams.discard(out)
                task.cancel()
                upstream.cancel()

        return call

    def send(self, messages: Sequence[bytes]) -> int:
        """Queues the serialized ServerMessages on every open control stream; returns how many streams."""
        for queue in self.streams:
            for message in messages:
                queue.put_nowait(message)
        return len(self.streams)


async def _serve(args: argparse.Namespace) -> None:
    device, server = pki.TlsFiles(Path(args.device_tls)), pki.TlsFiles(Path(args.server_tls))
    upstream = grpc.aio.secure_channel(
        args.upstream,
        grpc.ssl_channel_credentials(
            root_certificates=device.ca.read_bytes(),
            private_key=device.key.read_bytes(),
            certificate_chain=device.cert.read_bytes(),
        ),
    )
    relay = _Relay(upstream)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((relay.handler(),))
    port = grpc_server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(server.key.read_bytes(), server.cert.read_bytes())])
    )
    await grpc_server.start()
    loop = asyncio.get_running_loop()

    def read_commands() -> None:
        for line in sys.stdin:
            command = json.loads(line)
            if "metadata" in command:
                files = {name: bytes.fromhex(data) for name, data in command["metadata"].items()}
                relay.metadata.update(files)  # one dict update: atomic for the loop reading it
                for name in command.get("forget", ()):
                    relay.metadata.pop(name, None)
                print(json.dumps({"metadata": len(relay.metadata)}), flush=True)
                continue
            messages = [bytes.fromhex(m) for m in command["send"]]
            streams = asyncio.run_coroutine_threadsafe(_send(relay, messages), loop).result()
            print(json.dumps({"sent": len(messages), "streams": streams}), flush=True)

    print(json.dumps({"port": port}), flush=True)
    await asyncio.to_thread(read_commands)  # until stdin closes
    await grpc_server.stop(1)


async def _send(relay: _Relay, messages: Sequence[bytes]) -> int:
    return relay.send(messages)


class HostileServer:
    """The hostile server as a subprocess (see the module docstring)."""

    def __init__(self, upstream: str, server_tls: Path, device_tls: Path, log_path: Path):
        self.log_path = log_path
        self._argv = [
            sys.executable, "-m", "edgefleet.devtools.hostile_server", "--upstream", upstream,
            "--server-tls", str(server_tls), "--device-tls", str(device_tls),
        ]  # fmt: skip
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self._lock = threading.Lock()

    def __enter__(self) -> HostileServer:
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True
        )
        log_file.close()
        self.port = int(json.loads(self._line())["port"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the hostile server exited:\n{self.log()[-3000:]}")
        return line

    def assign(self, refs: Sequence[ModelRef], wait_s: float = 30) -> None:
        """Pushes the assignments down the device's control stream, once it has one open."""
        assignments = [
            device_pb2.ServerMessage(
                assignment=device_pb2.Assignment(
                    model=common_pb2.ModelRef(**asdict(r)), deployment_id="hostile"
                )
            )
            for r in refs
        ]
        self.send(assignments, wait_s)

    def send(self, messages: Sequence[device_pb2.ServerMessage], wait_s: float = 30) -> None:
        """Sends the messages down the device's control stream, once it has one open."""
        stdin: IO[str] | None = self.process.stdin if self.process else None
        assert stdin is not None
        payload = json.dumps({"send": [m.SerializeToString().hex() for m in messages]}) + "\n"

        def pushed() -> bool:
            with self._lock:
                stdin.write(payload)
                stdin.flush()
                return int(json.loads(self._line())["streams"]) > 0

        wait_for(pushed, wait_s, "a device's control stream through the hostile server", interval=0.5)

    def serve_metadata(self, files: dict[str, bytes], forget: Sequence[str] = ()) -> None:
        """GetMetadata for these names is answered by the relay from now on (e.g. "2.root": a rotation);
        the names in `forget` go back to the real server."""
        assert self.process is not None and self.process.stdin is not None
        command = {"metadata": {n: d.hex() for n, d in files.items()}, "forget": list(forget)}
        with self._lock:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
            self._line()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def downloads(self) -> list[str]:
        return [
            line.split(DOWNLOAD_LOG, 1)[1].strip() for line in self.log().splitlines() if DOWNLOAD_LOG in line
        ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the real server's address (host:port)")
    parser.add_argument("--server-tls", required=True, help="folder with the server's tls.key, tls.crt")
    parser.add_argument(
        "--device-tls", required=True, help="folder with the device's tls.key, tls.crt, ca.crt"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
