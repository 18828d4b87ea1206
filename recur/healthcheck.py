"""Exit 0 when the server at TARGET reports SERVING through gRPC health checking (for HEALTHCHECK).

    python -m recur.healthcheck localhost:50051
    python -m recur.healthcheck localhost:50051 --tls-ca /certs/ca.pem     # a server on TLS

TLS options as for `recur client` (--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name), each
also read from its variable (RECUR_TLS, RECUR_TLS_CA, RECUR_TLS_CLIENT_CERT, RECUR_TLS_CLIENT_KEY,
RECUR_TLS_SERVER_NAME), so a container's health check follows its environment. Health checking
needs no API key.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recur.client import open_channel
from recur.client_cli import add_tls_arguments, tls_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recur.healthcheck",
                                     description="gRPC health check of a recur server")
    parser.add_argument("target", nargs="?", default="localhost:50051", help="server address (localhost:50051)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (3)")
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with open_channel(args.target, options=(), **tls_options(args)) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unreadable TLS file
        print(f"{args.target}: {e}", file=sys.stderr)
        return 1
    print(f"{args.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
