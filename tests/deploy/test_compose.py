"""The deployment files describe the topology the tests run (no Docker engine runs here): one
`replica` service that scales, nginx resolving it by the service name, Prometheus scraping every
replica's metrics port, Grafana provisioned with it and the dashboard, and limits on every service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "replica", "nginx", "prometheus", "grafana"}
METRICS_PORT = 9464


def test_compose_file_validates() -> None:
    assert set(compose_config("docker-compose.yml")["services"]) == SERVICES


def test_compose_topology_is_the_tested_one() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "healthcheck" in redis
    r = services["replica"]
    cmd = r["command"]
    assert cmd[:2] == ["recur", "serve"] and cmd[cmd.index("--store") + 1] == "redis://redis:6379/0"
    assert r["healthcheck"]["test"][-3:] == ["-m", "recur.healthcheck", "localhost:50051"]
    assert r["depends_on"]["redis"]["condition"] == "service_healthy"
    assert r["build"]["dockerfile"] == "deploy/Dockerfile"
    nginx = services["nginx"]
    assert nginx["ports"] == ["50051:50051"]
    assert "./deploy/nginx/recur.conf.template:/etc/nginx/templates/recur.conf.template:ro" in nginx["volumes"]
    assert nginx["depends_on"] == {"replica": {"condition": "service_healthy"}}


def test_replicas_scale() -> None:
    """`docker compose up --scale replica=N` needs one service with nothing a second container would
    clash on: no container_name, no published host port. nginx reaches them by the service name."""
    services = compose_config("docker-compose.yml")["services"]
    assert [s for s in services if s.startswith("replica")] == ["replica"]
    replica = services["replica"]
    assert "container_name" not in replica and "ports" not in replica
    assert replica["deploy"]["replicas"] >= 2
    assert {str(p) for p in replica["expose"]} == {"50051", str(METRICS_PORT)}
    assert replica["command"][replica["command"].index("--metrics-port") + 1] == str(METRICS_PORT)
    # One upstream line naming the service: nginx resolves it to every replica's address.
    upstreams = services["nginx"]["environment"]["RECUR_UPSTREAM_SERVERS"]
    assert re.findall(r"server ([^;\s]+)", upstreams) == ["replica:50051"], upstreams
    for template in ("recur.conf.template", "recur-tls.conf.template"):
        text = (ROOT / "deploy" / "nginx" / template).read_text()
        # Not `consistent`: with one server line for every replica it round-robins (tests/containers).
        assert "${RECUR_UPSTREAM_SERVERS}" in text and "hash $http_x_session_id;" in text


def test_every_service_has_limits() -> None:
    for name, service in compose_config("docker-compose.yml")["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert re.fullmatch(r"\d+[kmg]", str(limits["memory"])), (name, limits)


def test_prometheus_scrapes_every_replica() -> None:
    services = compose_config("docker-compose.yml")["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    config_file = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert f"{config_file}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # DNS service discovery on the replica service's name: one target per container, however many.
    sd = jobs["recur"]["dns_sd_configs"]
    assert sd == [{"names": ["replica"], "type": "A", "port": METRICS_PORT, "refresh_interval": "15s"}]
    assert set(sd[0]["names"]) <= set(services)
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package brings it (deploy/ensure-packages installs it)
        out = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = compose_config("docker-compose.yml")["services"]
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    assert provisioning == ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    port = services["prometheus"]["ports"][0]["target"]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "recur.yml").read_text())["providers"]
    dashboards = Path(mounts[provider["options"]["path"]])
    dashboard = json.loads((dashboards / "recur.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("recur_step_duration_seconds_bucket", "recur_chunks_total", "recur_sessions_live",
                   "recur_errors_total"):  # latency, throughput, live sessions, errors
        assert metric in exprs, metric


def test_serving_image_is_slim_and_unprivileged() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "torch" not in text.replace("No torch", "") and "[train" not in text
    assert "USER recur" in text and "HEALTHCHECK" in text and "recur.healthcheck" in text
