"""The server container's health check: asks grpc.health.v1 on the mutual-TLS port, as the operator.

    python healthcheck.py --data-dir /var/lib/edgefleet-server [--address localhost:7443]

The server writes the operator's client certificate into <data dir>/operator/ on its first start, so the
container can present it to itself. Exits 0 when the server answers SERVING, 1 otherwise (docker's
HEALTHCHECK reads only the exit code; the line printed shows in `docker inspect`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--address", default="localhost:7443", help="a name in the server's certificate")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    operator = args.data_dir / "operator"
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(operator / "ca.crt").read_bytes(),
            private_key=(operator / "tls.key").read_bytes(),
            certificate_chain=(operator / "tls.crt").read_bytes(),
        )
    except OSError as e:
        print(f"no operator certificate yet: {e}")  # the first start has not got that far
        return 1
    with grpc.secure_channel(args.address, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"health check failed: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
