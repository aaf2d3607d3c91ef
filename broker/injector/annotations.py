"""The annotation contract (prefix ``ephemeral-broker/``, version 1) read into a typed
``InjectionSpec``. Pure.

Every key under the prefix is either known or refused, and every refusal names the
annotation and what it expects: a typo (``ephemeral-broker/perm-db``) must not silently
leave a credential world-readable or a pod without its agent. All problems of a pod are
reported at once, so one ``kubectl apply`` round trip shows them all.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from broker.agent.spec import MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, MAX_TEMPLATE_BYTES
from broker.durations import parse_duration
from broker.injector.model import INJECT_KEY, PREFIX, STATUS_KEY
from broker.injector.quantity import EXPECTED as QUANTITY_EXPECTED
from broker.injector.quantity import parse_quantity
from broker.injector.settings import AgentResources

Mode = Literal["native", "sidecar", "init-only"]
OnExit = Literal["terminate", "release", "keep"]

MODES: tuple[Mode, ...] = ("native", "sidecar", "init-only")
ON_EXIT: tuple[OnExit, ...] = ("terminate", "release", "keep")
FORMATS = ("json", "env", "pem", "pgpass", "aws-credential-process", "template")
KEYGENS = ("ec-p256", "rsa-2048", "ed25519")
# Signals a rotation may send: the ones servers conventionally reload or reopen on.
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGINT", "SIGQUIT", "SIGTERM")
MAX_CREDENTIALS = 32  # the policy preview's bound on roles, and plenty for one pod
# The agent's own limits, in UTF-8 bytes as it counts them: what is admitted, it takes.
# (A command's annotation is never shorter than the compact JSON emitted from it.)
MAX_TEMPLATE = MAX_TEMPLATE_BYTES
MAX_COMMAND = MAX_COMMAND_BYTES

CREDENTIAL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
ROLE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
CONTAINER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_PERMS = re.compile(r"^0[0-7]{3}\Z")
# The process name is what /proc/PID/comm holds: at most 15 bytes, cut by the kernel; no
# ',' or '=', which would end ``signal=`` on the agent's command line and start an option.
_SIGNAL = re.compile(r"^(?P<signal>SIG[A-Z0-9]{1,10}):(?P<process>[^\s/:\x00,=]{1,15})\Z")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_COMMON_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
MAX_COMMON_NAME = 64  # X.509's upper bound for a CN
# Formats that can carry a certificate next to a key the agent generates.
KEYGEN_FORMATS = ("json", "pem", "template")

# Per-credential annotation prefixes → the ``CredentialSpec`` field each sets.
OPTION_FIELDS = {
    "format-": "format",
    "template-": "template",
    "perms-": "perms",
    "command-": "command",
    "signal-": "signal",
    "ttl-": "ttl_s",
    "keygen-": "keygen",
    "common-name-": "common_name",
}
PER_CREDENTIAL = ("credential-", *OPTION_FIELDS)
_FIELD_PREFIX = {f: p for p, f in OPTION_FIELDS.items()}
RESOURCE_KEYS = {
    "agent-cpu-request": ("requests", "cpu"),
    "agent-cpu-limit": ("limits", "cpu"),
    "agent-memory-request": ("requests", "memory"),
    "agent-memory-limit": ("limits", "memory"),
}
GLOBAL_KEYS = ("inject", "status", "mode", "on-exit", "containers", *RESOURCE_KEYS)
# Bounds checked before any key is looked at, so that the work per pod stays small
# whatever a hand-made review carries: no valid pod has more keys under the prefix than
# every global key and every option of MAX_CREDENTIALS credentials, and the API server
# refuses a pod whose annotations together pass 256 KiB.
MAX_KEYS = len(GLOBAL_KEYS) + len(PER_CREDENTIAL) * MAX_CREDENTIALS
MAX_ANNOTATION_BYTES = 256 * 1024
# "Did you mean" for the first few unknown keys only: each costs a comparison with every
# known key.
MAX_HINTS = 3


@dataclass(frozen=True)
class CredentialSpec:
    name: str  # the file name in the credential directory
    role: str
    format: str = "json"
    template: str | None = None
    perms: str = "0400"
    ttl_s: int | None = None
    keygen: str | None = None
    common_name: str | None = None
    signal: str | None = None  # SIGNAL:PROCESS_NAME
    command: tuple[str, ...] | None = None


@dataclass(frozen=True)
class InjectionSpec:
    credentials: tuple[CredentialSpec, ...]
    mode: Mode = "native"
    on_exit: OnExit = "terminate"
    containers: tuple[str, ...] | None = None  # None: every app container
    # requests/limits → cpu/memory → quantity, config defaults overridden by annotations
    resources: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted({c.role for c in self.credentials}))


def files_of(name: str, format: str, keygen: bool) -> tuple[str, ...]:
    """The files the agent writes for a credential (as ``broker agent`` names them)."""
    if format == "pem":
        return (f"{name}.crt", f"{name}.key", f"{name}-ca.crt")
    if keygen:
        return (name, f"{name}.key", f"{name}.key-cert.pub")
    return (name,)


class _Problem(str):
    """A refusal message (never a value), naming the annotation."""


class InvalidAnnotations(ValueError):
    """One or more annotations are refused; ``problems`` each name the annotation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def opted_in(labels: Mapping[str, object], annotations: Mapping[str, object]) -> bool:
    """Both the label (which the webhook's objectSelector matches, so other pods never
    depend on the webhook) and the annotation say ``"true"``."""
    return labels.get(INJECT_KEY) == "true" and annotations.get(INJECT_KEY) == "true"


