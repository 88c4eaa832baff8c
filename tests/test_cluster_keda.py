"""The KEDA manifest (deploy/k8s/keda-scaledobject.yaml) sees every priority band of every model
of deploy/config/worker.example.toml, and its Cluster and Sentinel forms (the trigger types KEDA
has for them) are complete. The manifest is parsed as Kubernetes reads it (YAML documents);
nothing is mocked.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from producer_sdk.keys import PRIORITY_BANDS, Keys
from worker.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
TYPES = {"standalone": "redis-streams", "cluster": "redis-cluster-streams", "sentinel": "redis-sentinel-streams"}


def manifest() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "keda-scaledobject.yaml").read_text()))
    return {d["kind"]: d for d in docs if d}


def render(docs: dict[str, dict[str, Any]], mode: str) -> dict[str, dict[str, Any]]:
    """The manifest for redis_mode `mode`, as its comments say: trigger type, and the seed nodes or
    Sentinels as `addresses` (plus sentinelMaster) in the TriggerAuthentication."""
    out = copy.deepcopy(docs)
    for t in out["ScaledObject"]["spec"]["triggers"]:
        t["type"] = TYPES[mode]
        if mode == "sentinel":
            t["metadata"]["sentinelMaster"] = "mymaster"
        if mode == "cluster":
            t["metadata"].pop("databaseIndex", None)  # a Cluster has database 0 only
    if mode != "standalone":
        for ref in out["TriggerAuthentication"]["spec"]["secretTargetRef"]:
            if ref["parameter"] == "address":
                ref["parameter"], ref["key"] = "addresses", "redis-addresses"
    return out


def test_every_band_of_every_model_has_a_trigger_with_its_max_running() -> None:
    settings = load_settings(DEPLOY / "config" / "worker.example.toml")
    keys = Keys(settings.key_prefix)
    want = {(keys.req(m.name, band), str(m.max_running)) for m in settings.models for band in PRIORITY_BANDS}
    docs = manifest()
    triggers = docs["ScaledObject"]["spec"]["triggers"]
    got = {(t["metadata"]["stream"], t["metadata"]["streamLength"]) for t in triggers}
    assert got == want
    assert len(triggers) == len(want) == 3 * len(settings.models)


def test_cluster_and_sentinel_forms_are_complete() -> None:
    docs = manifest()
    auth_name = docs["TriggerAuthentication"]["metadata"]["name"]
    for mode, trigger_type in TYPES.items():
        out = render(docs, mode)
        spec = out["ScaledObject"]["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        params = {r["parameter"] for r in out["TriggerAuthentication"]["spec"]["secretTargetRef"]}
        assert params == ({"address", "username", "password"} if mode == "standalone"
                          else {"addresses", "username", "password"})
        for t in spec["triggers"]:
            assert t["type"] == trigger_type
            assert t["authenticationRef"]["name"] == auth_name
            md = t["metadata"]
            assert "consumerGroup" not in md  # stream-length mode (see the manifest's header)
            assert md["stream"].count("{") == 1 and int(md["streamLength"]) >= 1
            assert ("sentinelMaster" in md) == (mode == "sentinel")
