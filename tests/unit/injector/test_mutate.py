"""``mutate`` beyond the golden shapes: what it refuses in the pod itself, reinvocation
after other webhooks, the policy preview's effect, the preview query, and warnings."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker.injector.containers import AGENT, AGENT_INIT, CREDENTIALS_VOLUME, TOKEN_VOLUME
from broker.injector.model import (
    Patch,
    PreviewAnswer,
    PreviewQuery,
    PreviewUnavailable,
    Refusal,
    RoleVerdict,
    Skip,
)
from broker.injector.mutate import mutate, preview_query
from broker.injector.settings import InjectorSettings
from tests.unit.injector.podkit import (
    CONFIG,
    MOUNT,
    P,
    apply,
    check_injected,
    check_semantics,
    container,
    first_patch,
    pod,
    validate_everywhere,
)

PREVIEWING = InjectorSettings(broker_url="https://b.svc:8300", issuer="k8s-prod",
                              preview={"token_file": "/nonexistent"})
STRICT = InjectorSettings(broker_url="https://b.svc:8300", issuer="k8s-prod", strict=True,
                          preview={"token_file": "/nonexistent"})
DB = {P + "credential-db": "app-db", P + "credential-cache": "app-redis"}


def injected(obj: dict[str, Any], config: InjectorSettings = CONFIG) -> dict[str, Any]:
    after = apply(obj, first_patch(mutate(obj, "shop", config)).ops)
    check_injected(obj, after, config)
    return after


def mounted(obj: dict[str, Any]) -> set[str]:
    spec = obj["spec"]
    return {c["name"] for c in [*(spec.get("initContainers") or []), *spec["containers"]]
            if any(m["name"] == CREDENTIALS_VOLUME for m in c.get("volumeMounts") or [])}


# -- what the pod itself may not have -------------------------------------------------------

@pytest.mark.parametrize(("spec", "message"), [
    ({"containers": [container("app", volumeMounts=[{"name": "x", "mountPath": MOUNT + "/"}])],
      "volumes": [{"name": "x", "emptyDir": {}}]},
     "container 'app' already mounts a volume at /var/run/ephemeral-broker"),
    ({"containers": [container("app")], "volumes": [{"name": CREDENTIALS_VOLUME, "emptyDir": {}}]},
     "spec.volumes: ephemeral-broker-credentials already exists"),
    ({"containers": [container("app"), container(AGENT)]},
     "spec: a container named ephemeral-broker-agent already exists"),
    ({"containers": [container("app")], "initContainers": [container(AGENT_INIT)]},
     "spec: a container named ephemeral-broker-agent-init already exists"),
    ({"containers": [container("app", ports=[{"containerPort": 8399}])]},
     "spec: container 'app' declares port 8399, the agent's readiness port"),
    ({"containers": [container("app")], "os": {"name": "windows"}},
     "spec.os.name: the agent runs on linux only, got 'windows'"),
    ({"containers": []}, "spec.containers: expected a non-empty list of containers"),
    ({"containers": "app"}, "spec.containers: expected a non-empty list of containers"),
    ({"containers": [{"image": "x"}]}, "spec.containers[0]: expected an object with a name"),
    ({"containers": [container("app", volumeMounts="x")]},
     "spec.containers[app].volumeMounts: expected a list"),
    ({"containers": [container("app", volumeMounts=["x"])]},
     "spec.containers[app].volumeMounts[0]: expected an object"),
    ({"containers": [container("app")], "volumes": {"a": 1}},
     "spec.volumes: expected a list of objects with a name"),
    ({"containers": [container("app")], "initContainers": [None]},
     "spec.initContainers[0]: expected an object with a name"),
    ({"containers": [container("app")], "securityContext": []},
     "spec.securityContext: expected an object"),
    ({"containers": [container("app", volumeMounts=[
        {"name": TOKEN_VOLUME, "mountPath": "/stolen"}])]},
     "container 'app' mounts ephemeral-broker-token, which only the injector may add"),
    ({"containers": [container("app")], "initContainers": [container("setup", volumeMounts=[
        {"name": CREDENTIALS_VOLUME, "mountPath": "/rw"}])]},
     "container 'setup' mounts ephemeral-broker-credentials, which only the injector may add"),
    ({"containers": [container("app"), container("side", volumeMounts=[
        {"name": CREDENTIALS_VOLUME, "mountPath": "/rw"},
        {"name": TOKEN_VOLUME, "mountPath": "/t"}])]},
     "container 'side' mounts ephemeral-broker-credentials and ephemeral-broker-token, which "
     "only the injector may add"),
    ({"containers": [container("app")], "volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]},
     "spec.volumes: ephemeral-broker-token already exists"),
], ids=["mount-path-taken", "volume-name-taken", "agent-name-taken", "agent-init-name-taken",
        "ready-port-taken", "windows", "no-containers", "containers-not-a-list",
        "container-without-name", "mounts-not-a-list", "mount-not-an-object",
        "volumes-not-a-list", "init-not-an-object", "security-context-not-an-object",
        "app-borrows-the-token", "init-borrows-the-credentials", "borrows-both",
        "token-volume-name-taken"])
def test_pod_problems_are_refused_with_where(spec: dict[str, Any], message: str) -> None:
    outcome = mutate(pod(spec), "shop", CONFIG)
    assert isinstance(outcome, Refusal) and message in outcome.message, outcome


def test_the_ready_port_matters_only_where_an_agent_keeps_running() -> None:
    spec = {"containers": [container("app", ports=[{"containerPort": 8399}])]}
    obj = pod(spec, {**DB, P + "mode": "init-only"})
    injected(obj)


def test_a_mount_path_taken_in_an_unselected_container_is_fine() -> None:
    spec = {"containers": [container("app"), container("other", volumeMounts=[
        {"name": "x", "mountPath": MOUNT}])], "volumes": [{"name": "x", "emptyDir": {}}]}
    injected(pod(spec, {**DB, P + "containers": "app"}))


def test_an_init_container_before_the_agent_cannot_be_named() -> None:
    spec = {"containers": [container("app")],
            "initContainers": [container("early"), container("mesh", restartPolicy="Always")]}
    outcome = mutate(pod(spec, {**DB, P + "containers": "app,early"}), "shop", CONFIG)
    assert outcome == Refusal("ephemeral-broker/containers: no app container named 'early' "
                              "(app containers: app)")


def test_not_a_pod_at_all() -> None:
    for obj in (None, [], "pod", 5):
        assert mutate(obj, "shop", CONFIG) == Skip("not_opted_in")
    broken = pod({"containers": [container("app")]})
    broken["spec"] = None
    assert mutate(broken, "shop", CONFIG) == Refusal(
        "spec: expected an object (the injector cannot read this pod)")


def test_skipped_namespaces() -> None:
    obj = pod({"containers": [container("app")]})
    assert mutate(obj, "kube-system", CONFIG) == Skip("namespace_skipped")
    assert mutate(obj, "kube-public", CONFIG) == Skip("namespace_skipped")
    other = InjectorSettings(skip_namespaces=["shop"])
    assert mutate(obj, "shop", other) == Skip("namespace_skipped")
    assert isinstance(mutate(obj, "kube-system", other), Patch)


def test_a_pod_marked_injected_by_its_author_is_left_alone() -> None:
    obj = pod({"containers": [container("app")]}, {**DB, P + "status": "injected"})
    assert mutate(obj, "shop", CONFIG) == Skip("already_injected")


# -- reinvocation -------------------------------------------------------------------------

def test_reinvocation_mounts_containers_added_since_and_nothing_else() -> None:
    obj = pod({"containers": [container("app")], "volumes": [{"name": "v", "emptyDir": {}}]}, DB)
    after = injected(obj)
    after["spec"]["containers"].append(container("added-later"))
    after["spec"]["containers"].append(container("also-later", volumeMounts=[
        {"name": "v", "mountPath": "/v"}]))
    outcome = mutate(after, "shop", CONFIG)
    assert isinstance(outcome, Patch) and not outcome.first_pass
    assert [op["path"] for op in outcome.ops] == [
        "/spec/containers/1/volumeMounts", "/spec/containers/2/volumeMounts/-"]
    again = apply(after, outcome.ops)
    validate_everywhere(again)
    check_semantics(again)
    assert mounted(again) == {AGENT, "app", "added-later", "also-later"}
    assert mutate(again, "shop", CONFIG) == Skip("already_injected")


def test_reinvocation_respects_the_containers_annotation() -> None:
    obj = pod({"containers": [container("app")]}, {**DB, P + "containers": "app"})
    after = injected(obj)
    after["spec"]["containers"].append(container("injected-by-someone-else"))
    assert mutate(after, "shop", CONFIG) == Skip("already_injected")


def test_reinvocation_moves_the_agent_after_a_mesh_proxy_added_since() -> None:
    obj = pod({"containers": [container("app")], "initContainers": [container("migrate")]},
              {**DB, P + "containers": "app,migrate"})
    after = injected(obj)
    assert [c["name"] for c in after["spec"]["initContainers"]] == [AGENT, "migrate"]
    # a mesh webhook (called after ours) appends its init step and its proxy
    after["spec"]["initContainers"] += [container("mesh-init"),
                                        container("mesh-proxy", restartPolicy="Always")]
    outcome = first_patch(mutate(after, "shop", CONFIG))
    again = apply(after, outcome.ops)
    assert [c["name"] for c in again["spec"]["initContainers"]] == [
        "migrate", "mesh-init", "mesh-proxy", AGENT]
    validate_everywhere(again)
    check_semantics(again)
    # migrate now runs before the agent: it keeps the mount it had, and its author is told
    assert mounted(again) == mounted(after)
    assert outcome.warnings == (
        "ephemeral-broker/containers: init container 'migrate' now runs before the agent, "
        "which moved after the native sidecar 'mesh-proxy': its credentials are not written "
        "yet when it runs",)
    assert mutate(again, "shop", CONFIG) == Skip("already_injected")


@pytest.mark.parametrize("mode", ["sidecar", "init-only"])
def test_reinvocation_moves_the_init_run_too(mode: str) -> None:
    after = injected(pod({"containers": [container("app")]}, {**DB, P + "mode": mode}))
    after["spec"]["initContainers"].append(container("proxy", restartPolicy="Always"))
    outcome = first_patch(mutate(after, "shop", CONFIG))
    assert outcome.warnings == () and not outcome.first_pass
    again = apply(after, outcome.ops)
    assert [c["name"] for c in again["spec"]["initContainers"]] == ["proxy", AGENT_INIT]
    assert mutate(again, "shop", CONFIG) == Skip("already_injected")


def test_reinvocation_with_annotations_changed_since_leaves_the_pod_alone() -> None:
    after = injected(pod({"containers": [container("app")]}, DB))
    after["metadata"]["annotations"][P + "perms-db"] = "0777"
    after["spec"]["containers"].append(container("late"))
    assert mutate(after, "shop", CONFIG) == Skip("already_injected")


# -- the policy preview -------------------------------------------------------------------

def _answer(*verdicts: RoleVerdict) -> PreviewAnswer:
    return PreviewAnswer("shop/checkout", verdicts)


GRANTED = RoleVerdict("app-db", True, None)
REFUSED = RoleVerdict("app-redis", False, "role_not_permitted")
REFUSED_WARNING = (
    "ephemeral-broker/credential-cache: role 'app-redis' would be refused (role_not_permitted) "
    "for shop/checkout: ask your platform team or see `brokerctl policy explain`")


def test_preview_query_synthesizes_the_pods_projected_token_claims() -> None:
    obj = pod({"containers": [container("app")], "serviceAccountName": "checkout"}, DB,
              name="checkout-0")
    assert preview_query(obj, "shop", PREVIEWING) == PreviewQuery(
        issuer="k8s-prod",
        claims={"sub": "system:serviceaccount:shop:checkout",
                "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"},
                                  "pod": {"name": "checkout-0"}}},
        roles=("app-db", "app-redis"))


def test_preview_query_for_a_generate_name_pod_of_the_default_account() -> None:
    obj = pod({"containers": [container("app")]}, {P + "credential-db": "app-db"}, name=None,
              generateName="checkout-")
    query = preview_query(obj, "shop", PREVIEWING)
    assert query is not None
    assert query.claims["kubernetes.io"] == {"namespace": "shop",
                                             "serviceaccount": {"name": "default"}, "pod": {}}
    assert query.body() == {"issuer": "k8s-prod", "claims": query.claims, "roles": ["app-db"]}


def test_no_preview_query_where_nothing_would_be_injected() -> None:
    good = pod({"containers": [container("app")]}, DB)
    assert preview_query(good, "shop", CONFIG) is None  # no preview configured
    assert preview_query(good, "kube-system", PREVIEWING) is None
    bad = pod({"containers": [container("app")]}, {**DB, P + "mode": "x"})
    assert preview_query(bad, "shop", PREVIEWING) is None
    done = pod({"containers": [container("app")]}, {**DB, P + "status": "injected"})
    assert preview_query(done, "shop", PREVIEWING) is None


def test_a_refused_role_is_a_warning() -> None:
    obj = pod({"containers": [container("app")]}, DB)
    outcome = first_patch(mutate(obj, "shop", PREVIEWING, _answer(GRANTED, REFUSED)))
    assert outcome.warnings == (REFUSED_WARNING,)
    check_injected(obj, apply(obj, outcome.ops), PREVIEWING)


def test_a_refused_role_refuses_the_pod_when_strict() -> None:
    obj = pod({"containers": [container("app")]}, DB)
    outcome = mutate(obj, "shop", STRICT, _answer(GRANTED, REFUSED))
    assert outcome == Refusal(REFUSED_WARNING, code=403)
    assert first_patch(mutate(obj, "shop", STRICT, _answer(GRANTED))).warnings == ()


def test_an_unavailable_preview_never_refuses_even_when_strict() -> None:
    obj = pod({"containers": [container("app")]}, DB)
    outcome = first_patch(mutate(obj, "shop", STRICT, PreviewUnavailable("no answer within 2s")))
    assert outcome.warnings == (
        "the broker's policy preview is not available (no answer within 2s); the agent will "
        "find out at start-up whether its roles are granted",)


# -- warnings -----------------------------------------------------------------------------

def test_warnings_about_the_pods_own_settings() -> None:
    obj = pod({"containers": [container("app", securityContext={"runAsUser": 1000}),
                              container("worker", securityContext={"runAsUser": 2000})],
               "terminationGracePeriodSeconds": 5, "hostNetwork": True}, DB)
    warnings = first_patch(mutate(obj, "shop", CONFIG)).warnings
    readers = "'app' (uid 1000), 'worker' (uid 2000)"
    assert warnings == (
        "spec.terminationGracePeriodSeconds (5) is shorter than the agent's exit timeout "
        "(20s): it may be killed before giving back the pod's credentials (the broker's pod "
        "watch still ends them)",
        "spec.hostNetwork: the agent's readiness port 8399 opens on the node; two such pods "
        "on one node collide",
        f"ephemeral-broker/perms-cache: the agent (uid 65532) owns the file (0400); {readers} "
        "cannot read it: set the pod's fsGroup and perms 0440",
        f"ephemeral-broker/perms-db: the agent (uid 65532) owns the file (0400); {readers} "
        "cannot read it: set the pod's fsGroup and perms 0440",
    )


def _agent_context(obj: dict[str, Any]) -> list[dict[str, Any]]:
    after = injected(obj)
    return [c["securityContext"] for c in (*after["spec"]["initContainers"],
                                           *after["spec"]["containers"])
            if c["name"] in (AGENT, AGENT_INIT)]


def _as(uid: int | None = None, gid: int | None = None) -> dict[str, Any]:
    context = {"runAsUser": uid, "runAsGroup": gid}
    return {"securityContext": {k: v for k, v in context.items() if v is not None}}


CONFIGURED = (65532, None)


@pytest.mark.parametrize(("spec", "annotations", "expected"), [
    ({"containers": [container("app", **_as(1000))]}, {}, (1000, None)),
    ({"containers": [container("app"), container("worker")],
      "securityContext": {"runAsUser": 1000, "runAsGroup": 3000}}, {}, (1000, 3000)),
    ({"containers": [container("app", **_as(1000, 3000)), container("worker", **_as(1000))],
      "securityContext": {"runAsGroup": 3000}}, {}, (1000, 3000)),
    ({"containers": [container("app", **_as(1000, 3000)), container("worker", **_as(1000))]},
     {}, (1000, None)),
    ({"containers": [container("app", **_as(1000, 0))]}, {}, (1000, None)),
    ({"containers": [container("app", **_as(1000)), container("worker", **_as(2000))]},
     {}, CONFIGURED),
    ({"containers": [container("app", **_as(2000)), container("worker")],
      "securityContext": {"runAsUser": 1000}}, {}, CONFIGURED),
    ({"containers": [container("app", **_as(1000)), container("worker")]}, {}, CONFIGURED),
    ({"containers": [container("app")]}, {}, CONFIGURED),
    ({"containers": [container("app", **_as(0))]}, {}, CONFIGURED),
    ({"containers": [container("app", **_as(1000)), container("worker", **_as(2000))]},
     {P + "containers": "app"}, (1000, None)),
    ({"containers": [container("app", **_as(1000))],
      "initContainers": [container("migrate", **_as(2000))]},
     {P + "containers": "app,migrate"}, CONFIGURED),
    ({"containers": [container("app", **_as(1000))]}, {P + "mode": "sidecar"}, (1000, None)),
    ({"containers": [container("app", **_as(1000))]}, {P + "mode": "init-only"}, (1000, None)),
], ids=["one-container", "pod-level-with-group", "group-from-pod-and-container",
        "groups-differ", "root-group", "uids-differ", "container-overrides-pod",
        "one-uid-unknown", "no-uid", "root", "unselected-container-does-not-count",
        "init-reader-differs", "sidecar-mode", "init-only"])
def test_the_agent_runs_as_the_one_uid_its_readers_run_as(
        spec: dict[str, Any], annotations: dict[str, str], expected: tuple[int, int | None]
) -> None:
    """So that 0400 files are readable and a rotation signal reaches the app, without
    anyone having to know the agent's uid; otherwise the configured one (and a warning
    where a reader is known to differ)."""
    obj = pod(spec, {**DB, **annotations})
    contexts = _agent_context(obj)
    assert contexts and all(
        (c["runAsUser"], c.get("runAsGroup")) == expected and c["runAsNonRoot"] is True
        for c in contexts), contexts
    if expected != CONFIGURED:
        assert not any("perms-" in w for w in first_patch(mutate(obj, "shop", CONFIG)).warnings)


def test_no_readability_warning_when_the_file_is_readable() -> None:
    same = pod({"containers": [container("app", securityContext={"runAsUser": 65532})]}, DB)
    assert first_patch(mutate(same, "shop", CONFIG)).warnings == ()
    group = pod({"containers": [container("app")], "securityContext": {
        "runAsUser": 1000, "fsGroup": 3000}},
        {P + "credential-db": "app-db", P + "perms-db": "0440"})
    assert first_patch(mutate(group, "shop", CONFIG)).warnings == ()


def test_mutate_never_changes_its_input() -> None:
    obj = pod({"containers": [container("app")]}, DB)
    before = copy.deepcopy(obj)
    mutate(obj, "shop", CONFIG)
    assert obj == before
