"""A read-only view of the pod in an AdmissionReview: its parts with the types the
injector relies on checked once, so the decisions after it never meet a surprise. Pure.

The API server decodes and re-encodes a pod before any webhook sees it, so a real
request always has these shapes; the checks keep a hand-made request from turning into an
exception (a 5xx, which ``failurePolicy: Fail`` would turn into a refused pod with an
unhelpful message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def native_sidecar(container: Mapping[str, Any]) -> bool:
    """An init container that keeps running (Kubernetes 1.29+ native sidecar)."""
    return container.get("restartPolicy") == "Always"


def mounts(container: Mapping[str, Any]) -> list[Obj]:
    return list(container.get("volumeMounts") or [])


def mounts_volume(container: Mapping[str, Any], volume: str) -> bool:
    return any(m.get("name") == volume for m in mounts(container))


def mounts_at(container: Mapping[str, Any], path: str) -> bool:
    return any(str(m.get("mountPath", "")).rstrip("/") == path for m in mounts(container))


def run_as_user(container: Mapping[str, Any], pod_context: Mapping[str, Any]) -> int | None:
    """The uid a container's process runs as, where the pod says (None: the image's)."""
    return _run_as(container, pod_context, "runAsUser")


def run_as_group(container: Mapping[str, Any], pod_context: Mapping[str, Any]) -> int | None:
    """The gid a container's process runs as, where the pod says (None: the image's)."""
    return _run_as(container, pod_context, "runAsGroup")


def _run_as(container: Mapping[str, Any], pod_context: Mapping[str, Any], key: str) -> int | None:
    # The container's own setting wins over the pod's, as the kubelet applies them.
    for context in (container.get("securityContext") or {}, pod_context):
        value = context.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class PodView:
    labels: Mapping[str, Any]
    annotations: Mapping[str, Any]
    name: str | None
    spec: Mapping[str, Any]
    containers: list[Obj]
    init_containers: list[Obj]
    volumes: list[Obj]
    has_init_containers: bool  # the array exists (an empty one is still "add at index")
    has_volumes: bool

    @property
    def pod_security_context(self) -> Mapping[str, Any]:
        return self.spec.get("securityContext") or {}

    @property
    def share_process_namespace(self) -> bool:
        return self.spec.get("shareProcessNamespace") is True

    @property
    def service_account(self) -> str:
        # Filled in by the ServiceAccount admission plugin before webhooks run.
        name = self.spec.get("serviceAccountName") or self.spec.get("serviceAccount")
        return name if isinstance(name, str) and name else "default"

    def container_names(self) -> set[str]:
        return {c["name"] for c in (*self.containers, *self.init_containers)}


def metadata_of(pod: object) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """Labels and annotations, or empty mappings where the pod has none (or odd ones):
    enough to tell whether the pod opted in at all."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    if not isinstance(meta, dict):
        return {}, {}
    labels, annotations = meta.get("labels"), meta.get("annotations")
    return (
        labels if isinstance(labels, dict) else {},
        annotations if isinstance(annotations, dict) else {},
    )


def _named_objects(value: object, where: str, *, required: bool) -> list[Obj] | str:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        return f"{where}: expected a{' non-empty' if required else ''} list of containers"
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return f"{where}[{i}]: expected an object with a name"
    return value


def _container_problem(container: Obj, where: str) -> str | None:
    for key, kind in (
        ("volumeMounts", list),
        ("ports", list),
        ("securityContext", dict),
    ):
        value = container.get(key)
        if value is not None and not isinstance(value, kind):
            return f"{where}.{key}: expected a{'n object' if kind is dict else ' list'}"
    for i, mount in enumerate(container.get("volumeMounts") or []):
        if not isinstance(mount, dict):
            return f"{where}.volumeMounts[{i}]: expected an object"
    for i, port in enumerate(container.get("ports") or []):
        if not isinstance(port, dict):
            return f"{where}.ports[{i}]: expected an object"
    return None


def view(pod: object) -> PodView | str:
    """The pod's view, or a sentence naming the first part with an unexpected shape."""
    if not isinstance(pod, dict):
        return "the object is not a pod"
    meta = pod.get("metadata")
    spec = pod.get("spec")
    if not isinstance(meta, dict):
        return "metadata: expected an object"
    if not isinstance(spec, dict):
        return "spec: expected an object"
    if spec.get("securityContext") is not None and not isinstance(spec["securityContext"], dict):
        return "spec.securityContext: expected an object"
    labels, annotations = metadata_of(pod)
    containers = _named_objects(spec.get("containers"), "spec.containers", required=True)
    inits = _named_objects(spec.get("initContainers"), "spec.initContainers", required=False)
    volumes = spec.get("volumes")
    if volumes is not None and (
        not isinstance(volumes, list)
        or not all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in volumes)
    ):
        return "spec.volumes: expected a list of objects with a name"
    if isinstance(containers, str):
        return containers
    if isinstance(inits, str):
        return inits
    for where, group in (("spec.containers", containers), ("spec.initContainers", inits)):
        for container in group:
            found = _container_problem(container, f"{where}[{container['name']}]")
            if found is not None:
                return found
    name = meta.get("name")
    return PodView(
        labels=labels,
        annotations=annotations,
        name=name if isinstance(name, str) and name else None,
        spec=spec,
        containers=containers,
        init_containers=inits,
        volumes=list(volumes or []),
        has_init_containers=spec.get("initContainers") is not None,
        has_volumes=volumes is not None,
    )
