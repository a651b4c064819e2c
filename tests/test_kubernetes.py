"""deploy/kubernetes (issues 26 and 28): every overlay renders, validates offline against the API's schemas
(kubernetes-validate), and says what docs/kubernetes.md says: a StatefulSet of one pod in memory mode, several pods
and a PodDisruptionBudget in Redis and PostgreSQL modes, probes, a preStop pause, a grace period that covers the
worst stop, non-root on a read-only root filesystem, settings the service accepts.

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
from service.backends import check_settings
from service.backends.postgres import database, schema
from service.settings import Settings

KUBERNETES = HERE / "deploy" / "kubernetes"
OVERLAYS = ["memory", "redis", "postgres"]
SHARED_STORE = {"redis": "REDIS_URL", "postgres": "DATABASE_URL"}  # the overlays of several pods, and their store
WORKLOADS = {"Deployment", "StatefulSet", "ReplicaSet", "Pod", "DaemonSet", "Job", "CronJob"}
SCHEMA_VERSIONS = ["1.29.0", "1.33.0"]  # the oldest Kubernetes the manifests are for, and a recent one
kustomize = load_script(HERE / "tools" / "kustomize_subset.py")


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in kustomize.render(KUBERNETES / "overlays" / overlay)}


def workload(overlay: str) -> dict[str, Any]:
    """The overlay's one workload: memory's StatefulSet, Redis's and PostgreSQL's Deployment."""
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
    assert not [kind for kind, _ in rendered("memory") if kind == "PodDisruptionBudget"]


def environment(overlay: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: the ConfigMap's data, then ``env`` (secrets read)."""
    resources = rendered(overlay)
    env = dict(resources[("ConfigMap", container(overlay)["envFrom"][0]["configMapRef"]["name"])]["data"])
    for entry in container(overlay).get("env", []):
        if "valueFrom" in entry:
            secret_ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = resources[("Secret", secret_ref["name"])]["stringData"][secret_ref["key"]]
        else:
            env[entry["name"]] = entry["value"]
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlays_settings_pass_the_services_start_checks_and_name_its_store(overlay: str) -> None:
    settings = Settings.from_env(environment(overlay))
    check_settings(settings)  # the URL as the store's client reads it (a Sentinel URL, libpq's parameters)
    store = SHARED_STORE.get(overlay)
    assert (settings.redis_url is not None, settings.database_url is not None) == (store == "REDIS_URL",
                                                                                   store == "DATABASE_URL")


@pytest.mark.parametrize("overlay", SHARED_STORE)
def test_shared_store_modes_are_several_pods_from_the_secret_with_a_disruption_budget(overlay: str) -> None:
    resources = rendered(overlay)
    spec = workload(overlay)["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (url,) = [env for env in container(overlay)["env"] if env["name"] == SHARED_STORE[overlay]]
    assert resources[("Secret", url["valueFrom"]["secretKeyRef"]["name"])]["type"] == "Opaque"
    budget = resources[("PodDisruptionBudget", "agent-runner")]["spec"]
    assert budget["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    assert budget["maxUnavailable"] < spec["replicas"]


def test_postgres_mode_runs_the_image_with_psycopg_that_the_docs_say_how_to_build() -> None:
    image = container("postgres")["image"]
    assert image != container("redis")["image"], "the released image has no PostgreSQL driver"
    build = f"docker build --build-arg WITH_POSTGRES=1 -t {image} ."
    assert build in (KUBERNETES / "overlays" / "postgres" / "kustomization.yaml").read_text()
    assert build in (DOCS / "kubernetes.md").read_text()
    assert re.search(r'^ARG WITH_POSTGRES=""$', (HERE / "Dockerfile").read_text(), re.MULTILINE)


def test_the_postgres_startup_probe_outlasts_a_wait_for_another_pods_migration() -> None:
    """A pod starting while another migrates waits for the advisory lock in its start (no /healthz yet): connect,
    the lock's timeout, then each migration's own table lock timeout, and the process's own start (10 s)."""
    probe = container("postgres")["startupProbe"]
    window = probe["periodSeconds"] * probe["failureThreshold"]
    worst_start = (database.CONNECT_TIMEOUT_SECONDS + schema.MIGRATION_LOCK_TIMEOUT_MS / 1000
                   + len(schema.migrations()) * database.STATEMENT_TIMEOUT_MS / 1000 + 10)
    assert window >= worst_start, (window, worst_start)


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


@pytest.mark.parametrize("shared", ["base", "replicated"])
def test_the_shared_parts_alone_run_no_pod(shared: str) -> None:
    """Applied alone (by mistake), the parts the overlays share must not start memory-mode pods."""
    resources = kustomize.render(KUBERNETES / shared)
    pods = [(doc["kind"], doc["spec"].get("replicas", 1)) for doc in resources if doc["kind"] in WORKLOADS]
    assert resources and all(replicas == 0 for _, replicas in pods), pods