def _expect(key: str, what: str, value: object | None = None) -> _Problem:
    got = "" if value is None else f", got {_show(value)}"
    return _Problem(f"{PREFIX}{key}: expected {what}{got}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Collects the spec and every problem while walking the annotations once."""

    def __init__(self, share_process_namespace: bool, defaults: AgentResources) -> None:
        self.share_process_namespace = share_process_namespace
        self.problems: list[str] = []
        self.roles: dict[str, str] = {}
        self.options: dict[str, dict[str, object]] = {}
        self.mode: Mode = "native"
        self.on_exit: OnExit | None = None
        self.containers: tuple[str, ...] | None = None
        self.resources = {
            "requests": defaults.requests.model_dump(),
            "limits": defaults.limits.model_dump(),
        }
        self.resource_keys: dict[tuple[str, str], str] = {}
        self.unknown: list[str] = []

    def global_key(self, key: str, value: str) -> None:
        if key == "inject":
            if value != "true":
                self.problems.append(_expect(key, '"true"', value))
        elif key == "status":
            if value != "injected":
                self.problems.append(
                    _expect(key, '"injected" (written by the webhook) or no value', value)
                )
        elif key == "mode":
            if value not in MODES:
                self.problems.append(_expect(key, " | ".join(MODES), value))
            else:
                self.mode = value
        elif key == "on-exit":
            if value not in ON_EXIT:
                self.problems.append(_expect(key, " | ".join(ON_EXIT), value))
            else:
                self.on_exit = value
        elif key == "containers":
            names = tuple(n.strip() for n in value.split(","))
            if not all(CONTAINER_NAME.match(n) for n in names):
                self.problems.append(
                    _expect(key, "comma-separated container names like app,worker", value)
                )
            else:
                self.containers = tuple(dict.fromkeys(names))
        else:
            where = RESOURCE_KEYS[key]
            try:
                parse_quantity(value)
            except ValueError:
                self.problems.append(_expect(key, QUANTITY_EXPECTED, value))
            else:
                self.resources[where[0]][where[1]] = value
                self.resource_keys[where] = key

    def credential_key(self, kind: str, name: str, value: str) -> None:
        key = f"{kind}{name}"
        if not CREDENTIAL_NAME.match(name):
            self.problems.append(
                f"{PREFIX}{key}: the credential name {name!r} is its file name: expected "
                "lower-case letters, digits and '-', starting and ending with a letter or "
                "digit, at most 63 characters"
            )
            return
        option = _credential_option(kind, key, value, self.share_process_namespace)
        if isinstance(option, _Problem):
            self.problems.append(option)
        elif kind == "credential-":
            self.roles[name] = value
        else:
            self.options.setdefault(name, {})[OPTION_FIELDS[kind]] = option

    def finish(self) -> InjectionSpec:
        for i, key in enumerate(self.unknown):
            self.problems.append(_unknown(key, self.roles, hint=i < MAX_HINTS))
        self._check_options()
        self._check_resources()
        if self.mode == "init-only" and self.on_exit not in (None, "keep"):
            self.problems.append(
                f"{PREFIX}on-exit: mode init-only leaves no agent running to give anything "
                "back (the broker's pod watch ends the instance when the pod goes); remove "
                "it, set keep, or use mode native"
            )
        if not self.roles and not self.problems:
            self.problems.append(
                f"{PREFIX}inject: the pod asks for no credential; add "
                f"{PREFIX}credential-<name>: <role>"
            )
        if len(self.roles) > MAX_CREDENTIALS:
            self.problems.append(
                f"{PREFIX}credential-*: at most {MAX_CREDENTIALS} credentials per pod, "
                f"got {len(self.roles)}"
            )
        if self.problems:
            raise InvalidAnnotations(sorted(self.problems))
        credentials = tuple(
            CredentialSpec(name=name, role=role, **self.options.get(name, {}))  # type: ignore[arg-type]
            for name, role in sorted(self.roles.items())
        )
        return InjectionSpec(
            credentials=credentials,
            mode=self.mode,
            on_exit=self.on_exit or ("keep" if self.mode == "init-only" else "terminate"),
            containers=self.containers,
            resources=self.resources,
        )

    def _check_options(self) -> None:
        for name, options in sorted(self.options.items()):
            if name not in self.roles:
                keys = ", ".join(f"{PREFIX}{_FIELD_PREFIX[f]}{name}" for f in sorted(options))
                self.problems.append(f"{keys}: there is no {PREFIX}credential-{name} to apply to")
                continue
            is_template = options.get("format") == "template"
            if is_template and "template" not in options:
                self.problems.append(
                    f"{PREFIX}template-{name}: required with {PREFIX}format-{name}: template "
                    "(a template over the response's data, like ${username})"
                )
            if not is_template and "template" in options:
                self.problems.append(
                    f"{PREFIX}template-{name}: only with {PREFIX}format-{name}: template"
                )
            if "common_name" in options and "keygen" not in options:
                self.problems.append(
                    f"{PREFIX}common-name-{name}: only with {PREFIX}keygen-{name} (the CSR "
                    "the agent signs with the key it generates carries the name)"
                )
            if "keygen" in options and options.get("format", "json") not in KEYGEN_FORMATS:
                self.problems.append(
                    f"{PREFIX}keygen-{name}: a generated key goes with a certificate: "
                    f"{PREFIX}format-{name} must be {', '.join(KEYGEN_FORMATS)}"
                )
        self._check_files()

    def _check_files(self) -> None:
        """Two credentials must not write the same file (``a`` in pem writes ``a-ca.crt``,
        which is also the certificate of a credential ``a-ca`` in pem)."""
        written: dict[str, str] = {}
        for name in sorted(self.roles):
            options = self.options.get(name, {})
            for file in files_of(name, str(options.get("format", "json")), "keygen" in options):
                other = written.setdefault(file, name)
                if other != name:
                    self.problems.append(
                        f"{PREFIX}credential-{name}: it writes {file}, which credential "
                        f"{other} writes too (pem writes NAME.crt, NAME.key and NAME-ca.crt; "
                        "keygen adds NAME.key and NAME.key-cert.pub); rename one"
                    )

    def _check_resources(self) -> None:
        for kind in ("cpu", "memory"):
            request, limit = self.resources["requests"][kind], self.resources["limits"][kind]
            try:
                too_much = parse_quantity(request) > parse_quantity(limit)
            except ValueError:
                continue  # already reported
            if too_much:
                named = [
                    PREFIX + self.resource_keys[w]
                    for w in (("requests", kind), ("limits", kind))
                    if w in self.resource_keys
                ]
                self.problems.append(
                    f"{' and '.join(named)}: the agent's {kind} request ({request}) must not "
                    f"exceed its limit ({limit})"
                )


def _unknown(key: str, credentials: Mapping[str, str], *, hint: bool) -> str:
    close = []
    if hint:
        known = [*GLOBAL_KEYS, *(p + n for p in PER_CREDENTIAL for n in credentials)]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint_text = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
    return (
        f"{PREFIX}{key}: unknown annotation{hint_text}; expected {', '.join(GLOBAL_KEYS)}, or "
        f"{', '.join(PER_CREDENTIAL)} followed by a credential name (version 1 of the "
        "annotation contract)"
    )


def _credential_option(
    kind: str, key: str, value: str, share_process_namespace: bool
) -> str | int | tuple[str, ...]:
    """The value of one per-credential annotation, or a ``_Problem`` naming it."""
    if kind == "credential-":
        if not ROLE.match(value):
            return _expect(key, "a role name (lower-case letters, digits, _ and -)", value)
        return value
    if kind == "format-":
        if value not in FORMATS:
            return _expect(key, " | ".join(FORMATS), value)
        return value
    if kind == "template-":
        return _template(key, value)
    if kind == "perms-":
        return _perms(key, value)
    if kind == "command-":
        return _command(key, value)
    if kind == "signal-":
        return _signal(key, value, share_process_namespace)
    if kind == "ttl-":
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = 0
        if seconds < 1:
            return _expect(key, "a duration like 15m or 1h (at least 1s)", value)
        return seconds
    if kind == "keygen-":
        if value not in KEYGENS:
            return _expect(key, " | ".join(KEYGENS), value)
        return value
    if len(value) > MAX_COMMON_NAME or not _COMMON_NAME.match(value):
        return _expect(
            key, f"a DNS name like api.shop.svc, at most {MAX_COMMON_NAME} characters", value
        )
    return value


def _template(key: str, value: str) -> str:
    problem = _expect(
        key,
        "a Python string.Template over the response's data, like "
        "'postgres://${username}:${password}@db/app' ($$ for a literal $)",
    )
    if not value or _size(value) > MAX_TEMPLATE or "\x00" in value:
        return _Problem(f"{problem} (1 to {MAX_TEMPLATE} bytes, no NUL)")
    if not string.Template(value).is_valid():
        return _Problem(f"{problem}; a '$' is not followed by a name or {{name}}")
    return value


def _perms(key: str, value: str) -> str:
    what = (
        "an octal file mode like 0400 or 0440: readable by its owner, not writable by "
        "group or others, not executable"
    )
    if not _PERMS.match(value):
        return _expect(key, what, value)
    mode = int(value, 8)
    if mode & 0o133 or not mode & 0o400:
        return _expect(key, what, value)
    return value


def _command(key: str, value: str) -> str | tuple[str, ...]:
    what = (
        'a JSON array of strings, the program first, like ["nginx", "-s", "reload"] '
        "(run directly, never through a shell)"
    )
    if _size(value) > MAX_COMMAND:
        return _expect(key, f"{what}, at most {MAX_COMMAND} bytes")
    try:
        argv = json.loads(value)
    except ValueError:
        return _expect(key, what, value)
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\x00" not in a and _encodable(a) for a in argv)
        or not argv[0].strip()
    ):
        return _expect(key, what, value)
    if len(argv) > MAX_COMMAND_ARGS:
        return _expect(key, f"{what}, at most {MAX_COMMAND_ARGS} of them")
    return tuple(argv)


