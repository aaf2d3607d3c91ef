"""What the injector puts on the agent's command line, read back by the agent's own parser
(``broker.agent.spec.build_specs``) before the pod is admitted. Pure.

The annotation parser checks the same things as the agent, with the agent's limits; this
is the proof, pod by pod, that the two agree. Where they would not, the pod is refused at
admission with the annotation named, instead of being let in with an agent that refuses
to start (a pod stuck in Init, with the reason only in the agent's log).
"""

from __future__ import annotations

from broker.agent.spec import SpecError, build_specs
from broker.injector.annotations import InjectionSpec
from broker.injector.containers import agent_args
from broker.injector.model import PREFIX
from broker.injector.settings import InjectorSettings

# The agent's option (``SpecError.option``) → the annotation that sets it.
_ANNOTATION = {
    "NAME": "credential-",
    "ROLE": "credential-",
    "format": "format-",
    "perms": "perms-",
    "ttl": "ttl-",
    "keygen": "keygen-",
    "cn": "common-name-",
    "signal": "signal-",
    "command": "command-",
    "template": "template-",
}


def credentials_and_templates(args: list[str]) -> tuple[list[str], list[str]]:
    """The values of ``--credential`` and ``--template`` in an agent command line."""
    found: dict[str, list[str]] = {"--credential": [], "--template": []}
    i = 0
    while i < len(args):
        values = found.get(args[i])
        if values is not None and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
        else:
            i += 1
    return found["--credential"], found["--template"]


def agent_problems(spec: InjectionSpec, config: InjectorSettings) -> list[str]:
    """Nothing, or the one problem the agent would stop at, naming the annotation."""
    args = agent_args(spec, config, once=False, on_exit=spec.on_exit, ready=True)
    try:
        build_specs(*credentials_and_templates(args))
    except SpecError as exc:
        key = _ANNOTATION.get(exc.option, "credential-") + (exc.credential or "*")
        return [f"{PREFIX}{key}: the agent would refuse this on its command line: {exc}"]
    return []
