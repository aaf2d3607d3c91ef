"""What the injector tests share: a configuration, AdmissionReview builders, and the checks
a mutated pod must pass — applied with ``jsonpatch``, validated against the Kubernetes
schema (strict) for every version from 1.29 to the newest ``kubernetes-validate`` ships,
then the rules the schema cannot express (unique names, mounts that name volumes, the
restricted Pod Security Standard on what was added, the agent's place among the init
containers, its command line read back)."""

from __future__ import annotations

import argparse
import base64
import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import kubernetes_validate.utils
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from broker.injector.annotations import InjectionSpec, parse
from broker.injector.containers import (
    AGENT,
    AGENT_INIT,
    CREDENTIALS_VOLUME,
    OUR_CONTAINERS,
    TOKEN_VOLUME,
)
from broker.injector.model import Patch
from broker.injector.quantity import parse_quantity
from broker.injector.settings import TOKEN_DIR, InjectorSettings
from broker.tls import parse_ca_pem

# kubernetes-validate reads and parses its schema files (the definitions are megabytes) on
# every call; they never change, so they are read once per version here. Validation itself
# is untouched, and the property tests validate thousands of pods.
kubernetes_validate.utils.schema_contents = cache(kubernetes_validate.utils.schema_contents)

try:  # the agent's own reading of its command line, where the agent is part of the tree
    from broker.agent.options import add_arguments as agent_arguments
    from broker.agent.spec import build_specs
except ImportError:  # pragma: no cover - the injector's branch before the agent's merge
    agent_arguments = build_specs = None

DATA = Path(__file__).parents[2] / "data" / "injector"
CONFIG = InjectorSettings(broker_url="https://broker.broker-system.svc:8300")
# The CA of the broker's serving certificate, as the injector hands it to the agents
# (agent.ca_file, read by the injector; a throwaway CA made for these tests).
BROKER_CA_PEM = (DATA / "broker-ca.pem").read_text()
MOUNT = CONFIG.agent.mount_path
P = "ephemeral-broker/"


@cache
def versions() -> tuple[str, ...]:
    """Every Kubernetes minor the validator ships from 1.29 (native sidecars) on."""
    found = sorted({v for v in all_versions() if Version(v) >= Version("1.29")}, key=Version)
    assert len(found) >= 2 and found[0].startswith("1.29"), found
    return tuple(found)


def opted_in(annotations: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {
        "labels": {P + "inject": "true"},
        "annotations": {P + "inject": "true", **annotations},
        **meta,
    }


def pod(spec: dict[str, Any], annotations: dict[str, str] | None = None,
        name: str | None = "app-0", **meta: Any) -> dict[str, Any]:
    metadata = opted_in(annotations or {P + "credential-db": "app-db"}, **meta)
    if name is not None:
        metadata["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def container(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": f"registry.example/{name}:1", **extra}


def review(obj: Any, namespace: str = "shop", uid: str = "0f6b6a52-5d2c-4e8e-9a57-1b2f0c3d4e5f",
           operation: str = "CREATE", **request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            **request,
        },
    }


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


def apply(obj: dict[str, Any], ops: Any) -> dict[str, Any]:
    """The patch applied to a copy; the original is left as it was."""
    before = copy.deepcopy(obj)
    out = jsonpatch.apply_patch(obj, list(ops), in_place=False)
    assert obj == before
    return out


def validate_everywhere(obj: dict[str, Any]) -> None:
    for version in versions():
        kubernetes_validate.validate(obj, version, strict=True)


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*(spec.get("initContainers") or []), *spec["containers"]]


def check_semantics(obj: dict[str, Any]) -> None:
    """What the API server would refuse and the JSON schema cannot see."""
    spec = obj["spec"]
    names = [c["name"] for c in _all_containers(spec)]
    assert len(names) == len(set(names)), f"duplicate container names {names}"
    volumes = [v["name"] for v in spec.get("volumes") or []]
    assert len(volumes) == len(set(volumes)), f"duplicate volume names {volumes}"
    for c in _all_containers(spec):
        paths = [m["mountPath"] for m in c.get("volumeMounts") or []]
        assert len(paths) == len(set(paths)), f"{c['name']}: duplicate mount paths {paths}"
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
        resources = c.get("resources") or {}
        for kind, request in (resources.get("requests") or {}).items():
            limit = (resources.get("limits") or {}).get(kind)
            if limit is not None:
                assert parse_quantity(request) <= parse_quantity(limit), (c["name"], kind)
    for c in spec.get("initContainers") or []:
        if c.get("restartPolicy") != "Always":
            for probe in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
                assert probe not in c, f"init container {c['name']} has {probe}"
    for c in spec["containers"]:
        assert "restartPolicy" not in c or c["name"] not in OUR_CONTAINERS


