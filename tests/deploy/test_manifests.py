"""deploy/ cannot rot: every command, flag, port, probe path and metric name its manifests, Dockerfile and
dashboards reference is checked against our CLI (the click tree behind typer), the server's route table and
default ports, and the metric families the server and the trainer export. Nothing here reaches a cluster."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
import typer  # noqa: E402

from deepseek.cli.main import app  # noqa: E402
from deepseek.serve.manager import ModelManager  # noqa: E402
from deepseek.serve.metrics import ServingMetrics  # noqa: E402
from deepseek.serve.protocols.http_v2 import create_app  # noqa: E402
from deepseek.serve.repository import ModelRepository  # noqa: E402
from deepseek.serve.server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT  # noqa: E402
from deepseek.train.config import load_train_config  # noqa: E402
from deepseek.train.prometheus import TRAIN_GAUGES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"(?<![\w$.])(?:ds|nv)_[a-z0-9_]+")
DS_COMMAND = re.compile(r"(?<![\w-])ds ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")
CLI = typer.main.get_command(app)


# -- what exists: the CLI, the server's routes, the exported metrics -------------------------------------------

class Routes:
    """``path in routes``: the real server app answers GET path with something other than 404 (the app is
    built over an empty repository and called in process; no port is opened, its lifespan does not run)."""

    def __init__(self, client):
        self.client = client

    def __contains__(self, path: str) -> bool:
        return self.client.get(path).status_code != 404


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> Routes:
    from starlette.testclient import TestClient

    manager = ModelManager(ModelRepository(tmp_path_factory.mktemp("empty-repository")))
    found = Routes(TestClient(create_app(manager)))
    assert "/no/such/route" not in found  # the check can fail
    assert found.client.get("/v2/health/live").status_code == 200
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every series name /metrics of the server or the trainer's metrics_port can carry."""
    manager = ModelManager(ModelRepository(tmp_path_factory.mktemp("empty-repository")))
    names = {gauge for gauge, _ in TRAIN_GAUGES.values()}
    for family in ServingMetrics(manager).registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names(text: str) -> set[str]:
    return set(METRIC.findall(text))


def serve_params(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Parse ``ds serve`` arguments with the real click command: an unknown flag or a bad value raises."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]
    return CLI.commands["serve"].make_context("serve", expanded).params


def container_env(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes would expand $(VAR) in args (Secret values are placeholders)."""
    env = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "resourceFieldRef" in source:
            kind, resource = source["resourceFieldRef"]["resource"].split(".")
            env[item["name"]] = str(container["resources"][kind][resource])
        elif "secretKeyRef" in source:
            env[item["name"]] = "secret-value"
    return env


def manifests(kustomizations: bool = False) -> dict[str, list[dict]]:
    found = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" and not kustomizations:
            continue
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        found[str(path.relative_to(DEPLOY))] = docs
    return found


def one(kind: str) -> dict:
    docs = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    assert len(docs) == 1, kind
    return docs[0]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def probe_checks(container: dict, routes: Routes, http_port: int) -> None:
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, (probe, get["path"])
        assert ports.get(get["port"], get["port"]) == http_port, (probe, get["port"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


# -- the tests -------------------------------------------------------------------------------------------------

def test_every_manifest_parses_and_names_its_kind():
    found = manifests()
    kinds = sorted(doc["kind"] for docs in found.values() for doc in docs)
    assert kinds == sorted(["ServingRuntime", "InferenceService", "Deployment", "Service", "HorizontalPodAutoscaler",
                            "ConfigMap", "ServiceMonitor", "PodMonitor", "PyTorchJob"])
    for docs in found.values():
        for doc in docs:
            assert doc["apiVersion"] and doc["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", ["kubernetes", "kserve"])
def test_kustomize_renders_each_folder_to_its_manifests(folder):
    """kubectl's built-in kustomize renders offline (no cluster): `kubectl apply -k deploy/<folder>` applies these."""
    kustomization = yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered) if doc)
    listed = sorted(doc["kind"] for name in kustomization["resources"]
                    for doc in yaml.safe_load_all((DEPLOY / folder / name).read_text()) if doc)
    assert kinds == listed and kinds


