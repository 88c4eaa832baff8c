"""deploy/ validated against the Kubernetes schemas, offline.

Every document under deploy/k8s/, the Secret that deploy/k8s/make-secret.sh prints (the script is
run), the ConfigMaps deploy/kustomization.yaml generates (built from the files it names, with its
labels, as kustomize does minus the name hash), and the KEDA objects in each `redis_mode` form
(tests/test_cluster_keda.py `render`) are validated with `kubernetes-validate` against the
OpenAPI-derived JSON schemas of Kubernetes K8S_VERSION, strict: an unknown field is an error, as
`kubectl apply --validate=strict` makes it.

The custom resources (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
ServiceMonitor) have no schema on PyPI or in the Kubernetes API. Their schemas below are written
from the KEDA 2.x and Prometheus Operator v1 API references, limited to the fields those objects
document, strict at every level we write (an unknown or misspelt field fails), with KEDA's rule that
trigger metadata values are strings; and the parts that are core Kubernetes types (object
metadata, the HPA `behavior` KEDA passes through, the label selector) are checked against the
Kubernetes schema itself. Each negative case below must fail, so the checks can fail.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any, Final

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource
from test_cluster_keda import TYPES, manifest, render

ROOT: Final = Path(__file__).resolve().parents[1]
DEPLOY: Final = ROOT / "deploy"
K8S_VERSION: Final = "1.30.0"  # a cluster version KEDA 2.14+ and the Prometheus Operator support
CUSTOM_KINDS: Final = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}

_DEFS_FILE = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json"
_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"


def _core(name: str) -> dict[str, str]:
    return {"$ref": _DEFS + name}


_STRINGS: Final = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA: Final = _core("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": props, "required": list(required)}


_INT: Final = {"type": "integer", "minimum": 0}
# KEDA 2.x, keda.sh/v1alpha1 (https://keda.sh/docs/2.14/reference/scaledobject-spec/ and .../authentication/).
SCALED_OBJECT: Final = _kind("keda.sh/v1alpha1", "ScaledObject", _obj({
    "scaleTargetRef": _obj({"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                            "envSourceContainerName": {"type": "string"}}, ("name",)),
    "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT, "idleReplicaCount": _INT,
    "minReplicaCount": _INT, "maxReplicaCount": _INT,
    "fallback": _obj({"failureThreshold": _INT, "replicas": _INT}, ("failureThreshold", "replicas")),
    "advanced": _obj({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        "horizontalPodAutoscalerConfig": _obj({
            "name": {"type": "string"},
            "behavior": _core("io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior")}),
        "scalingModifiers": _obj({"formula": {"type": "string"}, "target": {"type": "string"},
                                  "activationTarget": {"type": "string"},
                                  "metricType": {"enum": ["AverageValue", "Value", "Utilization"]}})}),
    "triggers": {"type": "array", "minItems": 1, "items": _obj({
        "type": {"type": "string"}, "name": {"type": "string"}, "metadata": _STRINGS,
        "authenticationRef": _obj({"name": {"type": "string"},
                                   "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                                  ("name",)),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"}}, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))
TRIGGER_AUTHENTICATION: Final = _kind("keda.sh/v1alpha1", "TriggerAuthentication", _obj({
    "secretTargetRef": {"type": "array", "items": _obj(
        {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}},
        ("parameter", "name", "key"))},
    "env": {"type": "array", "items": _obj(
        {"parameter": {"type": "string"}, "name": {"type": "string"}, "containerName": {"type": "string"}},
        ("parameter", "name"))},
}))
# Prometheus Operator, monitoring.coreos.com/v1 (the ServiceMonitor and Endpoint types of its API reference).
SERVICE_MONITOR: Final = _kind("monitoring.coreos.com/v1", "ServiceMonitor", _obj({
    "jobLabel": {"type": "string"},
    "selector": _core("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
    "namespaceSelector": _obj({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "endpoints": {"type": "array", "items": _obj({
        "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]}, "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]}, "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}, "honorLabels": {"type": "boolean"},
        "params": {"type": "object"}})},
}, ("selector",)))
CUSTOM_SCHEMAS: Final = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION,
                         "ServiceMonitor": SERVICE_MONITOR}


def validate(doc: dict[str, Any]) -> None:
    """Raises jsonschema / kubernetes_validate ValidationError for a document that does not conform."""
    if doc["kind"] in CUSTOM_KINDS:
        registry: Registry = Resource.from_contents(schema_contents(_DEFS_FILE, K8S_VERSION)) @ Registry()
        jsonschema.Draft202012Validator(CUSTOM_SCHEMAS[doc["kind"]], registry=registry).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{f.name}:{d['kind']}/{d['metadata']['name']}", d) for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


def kustomize_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps deploy/kustomization.yaml generates, built as kustomize builds them (no hash suffix)."""
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    labels = {key: val for entry in k.get("labels", []) for key, val in entry["pairs"].items()}
    out = []
    for gen in k["configMapGenerator"]:
        data = {}
        for spec in gen["files"]:
            key, _, rel = spec.partition("=")
            data[key] = (DEPLOY / rel).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"], "labels": labels},
                    "data": data})
    return out


def test_kustomization_names_every_manifest_and_every_generated_file_exists() -> None:
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f"k8s/{f.name}" for f in (DEPLOY / "k8s").glob("*.yaml")
                                            if f.name != "secret.example.yaml")
    assert len(kustomize_configmaps()) == len(k["configMapGenerator"])


@pytest.mark.parametrize("name,doc", manifest_docs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_validates_strictly(name: str, doc: dict[str, Any]) -> None:
    validate(doc)


def test_generated_configmaps_and_the_printed_secret_validate() -> None:
    for cm in kustomize_configmaps():
        validate(cm)
    out = subprocess.run(["sh", str(DEPLOY / "k8s" / "make-secret.sh"), "lmx-test"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["Secret"]
    validate(docs[0])


@pytest.mark.parametrize("mode", sorted(TYPES))
def test_keda_objects_validate_in_every_redis_mode(mode: str) -> None:
    for doc in render(manifest(), mode).values():
        validate(doc)


def _worker() -> dict[str, Any]:
    return next(d for n, d in manifest_docs() if n.startswith("worker.yaml:Deployment"))


def _scaled_object() -> dict[str, Any]:
    return copy.deepcopy(manifest()["ScaledObject"])


def _bad_cases() -> list[tuple[str, dict[str, Any]]]:
    typo = copy.deepcopy(_worker())
    typo["spec"]["replicass"] = 2  # misspelt field
    port = copy.deepcopy(_worker())
    port["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "9100"}]  # a string port
    number = _scaled_object()
    number["spec"]["triggers"][0]["metadata"]["streamLength"] = 16  # KEDA metadata is string -> string
    keda_typo = _scaled_object()
    keda_typo["spec"]["maxReplicas"] = 8  # HPA's name, not KEDA's maxReplicaCount
    behavior = _scaled_object()
    behavior["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["policies"][0]["type"] = 2
    monitor = copy.deepcopy(next(d for n, d in manifest_docs() if n.startswith("servicemonitor.yaml")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    return [("misspelt Deployment field", typo), ("string containerPort", port),
            ("integer KEDA metadata", number), ("unknown ScaledObject field", keda_typo),
            ("HPA behavior policy type not a string", behavior), ("ServiceMonitor interval not a duration", monitor)]


@pytest.mark.parametrize("what,doc", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_broken_manifest_fails_validation(what: str, doc: dict[str, Any]) -> None:
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)
