"""Property tests: for generated pods — any number of app containers, existing volumes and
mounts, regular init containers and native sidecars in any order, automount on or off,
annotations valid and invalid — ``mutate`` never raises; a patch always applies, yields a
pod valid for every Kubernetes version from 1.29 (strict) that keeps every promise, and a
second pass over it yields nothing; a refusal always names what it refuses. Then another
webhook adds containers, and the reinvocation still leaves a valid pod.

The Hypothesis example database is off (``database=None``): a failure is reproduced from
the printed falsifying example.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.injector.annotations import KEYGEN_FORMATS
from broker.injector.containers import OUR_VOLUMES
from broker.injector.model import Patch, Refusal, Skip
from broker.injector.mutate import mutate
from tests.unit.injector.podkit import (
    CONFIG,
    MOUNT,
    P,
    apply,
    check_injected,
    check_semantics,
    validate_everywhere,
    versions,
)

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAME = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?\Z")
# (valid, invalid) values of each annotation; a pod drawn "injectable" uses valid ones only
CRED = (["db", "cache", "tls", "aws", "x-1"], ["Bad", "a.b", "db-ca"])
ROLE = (["app-db", "app-redis", "app_cert"], ["Bad Role", ""])
OPTIONS: dict[str, tuple[list[str], list[str]]] = {
    "format-": (["json", "env", "pem", "pgpass", "aws-credential-process"], ["yaml"]),
    "perms-": (["0400", "0440", "0444", "0600", "0640"], ["0777", "400", "0200"]),
    "command-": (['["nginx","-s","reload"]', '["/bin/x","a,b","c=d"]'],
                 ["[]", "nginx -s reload", "[1]"]),
    "ttl-": (["15m", "1h30m", "90"], ["0s", "soon"]),
    "keygen-": (["ec-p256", "rsa-2048", "ed25519"], ["dsa"]),
}
GLOBALS: dict[str, tuple[list[str], list[str]]] = {
    "on-exit": (["terminate", "release", "keep"], ["revoke"]),
    "agent-cpu-request": (["5m", "50m", "0.1"], ["lots", "500m"]),
    "agent-cpu-limit": (["100m", "1", "2"], ["x"]),
    "agent-memory-request": (["16Mi", "32Mi"], ["1Gi"]),
    "agent-memory-limit": (["64Mi", "128Mi"], ["1e3"]),
    "status": ([], ["done", "injected"]),
    "unknown-key": ([], ["x"]),
}
PATHS = ["/data", "/cache", "/etc/app", "/var/run/secrets/x", "/tmp"]


def pick(draw: st.DrawFn, values: tuple[list[str], list[str]], valid: bool) -> str | None:
    pool = values[0] if valid else values[0] + values[1]
    return draw(st.sampled_from(pool)) if pool else None


@st.composite
def containers(draw: st.DrawFn, names: list[str], volumes: list[str], valid: bool,
               native: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    out = []
    paths = PATHS if valid else [*PATHS, MOUNT]
    for name in names:
        c: dict[str, Any] = {"name": name, "image": f"registry.example/{name}:1"}
        if volumes and draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(volumes), unique=True, max_size=3))
            at = draw(st.lists(st.sampled_from(paths), unique=True, min_size=len(chosen),
                               max_size=len(chosen)))
            c["volumeMounts"] = [
                {"name": v, "mountPath": p, **draw(st.sampled_from([{}, {"readOnly": True}]))}
                for v, p in zip(chosen, at, strict=True)]
        elif draw(st.booleans()):
            c["volumeMounts"] = draw(st.sampled_from([[], None]))
        if draw(st.booleans()):
            ports = [8080] if valid else [8080, 8399]
            c["ports"] = [{"containerPort": draw(st.sampled_from(ports))}]
        if draw(st.booleans()):
            c["securityContext"] = {"runAsUser": draw(st.sampled_from([0, 1000, 65532]))}
        if name in native:
            c["restartPolicy"] = "Always"
        out.append(c)
    return out


@st.composite
def pods(draw: st.DrawFn, injectable: bool | None = None) -> tuple[dict[str, Any], bool]:
    """A pod, and whether it was drawn to be injectable (opted in, valid annotations, no
    conflict with what the injector adds)."""
    valid = draw(st.booleans()) if injectable is None else injectable
    names = draw(st.lists(NAME, min_size=1, max_size=8, unique=True))
    n_apps = draw(st.integers(1, len(names)))
    apps, inits = names[:n_apps], names[n_apps:]
    native = frozenset(draw(st.lists(st.sampled_from(inits), unique=True)) if inits else [])
    volume_names = draw(st.lists(NAME.map(lambda n: "v-" + n), max_size=3, unique=True))
    spec: dict[str, Any] = {"containers": draw(containers(apps, volume_names, valid))}
    if inits or draw(st.booleans()):
        spec["initContainers"] = draw(containers(inits, volume_names, valid, native))
    if volume_names or draw(st.booleans()):
        spec["volumes"] = [{"name": v, "emptyDir": {}} for v in volume_names]
    os_names = [{"name": "linux"}] if valid else [{"name": "linux"}, {"name": "windows"}]
    for key, values in (("automountServiceAccountToken", st.booleans()),
                        ("shareProcessNamespace", st.booleans()),
                        ("terminationGracePeriodSeconds", st.sampled_from([0, 5, 30])),
                        ("hostNetwork", st.booleans()),
                        ("serviceAccountName", st.sampled_from(["default", "checkout"])),
                        ("restartPolicy", st.sampled_from(["Always", "OnFailure", "Never"])),
                        ("securityContext", st.sampled_from([{}, {"fsGroup": 2000},
                                                             {"runAsUser": 1000}])),
                        ("os", st.sampled_from(os_names))):
        if draw(st.booleans()):
            spec[key] = draw(values)
    share = spec.get("shareProcessNamespace") is True
    annotations: dict[str, str] = {P + "inject": "true"}
    for name in draw(st.lists(st.sampled_from(CRED[0] if valid else CRED[0] + CRED[1]),
                              min_size=1 if valid else 0, max_size=4, unique=True)):
        annotations[P + "credential-" + name] = pick(draw, ROLE, valid) or ""
        for prefix, values in OPTIONS.items():
            if draw(st.booleans()):
                annotations[P + prefix + name] = pick(draw, values, valid) or ""
        if draw(st.booleans()):
            annotations[P + "format-" + name] = "template"
            annotations[P + "template-" + name] = draw(st.sampled_from(
                ["${username}", "u=${username}, p=${password}\n"] if valid else ["$", ""]))
        if (share or not valid) and draw(st.booleans()):
            annotations[P + "signal-" + name] = draw(st.sampled_from(
                ["SIGHUP:nginx", "SIGUSR1:app"] if valid else ["SIGHUP:nginx", "SIGKILL:x"]))
        if valid and annotations.get(P + "format-" + name, "json") not in KEYGEN_FORMATS:
            annotations.pop(P + "keygen-" + name, None)
        if P + "keygen-" + name in annotations and draw(st.booleans()):
            annotations[P + "common-name-" + name] = draw(st.sampled_from(
                ["app.shop.svc", "x.example.com"] if valid else ["a b", "*.x.y"]))
    mode = draw(st.sampled_from(["native", "sidecar", "init-only"] + ([] if valid else ["x"])))
    if mode != "native" or draw(st.booleans()):
        annotations[P + "mode"] = mode
    for key, values in GLOBALS.items():
        if key == "on-exit" and mode == "init-only" and valid:
            values = (["keep"], [])
        if draw(st.booleans()):
            value = pick(draw, values, valid)
            if value is not None:
                annotations[P + key] = value
    if draw(st.booleans()):
        pool = apps if valid else [*names, "nope"]
        annotations[P + "containers"] = ",".join(
            draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
    labels = {P + "inject": "true"}
    if not valid:
        opt = draw(st.sampled_from(["both", "label", "annotation"]))
        if opt == "annotation":
            labels = {}
        elif opt == "label":
            del annotations[P + "inject"]
    metadata: dict[str, Any] = {"labels": labels, "annotations": annotations}
    if draw(st.booleans()):
        metadata["name"] = "app-0"
    else:
        metadata["generateName"] = "app-"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}, valid


@st.composite
def one_fault(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """An injectable pod with exactly one thing wrong, and what the refusal must say (or
    the reason it is skipped)."""
    obj, _ = draw(pods(injectable=True))
    spec, meta = obj["spec"], obj["metadata"]
    ann = meta["annotations"]
    named = ann.get(P + "containers")
    selected = named.split(",") if named else [c["name"] for c in spec["containers"]]
    faults = ["mount", "windows", "annotation", "unknown-key", "unknown-container", "label",
              "borrow"]
    if ann.get(P + "mode", "native") != "init-only":
        faults.append("port")
    fault = draw(st.sampled_from(faults))
    if fault == "mount":
        name = draw(st.sampled_from(selected))
        target = next(c for c in spec["containers"] if c["name"] == name)
        spec.setdefault("volumes", [])
        spec["volumes"] = [*(spec["volumes"] or []), {"name": "v-fault", "emptyDir": {}}]
        target["volumeMounts"] = [*(target.get("volumeMounts") or []),
                                  {"name": "v-fault", "mountPath": MOUNT}]
        return obj, "refusal", f"container {name!r} already mounts a volume at {MOUNT}"
    if fault == "borrow":  # any container, selected or not, init or app
        target = draw(st.sampled_from([*(spec.get("initContainers") or []),
                                       *spec["containers"]]))
        volume = draw(st.sampled_from(sorted(OUR_VOLUMES)))
        target["volumeMounts"] = [*(target.get("volumeMounts") or []),
                                  {"name": volume, "mountPath": "/borrowed"}]
        spec["volumes"] = [*(spec.get("volumes") or []), {"name": volume, "emptyDir": {}}]
        return obj, "refusal", f"container {target['name']!r} mounts {volume}"
    if fault == "port":
        target = draw(st.sampled_from([*(spec.get("initContainers") or []),
                                       *spec["containers"]]))
        target["ports"] = [{"containerPort": 8399}]
        return obj, "refusal", f"container {target['name']!r} declares port 8399"
    if fault == "windows":
        spec["os"] = {"name": "windows"}
        return obj, "refusal", "spec.os.name: the agent runs on linux only"
    if fault == "unknown-key":
        ann[P + "credentail-db"] = "app-db"
        return obj, "refusal", f"{P}credentail-db: unknown annotation"
    if fault == "unknown-container":
        ann[P + "containers"] = "nope"
        return obj, "refusal", f"{P}containers: no app container named 'nope'"
    if fault == "label":
        del meta["labels"][P + "inject"]
        return obj, "skip", "not_opted_in"
    names = [k.removeprefix(P + "credential-") for k in ann if k.startswith(P + "credential-")]
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["credential-", *OPTIONS]))
    ann[P + kind + name] = draw(st.sampled_from(ROLE[1] if kind == "credential-"
                                                else OPTIONS[kind][1]))
    return obj, "refusal", f"{P}{kind}{name}: "


def _valid_input(obj: dict[str, Any]) -> None:
    """The generator makes pods the API server would accept (or the property is moot)."""
    kubernetes_validate.validate(obj, versions()[-1], strict=True)
    check_semantics(obj)


@FUZZ
@given(pods())
def test_generated_pods_get_a_valid_pod_or_a_named_refusal(
        drawn: tuple[dict[str, Any], bool]) -> None:
    obj, injectable = drawn
    _valid_input(obj)
    before = copy.deepcopy(obj)
    outcome = mutate(obj, "shop", CONFIG)
    assert obj == before
    assert isinstance(outcome, Patch) or not injectable, outcome
    if isinstance(outcome, Skip):
        assert outcome.reason in ("not_opted_in", "already_injected")
        return
    if isinstance(outcome, Refusal):
        assert outcome.code == 400
        assert "ephemeral-broker/" in outcome.message or "spec" in outcome.message or (
            "container" in outcome.message), outcome.message
        return
    assert isinstance(outcome, Patch) and outcome.ops and outcome.first_pass
    after = apply(obj, outcome.ops)
    check_injected(obj, after)
    assert mutate(after, "shop", CONFIG) == Skip("already_injected")


@FUZZ
@given(one_fault())
def test_one_fault_is_refused_by_name(drawn: tuple[dict[str, Any], str, str]) -> None:
    obj, expected, says = drawn
    _valid_input(obj)
    outcome = mutate(obj, "shop", CONFIG)
    if expected == "skip":
        assert outcome == Skip(says)
    else:
        assert isinstance(outcome, Refusal) and says in outcome.message, (says, outcome)


@FUZZ
@given(pods(), st.data())
def test_reinvocation_after_other_webhooks_keeps_the_pod_valid(
        drawn: tuple[dict[str, Any], bool], data: st.DataObject) -> None:
    obj, _ = drawn
    outcome = mutate(obj, "shop", CONFIG)
    if not isinstance(outcome, Patch):
        return
    after = apply(obj, outcome.ops)
    spec = after["spec"]
    taken = {c["name"] for c in [*spec["initContainers"], *spec["containers"]]}
    # another webhook adds app containers and native sidecars or init steps anywhere
    for i in range(data.draw(st.integers(0, 3), label="added")):
        name = f"added-{i}"
        if name in taken:
            continue
        c: dict[str, Any] = {"name": name, "image": "registry.example/added:1"}
        if data.draw(st.booleans(), label="as init"):
            if data.draw(st.booleans(), label="native"):
                c["restartPolicy"] = "Always"
            at = data.draw(st.integers(0, len(spec["initContainers"])), label="at")
            spec["initContainers"].insert(at, c)
        else:
            spec["containers"].append(c)
    validate_everywhere(after)
    second = mutate(after, "shop", CONFIG)
    if isinstance(second, Skip):
        assert second.reason == "already_injected"
        final = after
    else:
        assert isinstance(second, Patch) and not second.first_pass
        final = apply(after, second.ops)
    validate_everywhere(final)
    check_semantics(final)
    inits = final["spec"]["initContainers"]
    agent = next(i for i, c in enumerate(inits) if c["name"].startswith("ephemeral-broker"))
    assert all(c.get("restartPolicy") != "Always" for c in inits[agent + 1:])
    assert mutate(final, "shop", CONFIG) == Skip("already_injected")