def test_every_ds_command_mentioned_in_deploy_exists():
    texts = [path.read_text() for path in DEPLOY.rglob("*") if path.is_file() and path.suffix != ".json"]
    mentioned = {m for text in texts for m in DS_COMMAND.findall(text)}
    assert ("serve", "") in mentioned or any(first == "serve" for first, _ in mentioned)
    for first, second in mentioned:
        assert first in CLI.commands, f"ds {first}"
        command = CLI.commands[first]
        if hasattr(command, "commands") and second:  # a group: its subcommand must exist too
            assert second in command.commands, f"ds {first} {second}"


def test_the_dockerfile_runs_ds_serve_on_our_ports_as_a_non_root_user(routes):
    steps = dockerfile()
    values = {}
    for instruction, argument in steps:
        values.setdefault(instruction, []).append(argument)
    assert values["FROM"] == ["python:3.11-slim"]
    installs = " ".join(values["RUN"])
    assert "torch==2.13.0" in installs and "download.pytorch.org/whl/cpu" in " ".join(values["ARG"])
    extras = re.findall(r'pip install "\.\[(\w+)\]"', installs)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert extras == ["serve"] and re.search(r"^serve = \[", pyproject, flags=re.M)
    assert values["USER"] not in (["root"], ["0"])
    assert values["STOPSIGNAL"] == ["SIGTERM"]
    entrypoint, cmd = json.loads(values["ENTRYPOINT"][0]), json.loads(values["CMD"][0])
    assert entrypoint == ["ds", "serve"]
    params = serve_params(cmd, {})
    assert params["host"] == "0.0.0.0"
    assert [str(params["model_repository"])] == json.loads(values["VOLUME"][0])
    assert {int(p) for p in values["EXPOSE"][0].split()} == {params["http_port"], params["grpc_port"]} \
        == {DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for copied in re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), flags=re.M):
        assert f"!{copied.rstrip('/')}" in ignore.replace("/\n", "\n"), copied


