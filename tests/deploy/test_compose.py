"""deploy/compose: the compose file's semantics (what `docker compose config` would check, and more), the
settings every servoloop container reads, and the files it mounts. No Docker engine runs here, so the file is
parsed and its references are resolved by hand."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from servoloop.settings import Settings, load_settings
from tests.deploy.conftest import DEPLOY, REPO, resolve_servoloop, unknown_setting_keys

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _servoloop_argvs(command: list[str] | str) -> list[list[str]]:
    """Every `servoloop …` invocation in a service command, a shell one (`sh -c "…; servoloop …"`) included."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv and argv[0] == "servoloop":
        return [argv[1:]]
    if argv[:2] in (["sh", "-c"], ["bash", "-c"]):
        return [shlex.split(m)[1:] for m in re.findall(r"servoloop[^;&|]*", argv[2])]
    return []


def test_compose_runs_the_whole_distributed_system(services: dict[str, dict]) -> None:
    images = {name: svc.get("image", "") for name, svc in services.items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["clickhouse"].startswith("clickhouse/clickhouse-server:")
    assert images["grafana"].startswith("grafana/grafana:")
    assert images["otel-collector"].startswith("otel/opentelemetry-collector-contrib:")
    assert images["lb"].startswith("nginx:")
    gateways = [n for n, s in services.items() if s.get("command") == ["servoloop", "serve"]]
    assert len(gateways) == 2, gateways
    roles = {tuple(a[:2]) for s in services.values() for a in _servoloop_argvs(s.get("command", []))}
    for role in [("ingest", "--metrics-port"), ("monitor", "run"), ("retrain", "worker"), ("db", "migrate")]:
        assert role in roles, f"no service runs servoloop {' '.join(role)}"


def test_kafka_runs_in_kraft_mode_without_zookeeper(services: dict[str, dict]) -> None:
    env = services["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert not any("zookeeper" in n for n in services)
    assert not any("ZOOKEEPER" in k for k in env)


def test_every_service_has_an_image_or_a_build_whose_dockerfile_exists(services: dict[str, dict]) -> None:
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        if build := svc.get("build"):
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert context == REPO, f"{name}: the image builds from the repository root"


def test_every_servoloop_command_is_a_real_command_with_real_options(services: dict[str, dict], cli_root) -> None:
    seen = 0
    for name, svc in services.items():
        for argv in _servoloop_argvs(svc.get("command", [])):
            resolve_servoloop(cli_root, argv)
            seen += 1
        if "build" in svc:  # every container of the servoloop image runs a servoloop command
            assert _servoloop_argvs(svc.get("command", [])), f"{name} runs no servoloop command"
    assert seen >= 6


def test_resolve_servoloop_rejects_unknown_commands_and_options(cli_root) -> None:
    with pytest.raises(AssertionError, match="no command"):
        resolve_servoloop(cli_root, ["retrain", "daemon"])
    with pytest.raises(AssertionError, match="unknown options"):
        resolve_servoloop(cli_root, ["ingest", "--metrics-prt", "9100"])
    with pytest.raises(AssertionError, match="command group"):
        resolve_servoloop(cli_root, ["monitor"])


def test_depends_on_names_existing_services_with_valid_conditions_and_no_cycle(services: dict[str, dict]) -> None:
    graph: dict[str, list[str]] = {}
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name, f"{name} depends on itself"
            cond = spec.get("condition", "service_started")
            assert cond in ("service_started", "service_healthy", "service_completed_successfully"), (name, cond)
            if cond == "service_healthy":
                hc = services[dep].get("healthcheck")
                assert hc and not hc.get("disable"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
        graph[name] = list(deps)
    state: dict[str, int] = {}

    def visit(n: str, path: tuple[str, ...]) -> None:
        assert state.get(n) != 1, f"depends_on cycle: {' -> '.join((*path, n))}"
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph[n]:
            visit(d, (*path, n))
        state[n] = 2

    for n in graph:
        visit(n, ())


def test_mounted_files_exist_and_named_volumes_are_declared(compose: dict, services: dict[str, dict]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            assert target.startswith("/"), (name, vol)
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_published_ports_are_unique_and_reach_the_load_balancer_and_grafana(services: dict[str, dict]) -> None:
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published
    assert {p.split(":")[1] for p in services["lb"]["ports"]} == {"8000", "50051"}
    assert any(p.endswith(":3000") for p in services["grafana"]["ports"])
    assert not any("ports" in s for s in services.values() if s.get("command") == ["servoloop", "serve"]), \
        "gateway replicas are reached through the load balancer only"


def test_the_mounted_settings_load_and_describe_the_distributed_engines() -> None:
    settings = load_settings(COMPOSE_DIR / "servoloop.yaml", events={"store": {"password": "from-env"}})
    assert settings.events.broker.mode == "external"
    assert settings.events.broker.bootstrap_servers == "kafka:9092"
    assert settings.events.store.kind == "clickhouse"
    assert settings.events.store.url == "http://clickhouse:8123"
    assert settings.gateway.tracing.enabled and settings.gateway.tracing.endpoint == "http://otel-collector:4318"
    assert [m.path for m in settings.gateway.models] == ["/opt/servoloop/models/tiny-chat"]


def test_env_vars_in_compose_override_the_mounted_settings(monkeypatch: pytest.MonkeyPatch,
                                                           services: dict[str, dict]) -> None:
    env = services["ingester"]["environment"]
    assert env["SERVOLOOP_CONFIG"] == "/etc/servoloop/servoloop.yaml"
    monkeypatch.setenv("SERVOLOOP_EVENTS__STORE__PASSWORD", "s3cret")
    assert load_settings(COMPOSE_DIR / "servoloop.yaml").events.store.password == "s3cret"


def test_every_key_of_the_mounted_settings_is_a_real_setting_at_any_depth() -> None:
    data = yaml.safe_load((COMPOSE_DIR / "servoloop.yaml").read_text())
    assert unknown_setting_keys(Settings, data) == []
    misspelt = yaml.safe_load((COMPOSE_DIR / "servoloop.yaml").read_text().replace("bootstrap_servers:", "bootstrap_server:")
                             .replace("kv_cache_gib:", "kv_cache_gb:"))
    assert unknown_setting_keys(Settings, misspelt) == ["gateway.models[0].kv_cache_gb", "events.broker.bootstrap_server"]


def test_load_balancer_routes_http_and_grpc_to_both_gateways(services: dict[str, dict]) -> None:
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    settings = load_settings(COMPOSE_DIR / "servoloop.yaml")
    gateways = sorted(n for n, s in services.items() if s.get("command") == ["servoloop", "serve"])
    for upstream, port in (("gateways_http", settings.gateway.http_port), ("gateways_grpc", settings.gateway.grpc_port)):
        block = re.search(r"upstream " + upstream + r" \{(.*?)\}", conf, re.S)
        assert block, upstream
        servers = sorted(re.findall(r"server ([\w-]+):(\d+)", block.group(1)))
        assert servers == [(g, str(port)) for g in gateways], (upstream, servers)
    assert "grpc_pass grpc://gateways_grpc" in conf and re.search(r"listen 50051;\s*http2 on;", conf)
    assert "proxy_buffering off" in conf  # server-sent events stream through


def test_grafana_gets_the_dashboards_and_every_variable_its_datasources_use(services: dict[str, dict]) -> None:
    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/servoloop.yaml").read_text())
    assert mounts["../grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert list((DEPLOY / "grafana/dashboards").glob("*.json"))
    datasources = (DEPLOY / "grafana/provisioning/datasources/servoloop.yaml").read_text()
    wanted = set(re.findall(r"\$\{(\w+)\}", re.sub(r"(?m)^\s*#.*$", "", datasources)))
    assert wanted and wanted <= set(grafana["environment"]), wanted - set(grafana["environment"])
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]


def test_prometheus_and_otel_collector_configs_point_at_real_services(services: dict[str, dict]) -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets <= set(services), targets - set(services)
    otel = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    pipeline = otel["service"]["pipelines"]["traces"]
    assert set(pipeline["receivers"]) <= set(otel["receivers"])
    assert set(pipeline["exporters"]) <= set(otel["exporters"])
    assert set(pipeline["processors"]) <= set(otel["processors"])
    assert otel["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_every_compose_variable_has_a_default_or_an_entry_in_env_example() -> None:
    text = COMPOSE.read_text()
    used = re.findall(r"\$\{(\w+)(:?-[^}]*)?\}", re.sub(r"(?m)^\s*#.*$", "", text))
    example = {line.split("=", 1)[0] for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    missing = sorted({name for name, default in used if not default and name not in example})
    assert used and missing == [], missing


def test_the_monitor_loop_runs_at_the_configured_interval(services: dict[str, dict]) -> None:
    loop = services["monitor"]["command"][2]
    interval = int(re.search(r"sleep \$\{MONITOR_INTERVAL_S:-(\d+)\}", loop).group(1))
    assert load_settings(COMPOSE_DIR / "servoloop.yaml").monitors.interval_s == interval