def restricted(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def parse_agent_args(args: list[str]) -> dict[str, Any]:
    """The agent's command line read back as the contract defines it (``broker agent
    ...``): credentials as ``NAME=ROLE[,key=value...]`` with ``command=`` last."""
    assert args[0] == "agent"
    p = argparse.ArgumentParser(prog="broker agent", exit_on_error=False)
    p.add_argument("--broker-url", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--credential", action="append", required=True)
    p.add_argument("--template", action="append", default=[])
    p.add_argument("--once", action="store_true")
    p.add_argument("--on-exit", choices=["terminate", "release", "keep"], default="terminate")
    p.add_argument("--ready-listen")
    p.add_argument("--state-file")
    p.add_argument("--ca-pem")
    p.add_argument("--exit-timeout")
    ns = p.parse_args(args[1:])
    credentials = {}
    for value in ns.credential:
        head, sep, command = value.partition(",command=")
        first, *pairs = head.split(",")
        name, _, role = first.partition("=")
        options: dict[str, Any] = dict(pair.split("=", 1) for pair in pairs)
        if sep:
            options["command"] = json.loads(command)
        credentials[name] = {"role": role, **options}
    templates = dict(t.split("=", 1) for t in ns.template)
    return {**vars(ns), "credentials": credentials, "templates": templates}


def check_agent_reads(args: list[str], spec: InjectionSpec) -> None:
    """``broker agent``'s own parser reads the emitted arguments back into the very
    credentials the annotations asked for (when the agent is in the tree)."""
    if build_specs is None:
        return
    p = argparse.ArgumentParser(prog="broker agent", exit_on_error=False)
    agent_arguments(p)
    ns = p.parse_args(args[1:])
    if ns.ca_pem is not None:  # the agent checks the CA at start exactly so
        assert parse_ca_pem(ns.ca_pem) == ns.ca_pem
    read = build_specs(ns.credential, ns.template)
    assert [(c.name, c.role, c.format, c.perms, c.ttl, c.keygen, c.cn,
             f"{c.signal.signal}:{c.signal.process}" if c.signal else None, c.command,
             c.template) for c in read] == [
        (c.name, c.role, c.format, int(c.perms, 8), c.ttl_s, c.keygen, c.common_name,
         c.signal, c.command, c.template) for c in spec.credentials]


def expected_credentials(spec: InjectionSpec) -> dict[str, dict[str, Any]]:
    out = {}
    for c in spec.credentials:
        entry: dict[str, Any] = {"role": c.role, "format": c.format, "perms": c.perms}
        for key, value in (("ttl", f"{c.ttl_s}s" if c.ttl_s else None), ("keygen", c.keygen),
                           ("cn", c.common_name), ("signal", c.signal),
                           ("command", list(c.command) if c.command else None)):
            if value is not None:
                entry[key] = value
        out[c.name] = entry
    return out


def check_injected(before: dict[str, Any], after: dict[str, Any],
                   config: InjectorSettings = CONFIG, ca_pem: str | None = None) -> None:
    """Everything a first pass promises, checked on the mutated pod (``ca_pem``: the CA
    the injector was given for the agents)."""
    validate_everywhere(after)
    check_semantics(after)
    spec_after = after["spec"]
    annotations = after["metadata"]["annotations"]
    assert annotations[P + "status"] == "injected"
    spec = parse(before["metadata"]["annotations"],
                 share_process_namespace=before["spec"].get("shareProcessNamespace") is True,
                 defaults=config.agent.resources)
    inits = spec_after["initContainers"]
    ours = [c for c in _all_containers(spec_after) if c["name"] in OUR_CONTAINERS]
    expected_names = {"native": [AGENT], "sidecar": [AGENT_INIT, AGENT],
                      "init-only": [AGENT_INIT]}[spec.mode]
    assert [c["name"] for c in ours] == expected_names
    first = next(i for i, c in enumerate(inits) if c["name"] in OUR_CONTAINERS)
    # right after the last native sidecar that was there before, before every other init
    # container of the original order
    original = before["spec"].get("initContainers") or []
    natives = [i for i, c in enumerate(original) if c.get("restartPolicy") == "Always"]
    assert first == (natives[-1] + 1 if natives else 0)
    assert [c["name"] for c in inits if c["name"] not in OUR_CONTAINERS] == [
        c["name"] for c in original]
    for c in ours:
        restricted(c)
        assert c["image"] == config.agent.image
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts[CREDENTIALS_VOLUME]["mountPath"] == config.agent.mount_path
        assert not mounts[CREDENTIALS_VOLUME].get("readOnly")
        assert mounts[TOKEN_VOLUME] == {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR,
                                        "readOnly": True}
        args = parse_agent_args(c["args"])
        check_agent_reads(c["args"], spec)
        assert c["command"] == ["broker"]
        assert args["broker_url"] == config.broker_url
        assert args["token_file"] == f"{TOKEN_DIR}/token"
        assert args["dir"] == config.agent.mount_path
        assert args["credentials"] == expected_credentials(spec)
        assert args["templates"] == {c.name: c.template for c in spec.credentials if c.template}
        once = c["name"] == AGENT_INIT
        assert args["once"] is once
        assert args["on_exit"] == ("keep" if once else spec.on_exit)
        assert args["exit_timeout"] == f"{config.agent.exit_timeout_s}s"
        assert args["ca_pem"] == ca_pem
        assert c["resources"] == spec.resources
        native = c.get("restartPolicy") == "Always"
        assert native == (spec.mode == "native" and c["name"] == AGENT)
        if native:
            assert args["ready_listen"] == f"0.0.0.0:{config.agent.ready_port}"
            probe = c["startupProbe"]
            assert probe["httpGet"] == {"path": "/ready", "port": config.agent.ready_port}
            assert probe["failureThreshold"] * probe["periodSeconds"] >= 600
        else:
            assert "startupProbe" not in c and args["ready_listen"] is None
    volumes = {v["name"]: v for v in spec_after["volumes"]}
    assert volumes[CREDENTIALS_VOLUME]["emptyDir"]["medium"] == "Memory"
    assert volumes[TOKEN_VOLUME]["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": config.audience, "expirationSeconds": config.token_expiration_s,
        "path": "token"}}]
    # only the agent sees its token; the selected containers see the credentials read-only
    readers = []
    for c in _all_containers(spec_after):
        if c["name"] in OUR_CONTAINERS:
            continue
        assert all(m["name"] != TOKEN_VOLUME for m in c.get("volumeMounts") or [])
        cred = [m for m in c.get("volumeMounts") or [] if m["name"] == CREDENTIALS_VOLUME]
        chosen = spec.containers is None and c in spec_after["containers"] or (
            spec.containers is not None and c["name"] in spec.containers)
        if chosen:
            assert cred == [{"name": CREDENTIALS_VOLUME, "mountPath": config.agent.mount_path,
                             "readOnly": True}], c["name"]
            readers.append(c)
        else:
            assert cred == [], c["name"]
    # the agent runs as its readers' one non-root uid where they have one, else as configured
    pod_context = spec_after.get("securityContext") or {}
    uids = {(c.get("securityContext") or {}).get("runAsUser", pod_context.get("runAsUser"))
            for c in readers}
    common = uids.pop() if len(uids) == 1 else None
    for c in ours:
        assert c["securityContext"]["runAsUser"] == (
            common if common else config.agent.run_as_user), (c["name"], common)
    # nothing else about the pod changed
    assert_same_but_ours(before, after)


