"""TLS for the server's port: `--tls-cert` and `--tls-key` serve TLS, `--tls-client-ca` also requires
client certificates signed by that CA (mutual TLS). Health checking and reflection share the port,
so they are behind TLS too (but never behind API keys).

Problems are found at start, as SystemExit naming the flag and the file: a certificate without a
key or the reverse, a missing or unreadable file, a file that is not PEM of the right kind.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def _read_pem(path: str, flag: str, kinds: tuple[str, ...]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SystemExit(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not any(f"-----BEGIN {kind}-----".encode() in data for kind in kinds):
        raise SystemExit(f"{flag} {path}: not a PEM file holding a {kinds[0].lower()}")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """The port's credentials: None for plaintext (no cert, key or client CA given)."""
    if not (cert or key or client_ca):
        return None
    if not cert or not key:
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        if not cert and not key:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        raise SystemExit(f"{given} needs {missing}: TLS takes a certificate and its private key")
    chain = _read_pem(cert, "--tls-cert", ("CERTIFICATE",))
    private = _read_pem(key, "--tls-key", ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"))
    roots = _read_pem(client_ca, "--tls-client-ca", ("CERTIFICATE",)) if client_ca else None
    # gRPC would only say "failed to bind"; OpenSSL (stdlib ssl) names what is wrong.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        why = ("the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(e)
               else f"OpenSSL cannot load them ({e.reason or e}; an encrypted key is not supported)")
        raise SystemExit(f"--tls-cert {cert} / --tls-key {key}: {why}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise SystemExit(f"--tls-client-ca {client_ca}: OpenSSL cannot load it ({e.reason or e})") from None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def describe(cert: str, client_ca: str) -> str:
    """For the start-up log line."""
    if not cert:
        return "plaintext"
    return "mutual TLS (client certificates required)" if client_ca else "TLS"
