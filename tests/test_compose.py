"""The compose stack and the Kubernetes manifests, checked without a container engine.

Every ``botline`` command is a real subcommand, every ``BOTLINE_*`` variable a
real setting, every health check, probe and scrape target a real route on
the port that service listens on.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from services.cli import _parser
from services.gateway.app import create_app
from services.gateway.resources import GATEWAY
from services.gateway.settings import GatewaySettings
from services.worker.probes import create_probe_app
from services.worker.settings import WorkerSettings
from tests.support.deploycheck import OVERLAYS, render_overlay

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())


class _NotReady:
    def readiness(self) -> dict[str, bool]:
        return {}


def _settings_env() -> set[str]:
    fields = set(GatewaySettings.model_fields) | set(WorkerSettings.model_fields)
    return {f"BOTLINE_{name.upper()}" for name in fields}


@pytest.fixture
async def routes() -> AsyncIterator[dict[str, set[str]]]:
    """The paths each service serves, read from their aiohttp routers."""
    app = create_app(GatewaySettings())
    try:
        yield {"gateway": _paths(app), "worker": _paths(create_probe_app(_NotReady()))}
    finally:
        await app[GATEWAY].redis.aclose()


def _paths(app: web.Application) -> set[str]:
    return {r.canonical for r in app.router.resources()}


def _ports(env: dict[str, Any]) -> dict[str, int]:
    """The port of each botline service given its environment."""
    return {
        "gateway": int(env.get("BOTLINE_PORT", GatewaySettings.model_fields["port"].default)),
        "worker": int(
            env.get(
                "BOTLINE_WORKER_HTTP_PORT", WorkerSettings.model_fields["worker_http_port"].default
            )
        ),
    }


def _role(command: list[str]) -> str | None:
    """gateway or worker for a botline service command, else None."""
    if command[:1] == ["botline"] and command[1:2] in (["gateway"], ["worker"]):
        return command[1]
    return None


def _k8s_containers() -> list[dict[str, Any]]:
    containers = []
    for overlay in OVERLAYS:
        for obj in render_overlay(overlay):
            if obj["kind"] in ("Deployment", "StatefulSet"):
                containers += obj["spec"]["template"]["spec"]["containers"]
    return containers


def test_compose_parses_with_a_monitoring_profile_and_persistent_redis() -> None:
    services = COMPOSE["services"]
    assert {"redis", "rabbitmq", "gateway", "worker", "prometheus", "grafana"} <= set(services)
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(
        v.split(":")[0] in COMPOSE["volumes"] and v.endswith(":/data") for v in redis["volumes"]
    )
    assert re.fullmatch(r"rabbitmq:(4\.\d+|3\.13)-management", services["rabbitmq"]["image"])


def test_every_botline_command_is_a_real_subcommand() -> None:
    commands = [s["command"] for s in COMPOSE["services"].values() if "command" in s]
    commands += [c["command"] for c in _k8s_containers() if "command" in c]
    botline = [c for c in commands if c[0] == "botline"]
    assert len(botline) >= 4
    parser = _parser()
    for command in botline:
        parser.parse_args(command[1:])  # exits (SystemExit) on an unknown command


def test_a_wrong_subcommand_would_be_caught() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["workers"])


def test_every_botline_variable_is_a_real_setting() -> None:
    known = _settings_env()
    used = set()
    for service in COMPOSE["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("BOTLINE_")}
    for container in _k8s_containers():
        used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("BOTLINE_")}
    assert {"BOTLINE_WORKER_HTTP_PORT", "BOTLINE_ENDPOINTS_FILE"} <= used
    assert used - known == set()


def _route_ok(routes: dict[str, set[str]], role: str, path: str) -> bool:
    return path in routes[role]


async def test_compose_health_checks_name_real_routes_and_ports(
    routes: dict[str, set[str]],
) -> None:
    checked = 0
    for service in COMPOSE["services"].values():
        role = _role(service.get("command", []))
        if role is None:
            continue
        test = " ".join(service["healthcheck"]["test"])
        match = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", test)
        assert match, test
        assert int(match[1]) == _ports(service["environment"])[role]
        assert match[2] in routes[role], (role, match[2])
        checked += 1
    assert checked == 2


async def test_k8s_probes_name_real_routes_and_ports(routes: dict[str, set[str]]) -> None:
    checked = 0
    for container in _k8s_containers():
        role = _role(container.get("command", []))
        if role is None:
            continue
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container[probe]["httpGet"]
            port = ports.get(http["port"], http["port"])
            assert port == _ports(env)[role], (role, probe)
            assert http["path"] in routes[role], (role, http["path"])
            checked += 1
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert checked == 3 * 2 * len(OVERLAYS)


async def test_scrape_targets_name_real_services_routes_and_ports(
    routes: dict[str, set[str]],
) -> None:
    services = COMPOSE["services"]
    roles = {
        name: _role(s.get("command", []))
        for name, s in services.items()
        if _role(s.get("command", []))
    }
    scraped = set()
    for job in PROMETHEUS["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                role = roles[name]
                assert role is not None
                assert sd["port"] == _ports(services[name]["environment"])[role]
                assert _route_ok(routes, role, job["metrics_path"]), (role, job["metrics_path"])
                scraped.add(role)
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                assert target.split(":")[0] in services, target
    assert scraped == {"gateway", "worker"}


async def test_a_wrong_route_would_be_caught(routes: dict[str, set[str]]) -> None:
    assert "/readyz" in routes["worker"]
    assert "/livez" in routes["gateway"]
    assert not _route_ok(routes, "worker", "/readz")