def test_the_deployment_probes_drains_and_reads_its_key_from_a_secret(routes):
    deployment, service = one("Deployment"), one("Service")
    spec = deployment["spec"]
    assert "replicas" not in spec  # the HPA owns the count
    pod = spec["template"]
    container = pod["spec"]["containers"][0]
    params = serve_params(container["args"], container_env(container))
    assert params["host"] == "0.0.0.0"
    assert params["torch_threads"] == int(container["resources"]["limits"]["cpu"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": params["http_port"], "grpc": params["grpc_port"]}
    probe_checks(container, routes, params["http_port"])
    # the drain fits in the grace period, after the preStop sleep that lets endpoints drop the pod
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(sleep[1]) + params["drain_timeout_secs"] > 0
    # the API key: ds serve reads DS_API_KEY, the pod takes it from a Secret
    api_key = next(p for p in CLI.commands["serve"].params if p.name == "api_key")
    env = {e["name"]: e for e in container["env"]}
    assert api_key.envvar == "DS_API_KEY" and "secretKeyRef" in env["DS_API_KEY"]["valueFrom"]
    assert "--api-key" not in container["args"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[str(params["model_repository"])]
    assert volume in {v["name"] for v in pod["spec"]["volumes"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == params["http_port"]
    assert annotations["prometheus.io/path"] in routes
    # the Service reaches the container's named ports and selects the pods
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_the_autoscaler_scales_on_adapter_metrics_built_from_exported_gauges(exported):
    hpa, deployment, adapter = one("HorizontalPodAutoscaler"), one("Deployment"), one("ConfigMap")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = set()
    for rule in rules:
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])  # a Pods metric needs both
        used = metric_names(rule["seriesQuery"]) | metric_names(rule["metricsQuery"])
        assert used and used <= exported, used - exported
        assert re.fullmatch(rule["name"]["matches"], metric_names(rule["seriesQuery"]).pop())
        served.add(rule["name"]["as"])
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics and all(m["metric"]["name"] in served and m["target"]["type"] == "AverageValue"
                                for m in pods_metrics)
    in_flight = next(r for r in rules if r["name"]["as"] == "ds_inference_requests_in_flight")
    assert {"ds_inference_queue_size", "ds_inference_requests_running"} <= metric_names(in_flight["metricsQuery"])


def test_scrape_configs_point_at_real_ports_and_the_metrics_route(routes):
    monitor, service = one("ServiceMonitor"), one("Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] in routes
    # training: rank 0's metrics_port is the port the PodMonitor and the pod annotations name
    job, pod_monitor = one("PyTorchJob"), one("PodMonitor")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    container = worker["spec"]["containers"][0]
    config = load_train_config(ROOT / container["command"][3], container["command"][4:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.metrics_host == "0.0.0.0" and ports["metrics"] == config.metrics_port
    assert int(worker["metadata"]["annotations"]["prometheus.io/port"]) == config.metrics_port
    assert pod_monitor["spec"]["selector"]["matchLabels"]["training.kubeflow.org/job-name"] == job["metadata"]["name"]
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_the_kserve_runtime_serves_the_inference_services_format(routes):
    runtime, service = one("ServingRuntime"), one("InferenceService")
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    params = serve_params(container["args"], container_env(container))
    assert str(params["model_repository"]) == "/mnt/models"  # where KServe puts storageUri
    assert params["host"] == "0.0.0.0" and params["http_port"] == 8080  # KServe's default HTTP port
    assert [p["containerPort"] for p in container["ports"]] == [params["http_port"]]
    probe_checks(container, routes, params["http_port"])
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == params["http_port"]
    assert annotations["prometheus.kserve.io/path"] in routes
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].split("://")[0] in {"pvc", "s3", "gs", "https"}
    assert predictor["scaleMetric"] in {"cpu", "memory", "concurrency", "rps"}
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["terminationGracePeriodSeconds"] > params["drain_timeout_secs"]


def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((DEPLOY / "grafana").glob("*.json"))}


def test_dashboards_are_what_the_script_writes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_dashboards", DEPLOY / "grafana" / "make_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(load_dashboards()) == sorted(module.DASHBOARDS)
    for name, build in module.DASHBOARDS.items():
        assert (DEPLOY / "grafana" / name).read_text() == module.render(build), f"rerun make_dashboards.py: {name}"


def test_every_dashboard_query_names_an_exported_metric(exported):
    for name, board in load_dashboards().items():
        assert 36 <= board["schemaVersion"] <= 41
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
        cells = set()
        for panel in board["panels"]:  # no two panels overlap on the 24-column grid
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cell & cells, panel["title"]
            cells |= cell
        queries = [v["definition"] for v in variables.values() if v["type"] == "query"]
        for panel in panels:
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                used = metric_names(target["expr"])
                assert used, (name, panel["title"], target["expr"])
                assert used <= exported, (name, panel["title"], used - exported)
                queries.append(target["expr"])
                if name == "deepseek-serving.json" and used != {"ds_inference_refused_total"}:
                    assert '$model' in target["expr"] and "$version" in target["expr"], panel["title"]
        assert all(metric_names(q) <= exported for q in queries)
    serving = {m for p in load_dashboards()["deepseek-serving.json"]["panels"] for t in p.get("targets", [])
               for m in metric_names(t["expr"])}
    for wanted in ("ds_inference_request_duration_seconds_bucket", "ds_generation_time_to_first_token_seconds_bucket",
                   "ds_generation_inter_token_latency_seconds_bucket", "ds_generation_completion_tokens_total",
                   "ds_inference_batch_size_sum", "ds_generation_kv_cache_utilization", "ds_embedding_requests_total",
                   "ds_retrieval_requests_total"):
        assert wanted in serving, wanted
