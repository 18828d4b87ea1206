"""TLS and mutual TLS on the server's port, with a throwaway CA made at run time: the Python client,
the health check and `recur client` over TLS; plaintext, certificate-less and wrong-CA clients
refused; bad TLS flags stop the start with a message naming the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from recur import healthcheck
from recur.client import RecurClient
from tests.helpers import Pki, Server, make_pki, refused

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_tls(tiny_models: Path, tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def start(extra: list[str], tls: dict) -> Server:
        s = Server(tiny_models, "memory:", extra, tls=tls)
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        s.kill()


def _create_and_step(client: RecurClient) -> None:
    sid = client.create("gru-lm").session_id
    assert client.step(sid, tokens=[1, 2, 3], expected_offset=0).offset == 3
    assert client.step(sid, tokens=[4], expected_offset=3).offset == 4
    assert client.get(sid).offset == 4


# -- the tests -------------------------------------------------------------------------------------


def test_tls_end_to_end(start_tls, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    server = start_tls(["--tls-cert", pki.server, "--tls-key", pki.server_key], {"tls_ca": pki.ca})
    with server.client() as c:
        _create_and_step(c)
        tokens = list(range(1, 40))
        sid = c.create("lstm-lm").session_id
        assert [r.offset for r in c.stream_sequence(sid, tokens, chunk=16)] == [16, 32, 39]
    with RecurClient(f"localhost:{server.port}", tls_ca=pki.ca, timeout=10) as c:  # the certificate's DNS name
        assert c.models()
    # A plaintext client cannot talk to the TLS port (the handshake fails: UNAVAILABLE, no retry).
    with RecurClient(server.target, timeout=10) as plain:
        refused(plain.models, grpc.StatusCode.UNAVAILABLE)
        refused(lambda: plain.create("gru-lm"), grpc.StatusCode.UNAVAILABLE)
    # A client that does not trust the CA refuses the server.
    with RecurClient(server.target, tls=True, timeout=10) as untrusting:
        refused(untrusting.models, grpc.StatusCode.UNAVAILABLE)
    assert healthcheck.main([server.target, "--tls-ca", pki.ca]) == 0
    assert healthcheck.main([server.target, "--timeout", "5"]) == 1  # plaintext against TLS


def test_mutual_tls(start_tls, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    mtls = {"tls_ca": pki.ca, "tls_cert": pki.client, "tls_key": pki.client_key}
    server = start_tls(["--tls-cert", pki.server, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca], mtls)
    with server.client() as c:
        _create_and_step(c)
    for who in ({"tls_ca": pki.ca},  # no client certificate
                {"tls_ca": pki.ca, "tls_cert": pki.stranger, "tls_key": pki.stranger_key},  # another CA's
                {}):  # plaintext
        with server.client(who) as c:
            refused(c.models, grpc.StatusCode.UNAVAILABLE)
            refused(lambda c=c: c.create("gru-lm"), grpc.StatusCode.UNAVAILABLE)
    # The health check takes its TLS files from the environment too (the compose healthcheck's way).
    assert healthcheck.main([server.target, "--timeout", "5", "--tls-ca", pki.ca]) == 1
    monkeypatch.setenv("RECUR_TLS_CA", pki.ca)
    monkeypatch.setenv("RECUR_TLS_CLIENT_CERT", pki.client)
    monkeypatch.setenv("RECUR_TLS_CLIENT_KEY", pki.client_key)
    assert healthcheck.main([server.target]) == 0
    # `recur client` with the flags (and none of the variables).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECUR_TLS")}
    out = subprocess.run([sys.executable, "-m", "recur.cli", "client", "--target", server.target, "--tls-ca", pki.ca,
                          "--tls-cert", pki.client, "--tls-key", pki.client_key, "create", "gru-lm"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = subprocess.run([sys.executable, "-m", "recur.cli", "client", "--target", server.target, "--tls-ca", pki.ca,
                          "models"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and "error: UNAVAILABLE" in out.stderr, out.stderr


@pytest.mark.parametrize(("flags", "words"), [
    (["--tls-cert", "{server}"], ["--tls-cert needs --tls-key"]),
    (["--tls-key", "{server_key}"], ["--tls-key needs --tls-cert"]),
    (["--tls-client-ca", "{ca}"], ["--tls-client-ca needs --tls-cert and --tls-key"]),
    (["--tls-cert", "{server}", "--tls-key", "{client_key}"], ["the key does not match the certificate"]),
    (["--tls-cert", "{server_key}", "--tls-key", "{server_key}"], ["--tls-cert", "not a PEM file holding a "
                                                                   "certificate"]),
    (["--tls-cert", "{server}", "--tls-key", "{missing}"], ["--tls-key", "no such file"]),
])
def test_bad_tls_flags_stop_the_start(pki: Pki, tmp_path: Path, flags: list[str], words: list[str]) -> None:
    files = {"server": pki.server, "server_key": pki.server_key, "client_key": pki.client_key, "ca": pki.ca,
             "missing": str(tmp_path / "nothing.key")}
    argv = [f.format(**files) for f in flags]
    out = subprocess.run([sys.executable, "-m", "recur.cli", "serve", "--store", "memory:", "--port", "0", *argv],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, out.stderr
    assert "Traceback" not in out.stderr
