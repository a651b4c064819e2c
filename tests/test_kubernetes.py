"""deploy/kubernetes (issue 26): both overlays render, validate offline against the API's schemas
(kubernetes-validate), and say what docs/kubernetes.md says: a StatefulSet of one pod in memory mode, several pods
and a PodDisruptionBudget in Redis mode, probes, a preStop pause, a grace period that covers the worst stop,
non-root on a read-only root filesystem.

Rendered by tools/kustomize_subset.py (CI's machines have no kubectl), checked against ``kubectl kustomize``
wherever kubectl is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import DOCS, HERE, load_script

KUBERNETES = HERE / "deploy" / "kubernetes"
OVERLAYS = ["memory", "redis"]
SCHEMA_VERSIONS = ["1.29.0", "1.33.0"]  # the oldest Kubernetes the manifests are for, and a recent one
kustomize = load_script(HERE / "tools" / "kustomize_subset.py")


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in kustomize.render(KUBERNETES / "overlays" / overlay)}


def workload(overlay: str) -> dict[str, Any]:
    """The overlay's one workload: memory's StatefulSet, Redis's Deployment."""
    (only,) = [doc for (kind, _), doc in rendered(overlay).items() if kind in ("Deployment", "StatefulSet")]
    return only


def container(overlay: str) -> dict[str, Any]:
    (only,) = workload(overlay)["spec"]["template"]["spec"]["containers"]
    return dict(only)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_each_overlay_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    for resource in rendered(overlay).values():
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize_where_kubectl_is_installed(overlay: str) -> None:
    ours = rendered(overlay)
    assert {kind for kind, _ in ours} >= {"Service", "ConfigMap"} and {kind for kind, _ in ours} & {"Deployment", "StatefulSet"}
    if shutil.which("kubectl") is not None:
        output = subprocess.run(["kubectl", "kustomize", str(KUBERNETES / "overlays" / overlay)], check=True,
                                capture_output=True, text=True, timeout=60).stdout
        theirs = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(output) if doc}
        assert theirs == ours


def test_the_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        kustomize.render(tmp_path)
    resource = {"spec": {"list": [1, 2]}}
    kustomize.apply_patch(resource, [{"op": "add", "path": "/spec/list/-", "value": 3},
                                     {"op": "replace", "path": "/spec/list/0", "value": 0},
                                     {"op": "remove", "path": "/spec/list/1"}])
    assert resource == {"spec": {"list": [0, 3]}}
    with pytest.raises(ValueError):
        kustomize.apply_patch(resource, [{"op": "replace", "path": "/spec/missing", "value": 1}])


def test_memory_mode_is_a_stateful_set_of_one_pod_replaced_only_once_gone() -> None:
    resources = rendered("memory")
    memory = workload("memory")
    assert memory["kind"] == "StatefulSet" and memory["spec"]["replicas"] == 1
    pods_service = resources[("Service", memory["spec"]["serviceName"])]["spec"]
    assert pods_service["clusterIP"] == "None"
    assert pods_service["selector"] == memory["spec"]["template"]["metadata"]["labels"]
    assert "REDIS_URL" not in str(container("memory").get("env", []))
    assert not [kind for kind, _ in rendered("memory") if kind == "PodDisruptionBudget"]


def test_redis_mode_is_several_pods_from_the_secret_with_a_disruption_budget() -> None:
    resources = rendered("redis")
    spec = workload("redis")["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (redis_url,) = [env for env in container("redis")["env"] if env["name"] == "REDIS_URL"]
    secret_ref = redis_url["valueFrom"]["secretKeyRef"]
    secret = resources[("Secret", secret_ref["name"])]
    assert secret["stringData"][secret_ref["key"]].startswith(("redis://", "rediss://", "redis+", "rediss+"))
    budget = resources[("PodDisruptionBudget", "agent-runner")]["spec"]
    assert budget["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    assert budget["maxUnavailable"] < spec["replicas"]


def pre_stop_seconds(overlay: str) -> float:
    command = container(overlay)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python"  # the image has python and no shell or sleep
    return float(re.fullmatch(r"import time; time\.sleep\(([\d.]+)\)", command[2])[1])  # type: ignore[index]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_documented_formula(overlay: str) -> None:
    """terminationGracePeriodSeconds >= preStop pause + SHUTDOWN_GRACE_SECONDS + 10 (docs/kubernetes.md)."""
    settings = rendered(overlay)[("ConfigMap", "agent-runner")]["data"]
    grace = workload(overlay)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pause = pre_stop_seconds(overlay)
    assert pause >= 1
    assert grace >= pause + float(settings["SHUTDOWN_GRACE_SECONDS"]) + 10
    assert "preStop pause + SHUTDOWN_GRACE_SECONDS + 10" in (DOCS / "kubernetes.md").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_check_healthz_for_liveness_and_readyz_for_readiness(overlay: str) -> None:
    probes = container(overlay)
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = probes["ports"][0]
    assert port["containerPort"] == 8000 and probes["readinessProbe"]["httpGet"]["port"] == port["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_it_runs_as_non_root_on_a_read_only_root_with_tmp_writable_and_resources_set(overlay: str) -> None:
    pod = workload(overlay)["spec"]["template"]["spec"]
    dockerfile_user = re.search(r"^USER (\d+)$", (HERE / "Dockerfile").read_text(), re.MULTILINE)[1]  # type: ignore
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    security = container(overlay)["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}
    (tmp,) = [mount for mount in container(overlay)["volumeMounts"] if mount["mountPath"] == "/tmp"]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == tmp["name"]]
    assert "emptyDir" in volume
    resources = container(overlay)["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_the_base_alone_runs_no_pod() -> None:
    """Applied alone (by mistake), the base must not start memory-mode pods that a rollout would double."""
    kinds = {doc["kind"] for doc in kustomize.render(KUBERNETES / "base")}
    assert kinds and not kinds & {"Deployment", "StatefulSet", "ReplicaSet", "Pod", "DaemonSet"}, kinds
