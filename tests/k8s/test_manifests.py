"""The deployment files: every YAML parses, each kustomize overlay renders, the rendered objects validate
against the Kubernetes API schemas (kubernetes-validate) and KEDA's CRD, and the properties that keep
elastic serving safe hold (drain time, probes, GPU request == limit, non-root, the scaler address)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import from_env
from services.tuner.config import TunerConfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
COMPOSE = REPO / "docker" / "compose.yaml"
OVERLAYS = ("cpu", "gpu-mps", "gpu-mig")
GPU_OVERLAYS = ("gpu-mps", "gpu-mig")
WORKERS = ("elastune-prefill", "elastune-decode", "elastune-experts-g0")
TUNED = ("elastune-prefill", "elastune-decode", "elastune-experts-g0")  # worker pods with the tuner sidecar
PORTS = {"elastune-prefill": 50051, "elastune-decode": 50052, "elastune-experts-g0": 50053, "elastune-scaler": 9090}
# The longest generation a decode pod may have to finish when it cannot migrate it: 2048 tokens (the gateway's
# max_tokens_limit) at ~40 ms/token. terminationGracePeriodSeconds must be at least twice that.
P99_GENERATION_S = 80
K8S_VERSION = "1.33.0"  # the Kubernetes API version the core objects are validated against
CORE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Service", "ConfigMap", "Namespace", "PodDisruptionBudget"}
INT32 = (-(2**31), 2**31 - 1)


def _kubectl() -> str | None:
    return shutil.which("kubectl") or next((p for p in ("/usr/bin/kubectl", "/usr/local/bin/kubectl") if os.access(p, os.X_OK)), None)


@lru_cache(maxsize=None)
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found: install it to render the kustomize overlays (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


def _of_kind(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(docs, deployment: str, name: str | None = None) -> dict[str, Any]:
    """The named container of a Deployment's pods (default: the one named after its role)."""
    name = name or deployment.removeprefix("elastune-").split("-")[0]
    (c,) = [c for c in _named(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def _pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


# ---- every file parses ----

def _yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml")) + [COMPOSE]


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_base_kustomization_lists_every_manifest_in_the_namespace() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "elastune"
    listed = set(kustomization["resources"])
    present = {p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present
    assert {"scaledobject-prefill.yaml", "scaledobject-decode.yaml", "scaledobject-experts-g0.yaml"} <= listed


# ---- rendering and schema validation ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(overlay: str) -> None:
    docs = _render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for role in ("gateway", "prefill", "decode", "scaler", "valkey"):
        assert ("Deployment", f"elastune-{role}") in names and ("Service", f"elastune-{role}") in names
    for role in ("gateway", "prefill", "decode", "experts-g0"):
        assert ("PodDisruptionBudget", f"elastune-{role}") in names
    assert {("ScaledObject", "elastune-prefill"), ("ScaledObject", "elastune-decode"),
            ("ScaledObject", "elastune-experts-g0"), ("Deployment", "elastune-experts-g0"),
            ("Service", "elastune-experts-g0"), ("ServiceMonitor", "elastune-gateway"),
            ("ServiceMonitor", "elastune-scaler"), ("Namespace", "elastune"), ("ConfigMap", "elastune-config")} <= names
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "elastune", d["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_the_kubernetes_api(overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    problems = []
    for doc in _render(overlay):
        if doc["kind"] not in CORE_KINDS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert problems == []


def test_kubernetes_validate_rejects_a_broken_deployment() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    doc = yaml.safe_load(yaml.safe_dump(_named(_render("cpu"), "Deployment", "elastune-decode")))
    doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)
    doc = yaml.safe_load(yaml.safe_dump(_named(_render("cpu"), "Deployment", "elastune-decode")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kv.ValidationError):  # strict: unknown fields are errors
        kv.validate(doc, K8S_VERSION, strict=True)


@lru_cache(maxsize=1)
def _keda_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    shared = Path(os.environ.get("ELASTUNE_SHARED") or REPO.parent / "shared")
    path = shared / "schemas" / "keda.sh_scaledobjects.yaml"
    if not path.is_file():
        pytest.skip(f"KEDA's ScaledObject CRD not found at {path}; set ELASTUNE_SHARED to the shared folder")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    formats = jsonschema.FormatChecker()
    formats.checks("int32")(lambda v: not isinstance(v, int) or INT32[0] <= v <= INT32[1])
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"], format_checker=formats)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_scaled_objects_validate_against_the_keda_crd(overlay: str) -> None:
    validator = _keda_validator()
    scaled = _of_kind(_render(overlay), "ScaledObject")
    assert len(scaled) == 3
    for doc in scaled:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], doc["metadata"]["name"]
        target = doc["spec"]["scaleTargetRef"]["name"]
        _named(_render(overlay), "Deployment", target)  # scales a Deployment that exists


# ---- the properties that matter ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaler_service_matches_every_scaler_address(overlay: str) -> None:
    docs = _render(overlay)
    service = _named(docs, "Service", "elastune-scaler")
    ports = {p["port"] for p in service["spec"]["ports"]}
    deployment = _named(docs, "Deployment", "elastune-scaler")
    container_ports = {p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for so in _of_kind(docs, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
            name, namespace, *rest = host.split(".")
            assert (name, namespace) == (service["metadata"]["name"], service["metadata"]["namespace"])
            assert rest in ([], ["svc"], ["svc", "cluster", "local"])
            assert int(port) in ports and int(port) in container_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_drain_through_the_admin_rpc_within_their_grace_period(overlay: str) -> None:
    from services.cli import _drain, build_parser

    docs = _render(overlay)
    for name in WORKERS:
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        container = _container(docs, name)
        env = {e["name"]: e for e in container["env"]}
        grace = pod["terminationGracePeriodSeconds"]
        if name == "elastune-decode":
            assert grace >= 2 * P99_GENERATION_S
        # preStop runs before SIGTERM, inside the same grace period: `elastune drain` on the worker's own
        # port, a command line the CLI accepts, bounded so that it and the shutdown after it fit.
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "elastune"
        args = build_parser().parse_args(command[1:])
        assert args.func is _drain
        assert args.address == f"127.0.0.1:{env['ELASTUNE_PORT']['value']}" == f"127.0.0.1:{PORTS[name]}"
        assert 0 < args.grace <= float(env["ELASTUNE_DRAIN_GRACE_S"]["value"])
        assert args.grace + 10 <= grace
        assert env["ELASTUNE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert {"configMapRef": {"name": "elastune-config"}} in container["envFrom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pods_run_the_tuner_sidecar_at_the_workers_share(overlay: str) -> None:
    docs = _render(overlay)
    for name in TUNED:
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        stage = name.removeprefix("elastune-").split("-")[0]  # elastune-experts-g0: the container is "experts"
        assert pod["containers"][0]["name"] == stage  # overlays patch containers/0
        worker, tuner = _container(docs, name), _container(docs, name, "tuner")
        assert tuner["image"] == worker["image"]
        assert tuner["args"][:2] == ["serve", "tuner"]
        assert tuner["args"][2:] == ["--worker", f"127.0.0.1:{PORTS[name]}"]
        assert {"configMapRef": {"name": "elastune-config"}} in tuner["envFrom"]  # the store: the tuning table
        w_env = {e["name"]: e.get("value") for e in worker["env"]}
        t_env = {e["name"]: e.get("value") for e in tuner["env"]}
        assert t_env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == w_env.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"), name
        # the sidecar's own config (services/tuner/config.py) sees the worker's share and address
        tuner_config = from_env(TunerConfig, {k: v for k, v in t_env.items() if v is not None})
        assert tuner_config.share == float(w_env["ELASTUNE_GPU_SHARE"]), name
        assert tuner_config.worker == f"127.0.0.1:{PORTS[name]}" and tuner_config.metrics_port > 0
        assert _gpu_resources(tuner.get("resources", {})) == {}  # it tunes the worker, it computes nothing
        assert tuner["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pods_mount_the_model_cache(overlay: str) -> None:
    docs = _render(overlay)
    for name in WORKERS + ("elastune-gateway",):
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "models" in volumes
        worker = _container(docs, name)
        assert {"name": "models", "mountPath": "/models"} in worker["volumeMounts"]
        (init,) = pod["initContainers"]
        model_dir = {e["name"]: e.get("value") for e in worker["env"]}.get("ELASTUNE_MODEL_DIR", "/models/tiny")
        assert f"--out {model_dir}" in init["command"][-1]  # the init container fills the directory served


def test_experts_group_is_scaled_by_its_own_scaled_object() -> None:
    docs = _render("cpu")
    so = _named(docs, "ScaledObject", "elastune-experts-g0")
    assert so["spec"]["scaleTargetRef"]["name"] == "elastune-experts-g0"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] in ("external", "external-push")
    assert (trigger["metadata"]["stage"], trigger["metadata"]["group"]) == ("experts", "g0")
    deployment = _named(docs, "Deployment", "elastune-experts-g0")
    assert deployment["spec"]["replicas"] == so["spec"]["minReplicaCount"]
    experts = _container(docs, "elastune-experts-g0")
    assert experts["args"] == ["serve", "experts"]
    assert {e["name"]: e.get("value") for e in experts["env"]}["ELASTUNE_EXPERT_GROUP"] == "g0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_has_grpc_probes_on_its_fixed_port(overlay: str) -> None:
    docs = _render(overlay)
    for name, port in PORTS.items():
        container = _container(docs, name)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ELASTUNE_PORT"] == str(port)
        assert port in {p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
    (gateway,) = _named(docs, "Deployment", "elastune-gateway")["spec"]["template"]["spec"]["containers"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health" and "livenessProbe" in gateway


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_container_runs_as_root(overlay: str) -> None:
    for where, pod in _pod_specs(_render(overlay)):
        pod_ctx = pod.get("securityContext", {})
        for c in pod.get("initContainers", []) + pod["containers"]:
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, (where, c["name"])
            assert ctx.get("runAsUser", 1) != 0, (where, c["name"])
            assert ctx.get("privileged") is not True and ctx.get("allowPrivilegeEscalation") is False, (where, c["name"])


def _gpu_resources(resources: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    names = {k for part in ("requests", "limits") for k in resources.get(part, {}) if k.startswith("nvidia.com/")}
    return {k: (resources.get("requests", {}).get(k), resources.get("limits", {}).get(k)) for k in names}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_gpu_overlays_with_request_equal_to_limit(overlay: str) -> None:
    docs = _render(overlay)
    for where, pod in _pod_specs(docs):
        for c in pod["containers"]:
            gpus = _gpu_resources(c.get("resources", {}))
            for resource, (request, limit) in gpus.items():
                assert request is not None and str(request) == str(limit), (where, resource, request, limit)
            if overlay not in GPU_OVERLAYS:
                assert gpus == {}, where
    if overlay in GPU_OVERLAYS:
        for name in WORKERS:
            c = _container(docs, name)
            assert len(_gpu_resources(c["resources"])) == 1, name
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["ELASTUNE_DEVICE"] == "cuda"
            assert 0 < float(env["ELASTUNE_GPU_SHARE"]) <= 1
            assert c["image"].endswith(":cuda")


def test_mps_overlay_splits_the_gpu_between_stages() -> None:
    docs = _render("gpu-mps")
    shares = {}
    for name in WORKERS:
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["hostIPC"] is True
        assert any(v.get("hostPath", {}).get("path") == "/tmp/nvidia-mps" for v in pod["volumes"])
        c = _container(docs, name)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
        shares[name] = int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"])
        assert abs(float(env["ELASTUNE_GPU_SHARE"]) * 100 - shares[name]) < 1
    assert shares["elastune-prefill"] > shares["elastune-decode"]
    assert shares["elastune-prefill"] + shares["elastune-decode"] <= 100  # the two stages of a node's GPU
    (daemon,) = _of_kind(docs, "DaemonSet")
    assert daemon["spec"]["template"]["spec"]["containers"][0]["command"] == ["nvidia-cuda-mps-control", "-f"]


def test_mig_overlay_gives_each_stage_one_mig_device() -> None:
    docs = _render("gpu-mig")
    for name, profile in (("elastune-prefill", "nvidia.com/mig-3g.40gb"), ("elastune-decode", "nvidia.com/mig-1g.10gb"),
                          ("elastune-experts-g0", "nvidia.com/mig-1g.10gb")):
        c = _container(docs, name)
        assert _gpu_resources(c["resources"]) == {profile: (1, 1)}


def test_service_monitor_scrapes_the_gateway_metrics() -> None:
    docs = _render("cpu")
    monitor = _named(docs, "ServiceMonitor", "elastune-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _named(docs, "Service", "elastune-gateway")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("http", 8000), ("grpc", 50050)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods(overlay: str) -> None:
    docs = _render(overlay)
    for service in _of_kind(docs, "Service"):
        deployment = _named(docs, "Deployment", service["metadata"]["name"])
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        names = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)
    for pdb in _of_kind(docs, "PodDisruptionBudget"):
        pod_labels = _named(docs, "Deployment", pdb["metadata"]["name"])["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# ---- docker compose ----

def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_with_the_docker_cli() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip(f"docker compose plugin not available: {(probe.stderr or probe.stdout).strip()[:200]}")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_compose_services_and_start_order() -> None:
    services = _compose()["services"]
    assert {"valkey", "model-init", "gateway", "prefill", "decode", "scaler"} <= set(services)
    assert services["gateway"]["ports"][0].split(":")[-1] == "8000"
    for name in ("gateway", "prefill", "decode", "scaler"):
        service = services[name]
        assert service["command"][:2] == ["serve", name]
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy"
        assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD", name
        assert service["environment"]["REDIS_URL"].startswith("redis://valkey:")
    for name in ("gateway", "prefill", "decode"):
        assert services[name]["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["ELASTUNE_MODEL_DIR"] == "/models/tiny"
    assert "model create tiny --out /models/tiny" in " ".join(services["model-init"]["command"])
    assert services["prefill"]["environment"]["ELASTUNE_PORT"] == "50051"
    assert services["decode"]["environment"]["ELASTUNE_PORT"] == "50052"
    assert services["scaler"]["environment"]["ELASTUNE_PORT"] == "9090"


def test_compose_depends_on_names_real_services() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services) - {name}, name


def _compose_problems(doc: dict[str, Any]) -> str | None:
    """The compose-spec parser's objection (the Rust `compose_spec` crate, strict: unknown keys, bad
    durations, ports, conditions), or None. YAML merge keys are resolved by PyYAML first, as compose does."""
    compose_spec = pytest.importorskip("compose_spec", reason="pip install compose-spec")
    try:
        compose_spec.PyCompose.from_json(json.dumps(doc))
    except ValueError as exc:
        return str(exc)
    return None


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert _compose_problems(_compose()) is None


@pytest.mark.parametrize("path,value", [
    (("services", "gateway", "depends_on", "valkey", "condition"), "service_sometimes"),
    (("services", "decode", "stop_grace_period"), "soon"),
    (("services", "gateway", "ports"), ["80000:8000"]),
    (("services", "prefill", "healthcheck", "intervall"), "5s"),
])
def test_compose_validation_rejects_broken_files(path: tuple, value: Any) -> None:
    doc = _compose()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert _compose_problems(doc) is not None


def test_compose_references_resolve_and_every_server_has_a_health_check() -> None:
    doc = _compose()
    services, volumes = doc["services"], set(doc.get("volumes", {}))
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source.startswith(("/", ".")) or source in volumes, (name, mount)
        if name != "model-init":  # a one-shot job
            assert service["healthcheck"]["test"][0] == "CMD", name
    experts = services["experts"]
    assert experts["profiles"] == ["moe"] and "exec elastune serve experts" in experts["command"][-1]
    assert experts["environment"]["ELASTUNE_EXPERT_GROUP"] == "g0"
    assert "127.0.0.1:50053" in experts["healthcheck"]["test"][-1]


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfiles_run_as_a_non_root_user_with_a_model_volume(flavour: str) -> None:
    text = (REPO / "docker" / f"Dockerfile.{flavour}").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/models"]' in text
    assert "-c constraints.txt" in text
    assert ('ENTRYPOINT ["elastune"]') in text
