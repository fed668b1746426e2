"""deploy/k8s validated offline (docs/scale.md, "How the manifests are checked").

* Built-in kinds (Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler,
  PersistentVolumeClaim, ConfigMap) against Kubernetes' own OpenAPI schemas in strict mode (no
  unknown field anywhere), for the oldest and the newest version kubernetes-validate bundles
  that we support (1.29 and its latest), so a typo in a field name fails here, not at apply.
* ServiceMonitor and PodMonitor (monitoring.coreos.com/v1) against the prometheus-operator
  CRDs' schema, as cloudcoil-models-prometheus-operator ships it (pydantic models generated from
  the CRDs), made strict; without that package ([k8s] extra), the structural checks only.
* RayService (ray.io/v1): no package ships KubeRay's CRD schema, so a structural schema of the
  fields we use (names from the KubeRay v1 API), every pod template against Kubernetes'
  PodTemplateSpec (strict), and serveConfigV2 against Ray Serve's own config schema (with Ray)
  and equal to deploy/ray/serve_config.yaml.
* How the pieces fit: selectors, port names, probe paths, the GPU, the read-only database
  volume, the HPA's metric and the prometheus-adapter rule that makes it, the kustomizations.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the [dev] or [k8s] extra) is not installed"
)
from kubernetes_validate.utils import latest_version  # noqa: E402
from kubernetes_validate.utils import validate as k8s_validate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"
VERSIONS = ("1.29", latest_version())
BUILT_IN = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
            "ConfigMap"}
HAVE_CRD_MODELS = importlib.util.find_spec("cloudcoil") is not None and (
    importlib.util.find_spec("cloudcoil.models.prometheus_operator") is not None
)


def _documents() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


DOCS = _documents()


def _one(kind: str, name: str | None = None) -> dict:
    matches = [doc for _, doc in DOCS if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name or ''}: {len(matches)} found"
    return matches[0]


def _id(item) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}"


def test_every_kind_is_known():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert kinds == BUILT_IN | {"ServiceMonitor", "PodMonitor", "RayService"}, kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", [d for d in DOCS if d[1]["kind"] in BUILT_IN], ids=_id)
def test_built_in_kinds_match_the_kubernetes_schema_strictly(item, version):
    k8s_validate(item[1], version, strict=True)


# -- CRDs ------------------------------------------------------------------------------------


def _strict(schema):
    """Every object schema with named properties refuses other properties (CRDs' structural
    schemas prune unknown fields silently; a typo must fail here instead)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@lru_cache(maxsize=None)
def _monitor_schema(kind: str) -> dict:
    from cloudcoil.models.prometheus_operator import v1

    return _strict(getattr(v1, kind).model_json_schema(by_alias=True))


@pytest.mark.skipif(not HAVE_CRD_MODELS,
                    reason="cloudcoil-models-prometheus-operator (the [k8s] extra) is not installed")
