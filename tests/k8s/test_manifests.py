"""The deployment files: every YAML parses, each kustomize overlay renders, the rendered objects validate
against the Kubernetes API schemas (kubernetes-validate) and KEDA's CRD, and the properties that keep
elastic serving safe hold (drain time, probes, GPU request == limit, non-root, the scaler address)."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
COMPOSE = REPO / "docker" / "compose.yaml"
OVERLAYS = ("cpu", "gpu-mps", "gpu-mig")
GPU_OVERLAYS = ("gpu-mps", "gpu-mig")
WORKERS = ("elastune-prefill", "elastune-decode")
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
    assert {"scaledobject-prefill.yaml", "scaledobject-decode.yaml"} <= listed


# ---- rendering and schema validation ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(overlay: str) -> None:
    docs = _render(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for role in ("gateway", "prefill", "decode", "scaler", "valkey"):
        assert ("Deployment", f"elastune-{role}") in names and ("Service", f"elastune-{role}") in names
    for role in ("gateway", "prefill", "decode"):
        assert ("PodDisruptionBudget", f"elastune-{role}") in names
    assert {("ScaledObject", "elastune-prefill"), ("ScaledObject", "elastune-decode"),
            ("ServiceMonitor", "elastune-gateway"), ("Namespace", "elastune"),
            ("ConfigMap", "elastune-config")} <= names
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
    assert len(scaled) == 2
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
def test_workers_drain_within_their_grace_period(overlay: str) -> None:
    docs = _render(overlay)
    for name in WORKERS:
        pod = _named(docs, "Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        grace = pod["terminationGracePeriodSeconds"]
        if name == "elastune-decode":
            assert grace >= 120
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        # preStop runs before SIGTERM, inside the same grace period: sleep + drain must fit.
        assert int(sleep[1]) + float(env["ELASTUNE_DRAIN_GRACE_S"]["value"]) < grace
        assert env["ELASTUNE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert {"configMapRef": {"name": "elastune-config"}} in container["envFrom"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_has_grpc_probes_on_its_fixed_port(overlay: str) -> None:
    docs = _render(overlay)
    for name, port in (("elastune-prefill", 50051), ("elastune-decode", 50052), ("elastune-scaler", 9090)):
        (container,) = _named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
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
            (c,) = _named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
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
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
        shares[name] = int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"])
        assert abs(float(env["ELASTUNE_GPU_SHARE"]) * 100 - shares[name]) < 1
    assert shares["elastune-prefill"] > shares["elastune-decode"] and sum(shares.values()) <= 100
    (daemon,) = _of_kind(docs, "DaemonSet")
    assert daemon["spec"]["template"]["spec"]["containers"][0]["command"] == ["nvidia-cuda-mps-control", "-f"]


def test_mig_overlay_gives_each_stage_one_mig_device() -> None:
    docs = _render("gpu-mig")
    for name, profile in (("elastune-prefill", "nvidia.com/mig-3g.40gb"), ("elastune-decode", "nvidia.com/mig-1g.10gb")):
        (c,) = _named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
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
        names = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
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


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfiles_run_as_a_non_root_user_with_a_model_volume(flavour: str) -> None:
    text = (REPO / "docker" / f"Dockerfile.{flavour}").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'VOLUME ["/models"]' in text
    assert "-c constraints.txt" in text
    assert ('ENTRYPOINT ["elastune"]') in text