def _without_ours(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    spec = out["spec"]
    out["metadata"]["annotations"].pop(P + "status", None)
    for key in ("initContainers", "containers", "volumes"):
        if spec.get(key) is None:
            continue
        kept = [c for c in spec[key] if c["name"] not in OUR_CONTAINERS
                and c["name"] not in (CREDENTIALS_VOLUME, TOKEN_VOLUME)]
        spec[key] = kept
        if key == "volumes":
            continue
        for c in kept:
            if c.get("volumeMounts") is not None:
                c["volumeMounts"] = [m for m in c["volumeMounts"]
                                     if m["name"] != CREDENTIALS_VOLUME]
    return out


def assert_same_but_ours(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Remove what the injector adds; what is left is the pod as it came, except that an
    array the injector created is now an empty one (or a mounts list it started)."""
    a, b = _without_ours(after), _without_ours(before)
    for key in ("initContainers", "volumes"):
        if not b["spec"].get(key):
            a["spec"].pop(key, None)
            b["spec"].pop(key, None)
    for ca, cb in zip(_all_containers(a["spec"]), _all_containers(b["spec"]), strict=True):
        if not cb.get("volumeMounts"):
            ca.pop("volumeMounts", None)
            cb.pop("volumeMounts", None)
    assert a == b


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def first_patch(outcome: object) -> Patch:
    assert isinstance(outcome, Patch), outcome
    return outcome