@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitors_match_the_prometheus_operator_crd_schema(kind):
    doc = _one(kind)
    schema = _monitor_schema(kind)
    jsonschema.validate(doc, schema)
    # The strict schema does catch a misspelt field.
    endpoints = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    typo = {**doc, "spec": {**doc["spec"], endpoints: [{**doc["spec"][endpoints][0], "intervall": "15s"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "labels": LABELS}}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # map[string]string in KubeRay
RAYSERVICE_SCHEMA = _strict({
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "properties": {
                "serveConfigV2": {"type": "string"},
                "upgradeStrategy": {"type": "object", "properties": {"type": {"enum": ["NewCluster", "None"]}}},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "properties": {
                                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            },
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "properties": {"rayStartParams": START_PARAMS, "template": {"type": "object"},
                                           "serviceType": {"type": "string"}},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "properties": {
                                    "groupName": {"type": "string", "minLength": 1},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": START_PARAMS,
                                    "template": {"type": "object"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
})


def _rayservice() -> dict:
    return _one("RayService")


def _pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]


def test_rayservice_has_the_structure_of_kuberay_v1():
    rayservice = _rayservice()
    jsonschema.validate(rayservice, RAYSERVICE_SCHEMA)
    cluster = rayservice["spec"]["rayClusterConfig"]
    typo = {**rayservice, "spec": {**rayservice["spec"], "rayClusterConfig": {
        **cluster, "workerGroupSpecs": [{**cluster["workerGroupSpecs"][0], "maxReplica": 8}]}}}
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(typo, RAYSERVICE_SCHEMA)


@pytest.mark.parametrize("version", VERSIONS)
def test_rayservice_pod_templates_match_the_kubernetes_schema_strictly(version):
    for template in _pod_templates(_rayservice()):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                     version, strict=True)


def test_rayservice_serve_config_is_the_serve_config_file():
    embedded = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(SERVE_CONFIG.read_text())
    if importlib.util.find_spec("ray") is not None:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(embedded)


def test_rayservice_workers_fit_the_replicas():
    rayservice = _rayservice()
    cluster = rayservice["spec"]["rayClusterConfig"]
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    (deployment,) = application["deployments"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    actor = deployment["ray_actor_options"]
    assert gpus_per_pod == container["resources"]["requests"]["nvidia.com/gpu"] == actor["num_gpus"] == 1
    assert float(limits["cpu"]) >= actor["num_cpus"] + 1  # one CPU left for Ray's own processes
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert deployment["autoscaling_config"]["max_replicas"] <= group["maxReplicas"] * gpus_per_pod
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert cluster["rayVersion"] in (REPO / "pyproject.toml").read_text()  # the [ray] extra's pin
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    metrics_port = int(application["runtime_env"]["env_vars"]["IRT_RAY_METRICS_PORT"])
    assert ports["irt-metrics"] == metrics_port and ports["serve"] == 8000
    mount = _mount(group["template"]["spec"], container, "models")
    assert env["IRT_MODEL"].startswith(mount + "/")
    monitor = _one("PodMonitor")
    assert _selects(monitor["spec"]["selector"], group["template"]["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"irt-metrics"}


# -- the plain Deployment and what goes with it ------------------------------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", selector).items())


def _mount(pod_spec: dict, container: dict, volume: str) -> str:
    """The mount path of ``volume``, after checking it is a read-only mount of the models PVC."""
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    (source,) = [v for v in pod_spec["volumes"] if v["name"] == volume]
    pvc = _one("PersistentVolumeClaim")
    assert mount["readOnly"] is True and source["persistentVolumeClaim"]["readOnly"] is True
    assert source["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    return mount["mountPath"]


def _container() -> tuple[dict, dict]:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_deployment_asks_one_gpu_and_mounts_the_database_read_only():
    pod, container = _container()
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = _mount(pod, container, "models")
    assert env["IRT_MODEL"].startswith(mount + "/")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert env["IRT_CACHE_DIR"] in writable and "/tmp" in writable
    # A stopping server answers its queue first: the grace period outlasts IRT_TIMEOUT_S.
    assert pod["terminationGracePeriodSeconds"] > float(env["IRT_TIMEOUT_S"]) + 5
    assert "replicas" not in _one("Deployment")["spec"]  # the HPA owns the count


def test_the_probes():
    _pod, container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000} and container["command"][-1] == "8000"
    live, ready, start = container["livenessProbe"], container["readinessProbe"], container["startupProbe"]
    paths = (live["httpGet"]["path"], ready["httpGet"]["path"], start["httpGet"]["path"])
    assert paths == ("/healthz", "/readyz", "/healthz")
    assert {p["httpGet"]["port"] for p in (live, ready, start)} == {"http"}
    # Long enough for the model load and the database checksum pass (the server listens after it).
    assert start["periodSeconds"] * start["failureThreshold"] >= 600


def test_service_pdb_hpa_and_service_monitor_select_the_deployment():
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"], pod_labels)
    service = _one("Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert _selects(_one("PodDisruptionBudget")["spec"]["selector"], pod_labels)
    monitor = _one("ServiceMonitor")
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, a drain never empties it
    assert _one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_hpa_metric_is_made_by_the_adapter_rule_from_a_series_the_service_exports():
    from imageragturbo.service.metrics import ServiceMetrics

    (metric,) = _one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    config = yaml.safe_load(_one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(f"{name}{{") and set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    exported = ServiceMetrics(model="m", engine="torch", queue_depth=lambda: 3).render().decode()
    assert f"{name} 3.0" in exported


def test_kustomizations_list_every_manifest_of_their_folder():
    tops = sorted(K8S.rglob("kustomization.yaml"))
    assert {p.parent.relative_to(K8S).as_posix() for p in tops} == {".", "models", "ray"}
    listed: set[Path] = set()
    for path in tops:
        kustomization = yaml.safe_load(path.read_text())
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert kustomization["kind"] == "Kustomization"
        for resource in kustomization["resources"]:
            target = (path.parent / resource).resolve()
            assert target.exists(), f"{path}: {resource} does not exist"
            # kustomize loads files only below the kustomization's folder; others only as folders.
            assert target.is_dir() or target.parent == path.parent, f"{path}: {resource} is outside its folder"
            if target.is_file():
                listed.add(target)
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    # The adapter rule belongs to the monitoring stack's own ConfigMap, not to this app.
    assert manifests - listed == {(K8S / "prometheus-adapter" / "rules-configmap.yaml").resolve()}
