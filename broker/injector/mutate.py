"""The admission decision: pod + namespace + config (+ the policy preview's answer) →
``Patch | Refusal | Skip``. Pure: no I/O, no clock, no exception for any pod body.

Patches are RFC 6902 operations built one by one against the pod as it is: an array that
does not exist yet is added whole (``/spec/volumes``), one that exists is appended to
(``/spec/volumes/-``) or inserted into at an index, so every operation applies to every
pod shape. Ordering in ``initContainers``:

- The agent (the native sidecar, or ``ephemeral-broker-agent-init`` in the other modes)
  goes right after the last existing native sidecar and before every other init
  container. A service mesh's proxy is such a sidecar; its init step (or CNI plugin) has
  already redirected the pod's traffic through it, so the agent must start after the
  proxy is up or it cannot reach the broker. Regular init containers that come after the
  agent may read the credentials (name them in ``ephemeral-broker/containers``).
- On reinvocation (a later webhook changed the pod), an agent that now sits before a
  native sidecar is moved after the last one, for the same reason; containers added since
  get their read-only mount. Nothing else changes, so a second pass over an injected pod
  yields no patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.injector.agentargs import agent_problems
from broker.injector.annotations import (
    InjectionSpec,
    InvalidAnnotations,
    opted_in,
    parse,
    status_injected,
)
from broker.injector.containers import (
    AGENT,
    AGENT_INIT,
    CREDENTIALS_VOLUME,
    OUR_CONTAINERS,
    OUR_VOLUMES,
    AgentUser,
    agent_container,
    app_mount,
    volumes,
)
from broker.injector.images import digest_effect
from broker.injector.model import (
    PREFIX,
    STATUS_KEY,
    JsonPatchOp,
    Patch,
    Preview,
    PreviewAnswer,
    PreviewQuery,
    Refusal,
    Skip,
)
from broker.injector.pods import (
    Obj,
    PodView,
    metadata_of,
    mounts_at,
    mounts_volume,
    native_sidecar,
    run_as_group,
    run_as_user,
    view,
)
from broker.injector.settings import InjectorSettings


@dataclass(frozen=True)
class _Plan:
    pod: PodView
    spec: InjectionSpec
    insert_at: int  # the agent's index in initContainers
    apps: list[int]  # spec.containers that get the read-only mount
    inits: list[int]  # spec.initContainers (before the insertion) that get it
    user: AgentUser
    warnings: list[str]


def _escape(segment: str) -> str:
    """A JSON Pointer segment (RFC 6901): ``~`` → ``~0``, ``/`` → ``~1``."""
    return segment.replace("~", "~0").replace("/", "~1")


def _insert_at(containers: Sequence[Mapping[str, Any]]) -> int:
    return max((i for i, c in enumerate(containers) if native_sidecar(c)), default=-1) + 1


def _mount_ops(path: str, container: Mapping[str, Any], mount: Obj) -> list[JsonPatchOp]:
    if container.get("volumeMounts") is None:
        return [{"op": "add", "path": f"{path}/volumeMounts", "value": [mount]}]
    return [{"op": "add", "path": f"{path}/volumeMounts/-", "value": mount}]


def _select(
    pod: PodView, names: tuple[str, ...] | None, agent_at: int
) -> tuple[list[int], list[int]] | str:
    """Which app containers (and which init containers after the agent) get the mount;
    or a problem naming ``ephemeral-broker/containers``."""
    apps = {c["name"]: i for i, c in enumerate(pod.containers) if c["name"] not in OUR_CONTAINERS}
    if names is None:
        return sorted(apps.values()), []
    later = {
        c["name"]: i
        for i, c in enumerate(pod.init_containers)
        if i >= agent_at and c["name"] not in OUR_CONTAINERS
    }
    unknown = [n for n in names if n not in apps and n not in later]
    if unknown:
        inits = f"; init containers that run after the agent: {', '.join(later)}" if later else ""
        return (
            f"{PREFIX}containers: no app container named {', '.join(map(repr, unknown))} "
            f"(app containers: {', '.join(apps) or 'none'}{inits})"
        )
    return (
        sorted(apps[n] for n in names if n in apps),
        sorted(later[n] for n in names if n not in apps),
    )


def _pod_problems(pod: PodView, spec: InjectionSpec, config: InjectorSettings) -> list[str]:
    problems = []
    os_spec = pod.spec.get("os")
    os_name = os_spec.get("name") if isinstance(os_spec, dict) else None
    if os_name not in (None, "linux"):
        problems.append(f"spec.os.name: the agent runs on linux only, got {os_name!r}")
    taken_volumes = sorted(OUR_VOLUMES & {v["name"] for v in pod.volumes})
    if taken_volumes:
        problems.append(
            f"spec.volumes: {', '.join(taken_volumes)} already exists; the injector adds "
            f"volumes of that name (is {STATUS_KEY} missing from an injected pod?)"
        )
    for c in (*pod.init_containers, *pod.containers):
        # The token is the agent's alone, and an app sees the credentials only read-only
        # where the injector mounts them: a mount that borrows either is refused.
        borrowed = sorted(v for v in OUR_VOLUMES if mounts_volume(c, v))
        if borrowed:
            problems.append(
                f"container {c['name']!r} mounts {' and '.join(borrowed)}, which only the "
                "injector may add and mount (the agent's token; the credentials, read-only "
                "in the containers it selects): remove the mount"
            )
    taken = sorted(OUR_CONTAINERS & pod.container_names())
    if taken:
        problems.append(
            f"spec: a container named {', '.join(taken)} already exists; the injector adds "
            "containers of that name"
        )
    if spec.mode != "init-only":
        port = config.agent.ready_port
        for c in (*pod.init_containers, *pod.containers):
            if any(p.get("containerPort") == port for p in c.get("ports") or []):
                problems.append(
                    f"spec: container {c['name']!r} declares port {port}, the agent's "
                    "readiness port (agent.ready_port in the injector's configuration)"
                )
    return problems


def agent_user(pod: PodView, readers: list[Obj], config: InjectorSettings) -> AgentUser:
    """The agent runs as the uid of the containers that read the credentials when they
    all run as one explicit non-root uid (their own ``runAsUser``, else the pod's), and
    with their ``runAsGroup`` when they share a non-root one: then the files it writes,
    0400 by default, are theirs to read, and a rotation signal reaches their processes
    (an agent without capabilities may signal only its own uid's). Otherwise the
    configured ``agent.run_as_user``, and ``_warnings`` says who cannot read what."""
    context = pod.pod_security_context
    uids = {run_as_user(c, context) for c in readers}
    uid = uids.pop() if len(uids) == 1 else None
    if uid is None or uid <= 0:
        return AgentUser(config.agent.run_as_user)
    gids = {run_as_group(c, context) for c in readers}
    gid = gids.pop() if len(gids) == 1 else None
    return AgentUser(uid, gid if gid is not None and gid > 0 else None)


def _warnings(
    pod: PodView,
    plan_apps: list[Obj],
    spec: InjectionSpec,
    config: InjectorSettings,
    agent_uid: int,
) -> list[str]:
    warnings = []
    grace = pod.spec.get("terminationGracePeriodSeconds")
    exit_s = config.agent.exit_timeout_s
    if spec.mode != "init-only" and type(grace) is int and grace < exit_s:
        warnings.append(
            f"spec.terminationGracePeriodSeconds ({grace}) is shorter than the agent's exit "
            f"timeout ({exit_s}s): it may be killed before giving back the pod's credentials "
            "(the broker's pod watch still ends them)"
        )
    if spec.mode == "native" and pod.spec.get("hostNetwork") is True:
        warnings.append(
            f"spec.hostNetwork: the agent's readiness port {config.agent.ready_port} opens on "
            "the node; two such pods on one node collide"
        )
    has_fs_group = pod.pod_security_context.get("fsGroup") is not None
    others = []  # containers whose process is known to run as another non-root user
    for container in plan_apps:
        uid = run_as_user(container, pod.pod_security_context)
        if uid not in (None, 0, agent_uid):
            others.append(f"{container['name']!r} (uid {uid})")
    fix = "set perms 0440" if has_fs_group else "set the pod's fsGroup and perms 0440"
    for c in spec.credentials if others else ():
        mode = int(c.perms, 8)
        if not (mode & 0o004 or (mode & 0o040 and has_fs_group)):
            warnings.append(
                f"{PREFIX}perms-{c.name}: the agent (uid {agent_uid}) owns the file "
                f"({c.perms}); {', '.join(others)} cannot read it: {fix}"
            )
    return warnings


def _plan(pod: PodView, config: InjectorSettings) -> _Plan | Refusal:
    try:
        spec = parse(
            pod.annotations,
            share_process_namespace=pod.share_process_namespace,
            defaults=config.agent.resources,
        )
    except InvalidAnnotations as exc:
        return Refusal("; ".join(exc.problems))
    problems = _pod_problems(pod, spec, config) + agent_problems(spec, config)
    insert_at = _insert_at(pod.init_containers)
    selected = _select(pod, spec.containers, insert_at)
    if isinstance(selected, str):
        problems.append(selected)
        selected = ([], [])
    apps, inits = selected
    path = config.agent.mount_path
    chosen = [pod.containers[i] for i in apps] + [pod.init_containers[i] for i in inits]
    for c in chosen:
        if mounts_at(c, path):
            problems.append(
                f"container {c['name']!r} already mounts a volume at {path}, where the "
                "injector mounts the credentials (agent.mount_path)"
            )
    if problems:
        return Refusal("; ".join(problems))
    user = agent_user(pod, chosen, config)
    warnings = _warnings(pod, chosen, spec, config, user.uid)
    return _Plan(pod, spec, insert_at, apps, inits, user, warnings)


def _first_look(pod: object, namespace: str, config: InjectorSettings) -> Skip | Refusal | PodView:
    labels, annotations = metadata_of(pod)
    if not opted_in(labels, annotations):
        return Skip("not_opted_in")
    if namespace in config.skip_namespaces:
        return Skip("namespace_skipped")
    seen = view(pod)
    if isinstance(seen, str):
        return Refusal(f"{seen} (the injector cannot read this pod)")
    return seen


def preview_query(pod: object, namespace: str, config: InjectorSettings) -> PreviewQuery | None:
    """What to ask the broker's policy preview about this pod: None when no preview is
    configured or the pod will not be injected on this pass (skipped, refused,
    reinvoked)."""
    if config.preview is None or config.issuer is None:
        return None
    seen = _first_look(pod, namespace, config)
    if not isinstance(seen, PodView) or status_injected(seen.annotations):
        return None
    plan = _plan(seen, config)
    if isinstance(plan, Refusal):
        return None
    sa = seen.service_account
    claims = {
        "sub": f"system:serviceaccount:{namespace}:{sa}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": sa},
            # generateName pods have no name yet, and no pod has a uid at admission.
            "pod": {"name": seen.name} if seen.name else {},
        },
    }
    return PreviewQuery(config.issuer, claims, plan.spec.roles)


def preview_effect(
    preview: Preview, spec: InjectionSpec, *, strict: bool
) -> tuple[list[str], Refusal | None]:
    """Warnings (and with ``strict``, a refusal) from the broker's policy preview. A
    preview that could not be had is only ever a warning. They name the role and the
    broker's code, never why: the pod's creator may not read the policy, and the reason
    would tell them which rules exist and whether a role does."""
    if not isinstance(preview, PreviewAnswer):
        return [
            f"the broker's policy preview is not available ({preview.reason}); the agent "
            "will find out at start-up whether its roles are granted"
        ], None
    messages = []
    for verdict in preview.verdicts:
        if verdict.granted:
            continue
        names = [c.name for c in spec.credentials if c.role == verdict.role]
        if not names:
            continue
        keys = ", ".join(f"{PREFIX}credential-{n}" for n in names)
        code = f" ({verdict.code})" if verdict.code else ""
        messages.append(
            f"{keys}: role {verdict.role!r} would be refused{code} for {preview.workload}: "
            "ask your platform team or see `brokerctl policy explain`"
        )
    if strict and messages:
        return [], Refusal("; ".join(messages), code=403)
    return messages, None


def _first_pass_ops(plan: _Plan, config: InjectorSettings, ca_pem: str | None) -> list[JsonPatchOp]:
    pod, spec = plan.pod, plan.spec
    mount = app_mount(config)
    ops: list[JsonPatchOp] = []
    # Mounts first: the init containers' indices are the pod's, before the agent's insertion.
    for i in plan.apps:
        ops += _mount_ops(f"/spec/containers/{i}", pod.containers[i], mount)
    for i in plan.inits:
        ops += _mount_ops(f"/spec/initContainers/{i}", pod.init_containers[i], mount)
    if pod.has_volumes:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes(config)]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes(config)})
    user = plan.user
    if spec.mode == "native":
        first = agent_container(
            spec, config, name=AGENT, once=False, native=True, user=user, ca_pem=ca_pem
        )
    else:
        first = agent_container(
            spec, config, name=AGENT_INIT, once=True, native=False, user=user, ca_pem=ca_pem
        )
    if pod.has_init_containers:
        ops.append({"op": "add", "path": f"/spec/initContainers/{plan.insert_at}", "value": first})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [first]})
    if spec.mode == "sidecar":
        sidecar = agent_container(
            spec, config, name=AGENT, once=False, native=False, user=user, ca_pem=ca_pem
        )
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    ops.append(
        {"op": "add", "path": f"/metadata/annotations/{_escape(STATUS_KEY)}", "value": "injected"}
    )
    return ops


def _reinvocation(pod: PodView, config: InjectorSettings) -> Patch | Skip:
    """Complete an injected pod that a later webhook changed: the agent moved after a
    native sidecar added after it, read-only mounts for containers added since."""
    if not any(v["name"] == CREDENTIALS_VOLUME for v in pod.volumes):
        return Skip("already_injected")  # marked by someone else: nothing of ours to complete
    try:
        names = parse(
            pod.annotations,
            share_process_namespace=pod.share_process_namespace,
            defaults=config.agent.resources,
        ).containers
    except InvalidAnnotations:
        return Skip("already_injected")  # changed since the first pass: leave it alone
    by_name = {c["name"]: c for c in pod.init_containers}
    order = [c["name"] for c in pod.init_containers]
    agent = next((n for n in (AGENT, AGENT_INIT) if n in by_name), None)
    move: JsonPatchOp | None = None
    if agent is not None:
        at = order.index(agent)
        last = max((i for i, c in enumerate(pod.init_containers) if native_sidecar(c)), default=-1)
        if last > at:
            move = {
                "op": "move",
                "from": f"/spec/initContainers/{at}",
                "path": f"/spec/initContainers/{last}",
            }
            order.insert(last, order.pop(at))  # the order the move leaves
    after_agent = order.index(agent) + 1 if agent is not None else len(order)
    mount, path = app_mount(config), config.agent.mount_path
    ops: list[JsonPatchOp] = []  # indices before the move: the mounts are added first
    for where, group, i in _select_after_move(pod, names, order, after_agent):
        c = group[i]
        if not mounts_volume(c, CREDENTIALS_VOLUME) and not mounts_at(c, path):
            ops += _mount_ops(f"/spec/{where}/{i}", c, mount)
    if move is None:
        return Patch(tuple(ops), first_pass=False) if ops else Skip("already_injected")
    warnings = tuple(
        f"{PREFIX}containers: init container {n!r} now runs before the agent, which moved "
        f"after the native sidecar {order[after_agent - 2]!r}: its credentials are not "
        "written yet when it runs"
        for n in order[: after_agent - 1]
        if n in (names or ()) and mounts_volume(by_name[n], CREDENTIALS_VOLUME)
    )
    return Patch((*ops, move), warnings, first_pass=False)


def _select_after_move(
    pod: PodView, names: tuple[str, ...] | None, order: list[str], after_agent: int
) -> list[tuple[str, list[Obj], int]]:
    apps = [
        ("containers", pod.containers, i)
        for i, c in enumerate(pod.containers)
        if c["name"] not in OUR_CONTAINERS and (names is None or c["name"] in names)
    ]
    if names is None:
        return apps
    later = set(order[after_agent:]) & set(names)
    inits = [
        ("initContainers", pod.init_containers, i)
        for i, c in enumerate(pod.init_containers)
        if c["name"] in later and c["name"] not in OUR_CONTAINERS
    ]
    return apps + inits


def mutate(
    pod: object,
    namespace: str,
    config: InjectorSettings,
    preview: Preview | None = None,
    *,
    ca_pem: str | None = None,
) -> Patch | Refusal | Skip:
    """The decision for one pod CREATE in ``namespace``. ``preview`` is the broker's
    answer for ``preview_query(pod, namespace, config)``, where one was asked;
    ``ca_pem`` the CA the agents are to trust for the broker's TLS (``agent.ca_file``)."""
    seen = _first_look(pod, namespace, config)
    if not isinstance(seen, PodView):
        return seen
    # Every container the pod has now, ours included on a reinvocation: a later webhook
    # may have added one named by tag.
    image_warnings, refused = digest_effect(
        config.image_digests, (*seen.init_containers, *seen.containers)
    )
    if status_injected(seen.annotations):
        if refused is not None:
            return Refusal(refused)
        done = _reinvocation(seen, config)
        if isinstance(done, Patch) and image_warnings:
            return Patch(done.ops, (*done.warnings, *image_warnings), first_pass=False)
        return done
    plan = _plan(seen, config)
    if isinstance(plan, Refusal):
        if refused is not None:
            return Refusal(f"{plan.message}; {refused}")
        return plan
    if refused is not None:
        return Refusal(refused)
    warnings = list(plan.warnings) + image_warnings
    if preview is not None:
        more, refusal = preview_effect(preview, plan.spec, strict=config.strict)
        if refusal is not None:
            return refusal
        warnings += more
    return Patch(tuple(_first_pass_ops(plan, config, ca_pem)), tuple(warnings))