def _encodable(text: str) -> bool:
    """No lone surrogate (``"\\ud800"`` in the JSON): exec could not pass it on."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _signal(key: str, value: str, share_process_namespace: bool) -> str:
    match = _SIGNAL.match(value)
    if match is None or match.group("signal") not in SIGNALS:
        return _expect(
            key,
            f"SIGNAL:PROCESS_NAME like SIGHUP:nginx (SIGNAL one of {', '.join(SIGNALS)}; "
            "PROCESS_NAME as in /proc/PID/comm, at most 15 characters, no space, '/', ':', "
            "',' or '=')",
            value,
        )
    if not share_process_namespace:
        return _Problem(
            f"{PREFIX}{key}: the agent can signal another container's process only when "
            "the pod sets shareProcessNamespace: true; set it, or use "
            f"{PREFIX}command-{key.removeprefix('signal-')} instead"
        )
    return value


def _size(text: object) -> int:
    return len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else 0


def _bounded(annotations: Mapping[str, object]) -> dict[str, object]:
    """The annotations under the prefix, or ``InvalidAnnotations`` at once when there are
    more of them, or more bytes in all, than any pod that could be admitted has."""
    size = sum(_size(k) + _size(v) for k, v in annotations.items())
    if size > MAX_ANNOTATION_BYTES:
        raise InvalidAnnotations(
            [
                f"metadata.annotations: {size} bytes in all, more than Kubernetes allows "
                f"({MAX_ANNOTATION_BYTES})"
            ]
        )
    ours = {k: v for k, v in annotations.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if len(ours) > MAX_KEYS:
        raise InvalidAnnotations(
            [
                f"{PREFIX}*: {len(ours)} annotations under the prefix, more than a pod can "
                f"use (at most {MAX_KEYS}: {len(GLOBAL_KEYS)} for the pod and "
                f"{len(PER_CREDENTIAL)} per credential, {MAX_CREDENTIALS} credentials at most)"
            ]
        )
    return ours


def parse(
    annotations: Mapping[str, object],
    *,
    share_process_namespace: bool,
    defaults: AgentResources,
) -> InjectionSpec:
    """The pod's ``InjectionSpec``; ``InvalidAnnotations`` naming every refused key."""
    ours = _bounded(annotations)
    reader = _Reader(share_process_namespace, defaults)
    for full_key, value in sorted(ours.items()):
        key = full_key.removeprefix(PREFIX)
        if not isinstance(value, str):
            reader.problems.append(_expect(key, "a string value"))
            continue
        if key in GLOBAL_KEYS:
            reader.global_key(key, value)
            continue
        kind = next((p for p in PER_CREDENTIAL if key.startswith(p)), None)
        if kind is None:
            reader.unknown.append(key)
            continue
        reader.credential_key(kind, key.removeprefix(kind), value)
    return reader.finish()


def status_injected(annotations: Mapping[str, object]) -> bool:
    return annotations.get(STATUS_KEY) == "injected"
