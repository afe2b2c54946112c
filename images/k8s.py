"""Kubernetes manifests for the runtime on one profile's nodes: ConfigMap, DaemonSet, Service.

A DaemonSet, because the runtime is one per board (it owns the board's RAM and GPU); nodes are
chosen by architecture and a `clawforge.io/profile` label, resource limits come from the
profile's smallest RAM size and its runtime settings, and both probes ask /health.
"""

from __future__ import annotations

from typing import Any

import yaml

from images.render import IMAGE_UID, RUNTIME_PORT, resolve
from provision.errors import BadInput

CONFIG_DIR = "/etc/clawforge"
MODELS_DIR = "/var/lib/clawforge/models"
# Device nodes a GPU OpenCL stack opens, by its kernel driver.
GPU_DEVICES = {"panthor": "/dev/dri", "panfrost": "/dev/dri", "mali_kbase": "/dev/mali0",
               "nvgpu": "/dev/nvhost-gpu"}


def _mebibytes(gib: float) -> str:
    return f"{int(gib * 1024)}Mi"


def manifests(profile: str, *, image: str | None = None, model: str = f"{MODELS_DIR}/model.gguf",
              namespace: str = "clawforge") -> list[dict[str, Any]]:
    target = resolve("runtime", profile)
    prof, rt = target.profile, target.profile.runtime
    if not model.startswith(MODELS_DIR + "/"):
        raise BadInput(f"--model {model!r} is not valid (expected a file under {MODELS_DIR}/, "
                       "the node directory the DaemonSet mounts)")
    name = f"clawforge-runtime-{prof.name}"
    labels = {"app.kubernetes.io/name": "clawforge-runtime", "app.kubernetes.io/part-of":
              "clawforge", "clawforge.io/profile": prof.name}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    # `claw runtime serve`'s config (runtime.server.config.ServeConfig); the monitor reads the
    # profile's pressure thresholds.
    config = {"model": model, "host": "0.0.0.0", "port": RUNTIME_PORT, "backend": rt.backend,
              "threads": rt.threads, "context": rt.context, "monitor": {"profile": prof.name}}
    memory = _mebibytes(min(prof.ram_gb) * rt.memory_budget_fraction)
    probe = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": name}},
        {"name": "models", "hostPath": {"path": MODELS_DIR, "type": "DirectoryOrCreate"}}]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "models", "mountPath": MODELS_DIR, "readOnly": True}]
    security: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                                "allowPrivilegeEscalation": False}
    gpu = GPU_DEVICES.get(target.opencl.kernel_driver or "")
    if gpu:  # a device node needs the device cgroup opened: no device plugin exists for these
        volumes.append({"name": "gpu", "hostPath": {"path": gpu}})
        mounts.append({"name": "gpu", "mountPath": gpu})
        security = {**security, "privileged": True, "allowPrivilegeEscalation": True}
    container = {
        "name": "runtime", "image": image or target.default_tag,
        "args": ["--config", f"{CONFIG_DIR}/runtime.yml"],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in target.opencl.env.items()],
        "resources": {"requests": {"cpu": str(rt.threads), "memory": memory},
                      "limits": {"cpu": str(rt.threads), "memory": memory}},
        "livenessProbe": {**probe, "initialDelaySeconds": 60, "periodSeconds": 20,
                          "failureThreshold": 3},
        "readinessProbe": {**probe, "initialDelaySeconds": 10, "periodSeconds": 10},
        "volumeMounts": mounts, "securityContext": security,
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
         "data": {"runtime.yml": yaml.safe_dump(config, sort_keys=False)}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta, "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": "25%"}},
            "template": {"metadata": {"labels": labels}, "spec": {
                "nodeSelector": {"kubernetes.io/arch": target.arch,
                                 "clawforge.io/profile": prof.name},
                "containers": [container], "volumes": volumes}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": labels, "type": "ClusterIP",
            "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http"}]}},
    ]


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases for shared dicts: manifests read by people stay plain."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_manifests(profile: str, **options: Any) -> str:
    return yaml.dump_all(manifests(profile, **options), Dumper=_PlainDumper, sort_keys=False)
