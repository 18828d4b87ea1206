"""docker-compose.tls.yml: nginx terminates TLS (and, when asked, mutual TLS) in front of the
replicas. The override is validated with docker-compose, and its template is rendered with its own
settings for local nginx in front of the local replicas, as tests.helpers.Nginx does for the
plaintext one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from recur.client import RecurClient
from tests.helpers import Nginx, Pki, Topology, compose_config, make_pki, refused

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = ROOT / "docker-compose.tls.yml"
MUTUAL = "ssl_verify_client on; ssl_client_certificate {dir}/client-ca.pem;"


def _nginx_environment() -> dict[str, str]:
    """The nginx service's environment with the override applied (compose merges it by name)."""
    env = dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["nginx"]["environment"])
    env.update(yaml.safe_load(OVERRIDE.read_text())["services"]["nginx"]["environment"])
    return env


def test_the_tls_override_validates() -> None:
    services = compose_config("docker-compose.yml", "docker-compose.tls.yml")["services"]
    plain = compose_config("docker-compose.yml")["services"]
    assert set(services) == set(plain)
    nginx = services["nginx"]
    mounts = {Path(v.split(":")[1]): v for v in nginx["volumes"]}
    template = mounts[Path("/etc/nginx/templates/recur.conf.template")]
    assert template.startswith(str(ROOT / "deploy/nginx/recur-tls.conf.template")), template  # replaced, not added
    assert mounts[Path("/etc/nginx/certs")].startswith(str(ROOT / "certs")) and template.endswith(":ro")
    assert [p["published"] for p in nginx["ports"]] == [50051]
    env = nginx["environment"]
    assert env["RECUR_TLS_DIR"] == "/etc/nginx/certs" and env["RECUR_TLS_CLIENT_VERIFY"] == "ssl_verify_client off;"
    # The upstream is still the one scaled replica service, and the rest is untouched.
    assert env["RECUR_UPSTREAM_SERVERS"] == plain["nginx"]["environment"]["RECUR_UPSTREAM_SERVERS"]
    assert nginx["deploy"] == plain["nginx"]["deploy"]
    for name in set(plain) - {"nginx"}:  # (compose may list a merged service's volumes in another order)
        assert {**services[name], "volumes": sorted(services[name].get("volumes", []))} == {
            **plain[name], "volumes": sorted(plain[name].get("volumes", []))}, name


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    """The ./certs folder of the override: server.pem, server.key, and client-ca.pem for mutual TLS."""
    pki = make_pki(tmp_path / "certs")
    shutil.copy(pki.ca, pki.directory / "client-ca.pem")
    return pki


@pytest.fixture
def start_nginx(topology: Topology, certs: Pki, tmp_path: Path) -> Iterator:
    started: list[Nginx] = []

    def start(client_verify: str | None = None) -> Nginx:
        """nginx from the override's template and environment, its certificate folder at `certs`."""
        d = tmp_path / f"nginx-tls-{len(started)}"
        d.mkdir()
        extra = {"RECUR_TLS_DIR": str(certs.directory)}
        if client_verify is not None:
            extra["RECUR_TLS_CLIENT_VERIFY"] = client_verify.format(dir=certs.directory)
        n = Nginx(d, [r.port for r in topology.replicas], "recur-tls.conf.template", _nginx_environment(),
                  extra).start()
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def _sessions_work(client: RecurClient) -> None:
    sid = client.create("gru-lm").session_id
    assert client.step(sid, tokens=[1, 2, 3], expected_offset=0).offset == 3
    assert [r.offset for r in client.stream_sequence(sid, list(range(1, 21)), chunk=8)] == [11, 19, 23]
    assert client.get(sid).offset == 23


def test_nginx_terminates_tls(start_nginx, certs: Pki) -> None:  # type: ignore[no-untyped-def]
    nginx = start_nginx()
    with RecurClient(nginx.target, tls_ca=certs.ca, timeout=10) as c:
        _sessions_work(c)
    with RecurClient(nginx.target, timeout=10) as plain:  # plaintext against the TLS port
        refused(plain.models, grpc.StatusCode.UNAVAILABLE)


def test_nginx_mutual_tls(start_nginx, certs: Pki) -> None:  # type: ignore[no-untyped-def]
    nginx = start_nginx(MUTUAL)
    with RecurClient(nginx.target, tls_ca=certs.ca, tls_cert=certs.client, tls_key=certs.client_key,
                     timeout=10) as c:
        _sessions_work(c)
    # No client certificate, or one from another CA: nginx answers 401, which reads as UNAUTHENTICATED.
    for who in ({"tls_ca": certs.ca}, {"tls_ca": certs.ca, "tls_cert": certs.stranger, "tls_key": certs.stranger_key}):
        with RecurClient(nginx.target, timeout=10, **who) as c:
            refused(c.models, grpc.StatusCode.UNAUTHENTICATED)
            refused(lambda c=c: c.create("gru-lm"), grpc.StatusCode.UNAUTHENTICATED)
