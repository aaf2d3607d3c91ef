"""What the injector adds to a pod: the two volumes and the agent's containers, with the
agent's command line exactly as ``broker agent`` takes it. Pure.

The native agent's startup probe is deliberately patient (``agent.startup_timeout_s``,
15 minutes by default). A startup probe that runs out makes the kubelet SIGTERM the
agent, and an agent that receives SIGTERM gives back what it holds (``on-exit``:
terminate ends the pod's whole instance at the broker, after which nothing more is ever
issued to this pod). So a probe that gave up after a few seconds of broker downtime would
turn a transient outage into a pod that can never start: the window must be longer than
any outage the agent's own retries ride out. Until it passes, the kubelet simply does not
start the app containers, which is exactly what the app needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.injector.annotations import CredentialSpec, InjectionSpec, OnExit
from broker.injector.settings import TOKEN_DIR, InjectorSettings

CREDENTIALS_VOLUME = "ephemeral-broker-credentials"
TOKEN_VOLUME = "ephemeral-broker-token"
TOKEN_PATH = "token"
AGENT = "ephemeral-broker-agent"
AGENT_INIT = "ephemeral-broker-agent-init"
OUR_CONTAINERS = frozenset({AGENT, AGENT_INIT})
OUR_VOLUMES = frozenset({CREDENTIALS_VOLUME, TOKEN_VOLUME})
PROBE_PERIOD_S = 1
# tmpfs pages count against the pod's memory; credential files are a few KiB each.
CREDENTIALS_SIZE_LIMIT = "1Mi"


@dataclass(frozen=True)
class AgentUser:
    """Who the agent runs as: the configured uid, or the one uid every container that
    reads the credentials runs as (see ``broker.injector.mutate``)."""

    uid: int
    gid: int | None = None


def volumes(config: InjectorSettings) -> list[dict[str, Any]]:
    """The in-memory credential directory, and the agent's own projected token: the
    broker's audience and a short expiry, whatever the pod's
    ``automountServiceAccountToken`` says (that governs the default API token only)."""
    return [
        {
            "name": CREDENTIALS_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": CREDENTIALS_SIZE_LIMIT},
        },
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": config.audience,
                            "expirationSeconds": config.token_expiration_s,
                            "path": TOKEN_PATH,
                        }
                    }
                ]
            },
        },
    ]


def app_mount(config: InjectorSettings) -> dict[str, Any]:
    return {"name": CREDENTIALS_VOLUME, "mountPath": config.agent.mount_path, "readOnly": True}


def credential_arg(c: CredentialSpec) -> str:
    """``NAME=ROLE[,key=value...]``; ``command=`` last, since its JSON may hold commas."""
    parts = [f"{c.name}={c.role}", f"format={c.format}", f"perms={c.perms}"]
    if c.ttl_s is not None:
        parts.append(f"ttl={c.ttl_s}s")
    if c.keygen is not None:
        parts.append(f"keygen={c.keygen}")
    if c.common_name is not None:
        parts.append(f"cn={c.common_name}")
    if c.signal is not None:
        parts.append(f"signal={c.signal}")
    if c.command is not None:
        # Unescaped UTF-8, as the agent counts its limit: never longer than the annotation.
        command = json.dumps(list(c.command), separators=(",", ":"), ensure_ascii=False)
        parts.append("command=" + command)
    return ",".join(parts)


def agent_args(
    spec: InjectionSpec,
    config: InjectorSettings,
    *,
    once: bool,
    on_exit: OnExit,
    ready: bool,
    ca_pem: str | None = None,
) -> list[str]:
    """``broker agent``'s command line. ``ca_pem``: the CA the broker's certificate
    chains to (``agent.ca_file`` as the injector read it); public, so it may sit in the
    pod's spec, and a pod gets the CA that is current when it is created."""
    agent = config.agent
    args = [
        "agent",
        "--broker-url",
        config.broker_url,
        "--token-file",
        f"{TOKEN_DIR}/{TOKEN_PATH}",
        "--dir",
        agent.mount_path,
    ]
    for c in spec.credentials:
        args += ["--credential", credential_arg(c)]
    for c in spec.credentials:
        if c.template is not None:
            args += ["--template", f"{c.name}={c.template}"]
    if once:
        args.append("--once")
    args += ["--on-exit", on_exit]
    if ready:
        # The kubelet probes the pod's IP, not the container's loopback; /ready shows no
        # credential, only whether every file is written.
        args += ["--ready-listen", f"0.0.0.0:{agent.ready_port}"]
    if ca_pem is not None:
        args += ["--ca-pem", ca_pem]
    args += ["--exit-timeout", f"{agent.exit_timeout_s}s"]
    return args


def security_context(user: AgentUser) -> dict[str, Any]:
    """What the ``restricted`` Pod Security Standard requires of every container."""
    context: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": user.uid}
    if user.gid is not None:
        context["runAsGroup"] = user.gid
    return {
        **context,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def agent_container(
    spec: InjectionSpec,
    config: InjectorSettings,
    *,
    name: str,
    once: bool,
    native: bool,
    user: AgentUser | None = None,
    ca_pem: str | None = None,
) -> dict[str, Any]:
    """One agent container: ``native`` is the restartable init container (Kubernetes
    1.29+ native sidecar) with its startup probe; ``once`` fetches, writes and exits."""
    agent = config.agent
    on_exit: OnExit = "keep" if once else spec.on_exit
    container: dict[str, Any] = {
        "name": name,
        "image": agent.image,
        "imagePullPolicy": agent.image_pull_policy,
        "command": ["broker"],
        "args": agent_args(
            spec, config, once=once, on_exit=on_exit, ready=native, ca_pem=ca_pem
        ),
        "resources": {
            "requests": dict(spec.resources["requests"]),
            "limits": dict(spec.resources["limits"]),
        },
        "securityContext": security_context(user or AgentUser(config.agent.run_as_user)),
        "volumeMounts": [
            {"name": CREDENTIALS_VOLUME, "mountPath": agent.mount_path},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if native:
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {
            "httpGet": {"path": "/ready", "port": agent.ready_port},
            "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 1,
            "failureThreshold": max(1, agent.startup_timeout_s // PROBE_PERIOD_S),
        }
    return container
