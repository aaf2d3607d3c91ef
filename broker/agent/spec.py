"""What the agent is asked to keep: one ``CredentialSpec`` per ``--credential``, read from
the command line the injector emits (``../k8s-contract.md``). Pure.

    NAME=ROLE[,format=F][,perms=0400][,ttl=15m][,keygen=K][,cn=NAME][,signal=SIG:PROC][,command=JSON]

``command=`` comes last: its JSON array may hold commas. ``--template NAME=TEXT`` gives
the text of a ``format=template`` credential. Every error says which credential, which
key and what is expected, and never repeats a value that could be a secret (none of these
is one, but a template's text is not echoed either).

The injector parses the same strings with ``parse_credential`` / ``build_specs`` to check
what it emits, so the two cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import string
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from broker.durations import parse_duration

FORMATS = ("json", "env", "pem", "pgpass", "aws-credential-process", "template")
KEYGENS = ("ec-p256", "rsa-2048", "ed25519")
# What a rotation may send to a process: the reload signals servers listen for, and the
# ones that stop one. Not SIGKILL/SIGSTOP: nothing reloads on those.
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGQUIT", "SIGTERM", "SIGWINCH")
DEFAULT_PERMS = 0o400
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
ROLE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")  # what the broker takes as a role name
_PERMS = re.compile(r"^0[0-7]{3}\Z")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
# /proc/PID/comm holds at most 15 bytes (the kernel's TASK_COMM_LEN less its NUL). No ','
# or '=' either: in ``signal=SIG:PROC`` they would end the value and start another option.
_COMM = re.compile(r"^[^\s/:\x00,=]{1,15}\Z")
MAX_COMMAND_ARGS = 64
MAX_COMMAND_BYTES = 4096
MAX_TEMPLATE_BYTES = 16 * 1024
_KEYS = ("format", "perms", "ttl", "keygen", "cn", "signal", "command")
# Formats that can carry a certificate next to a key the agent generated.
_KEYGEN_FORMATS = ("json", "pem", "template")


class SpecError(ValueError):
    """A ``--credential`` or ``--template`` the agent cannot use; the message says what
    to fix. ``credential`` names it where known, ``option`` is what is wrong: NAME, ROLE,
    an option's key, or template (the injector turns these into an annotation's name)."""

    def __init__(self, message: str, *, credential: str = "", option: str = "") -> None:
        super().__init__(message)
        self.credential = credential
        self.option = option


@dataclass(frozen=True)
class SignalTarget:
    """Send ``signal`` to every process whose ``/proc/PID/comm`` is ``process``."""

    signal: str  # one of SIGNALS
    process: str

    @property
    def number(self) -> int:
        return int(getattr(signal, self.signal))


@dataclass(frozen=True)
class CredentialSpec:
    name: str  # also the file name (see ``files``)
    role: str
    format: str = "json"
    perms: int = DEFAULT_PERMS
    ttl: int | None = None  # seconds; None: the role's default
    keygen: str | None = None
    cn: str | None = None
    signal: SignalTarget | None = None
    command: tuple[str, ...] | None = None
    template: str | None = field(default=None, repr=False)

    def files(self) -> tuple[str, ...]:
        """Every file this credential may write in the directory, relative names.

        ``pem``: ``NAME.crt`` (the certificate), ``NAME.key`` (its private key),
        ``NAME-ca.crt`` (the CA chain, for ``openssl verify -CAfile``); other formats:
        ``NAME``. With ``keygen`` the private key is ``NAME.key``, and an SSH
        certificate is also written as ``NAME.key-cert.pub``, where ``ssh -i NAME.key``
        looks for it."""
        if self.format == "pem":
            return (f"{self.name}.crt", f"{self.name}.key", f"{self.name}-ca.crt")
        if self.keygen:
            return (self.name, f"{self.name}.key", f"{self.name}.key-cert.pub")
        return (self.name,)

    def digest(self) -> str:
        """What the written files depend on; a state entry made under another digest is
        not adopted. The command and signal only say what runs after a rotation."""
        shape = {
            "role": self.role,
            "format": self.format,
            "perms": self.perms,
            "ttl": self.ttl,
            "keygen": self.keygen,
            "cn": self.cn,
            "template": self.template,
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:32]


def _fail(name: str, key: str, expected: str) -> SpecError:
    where = f"--credential {name}" if name else "--credential"
    return SpecError(f"{where}: {key}: {expected}", credential=name, option=key)


def parse_credential(text: str) -> CredentialSpec:
    """One ``--credential`` value. The template (``format=template``) is attached by
    ``build_specs``."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise _fail("", "NAME=ROLE", "expected NAME=ROLE[,key=value...], e.g. db=orders-ro")
    if not NAME.match(name):
        raise _fail(
            "",
            "NAME",
            "expected 1-63 lower-case letters, digits or '-', starting and ending with a "
            "letter or digit (it is the file name)",
        )
    command: tuple[str, ...] | None = None
    head, sep, tail = rest.partition(",command=")
    if sep:
        command = _command(name, tail)
    elif rest.startswith("command="):
        raise _fail(name, "ROLE", "the role comes first: NAME=ROLE,...,command=[...]")
    role, *items = head.split(",")
    if not ROLE.match(role):
        raise _fail(
            name,
            "ROLE",
            "expected a role name: 1-63 of a-z 0-9 _ -, starting with a letter or digit",
        )
    values: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in _KEYS:
            raise _fail(
                name,
                key or item,
                f"unknown option; expected key=value with key one of {', '.join(_KEYS)} "
                "(command= last)",
            )
        if key in values:
            raise _fail(name, key, "given twice")
        values[key] = value
    spec = CredentialSpec(
        name=name,
        role=role,
        format=_one_of(name, "format", values.get("format", "json"), FORMATS),
        perms=_perms(name, values.get("perms")),
        ttl=_ttl(name, values.get("ttl")),
        keygen=_one_of(name, "keygen", values["keygen"], KEYGENS) if "keygen" in values else None,
        cn=_cn(name, values.get("cn")),
        signal=_signal(name, values.get("signal")),
        command=command,
    )
    if spec.keygen and spec.format not in _KEYGEN_FORMATS:
        raise _fail(
            name,
            "keygen",
            f"a generated key goes with a certificate: use format {', '.join(_KEYGEN_FORMATS)}",
        )
    if spec.cn and not spec.keygen:
        raise _fail(name, "cn", "names the subject of the CSR the agent makes: it needs keygen=")
    return spec


def _one_of(name: str, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(name, key, f"expected one of {', '.join(allowed)}")
    return value


def _perms(name: str, value: str | None) -> int:
    if value is None:
        return DEFAULT_PERMS
    if not _PERMS.match(value):
        raise _fail(name, "perms", "expected four octal digits starting with 0, e.g. 0400 or 0440")
    perms = int(value, 8)
    if perms & 0o022:
        raise _fail(name, "perms", "a credential file must not be group- or world-writable")
    if perms & 0o111:
        raise _fail(name, "perms", "a credential file must not be executable")
    return perms


def _ttl(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _fail(name, "ttl", str(exc)) from None
    if seconds < 1:
        raise _fail(name, "ttl", "expected at least 1s")
    return seconds


def _cn(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 64 or not _HOSTNAME.match(value):
        raise _fail(
            name, "cn", "expected a DNS name of at most 64 characters, e.g. api.workload.internal"
        )
    return value


def _signal(name: str, value: str | None) -> SignalTarget | None:
    if value is None:
        return None
    sig, sep, process = value.partition(":")
    if not sep or sig not in SIGNALS:
        raise _fail(
            name, "signal", f"expected SIGNAL:PROCESS with SIGNAL one of {', '.join(SIGNALS)}"
        )
    if not _COMM.match(process):
        raise _fail(
            name,
            "signal",
            "the process name is what /proc/PID/comm holds: 1-15 characters, no space, "
            "'/', ':', ',' or '=' (the kernel cuts longer names to 15)",
        )
    return SignalTarget(sig, process)


def _command(name: str, text: str) -> tuple[str, ...]:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_COMMAND_BYTES:
        raise _fail(name, "command", f"at most {MAX_COMMAND_BYTES} bytes")
    try:
        argv = json.loads(text)
    except ValueError:
        raise _fail(
            name,
            "command",
            'expected a JSON array of strings, e.g. ["nginx","-s","reload"] (it must be the '
            "last option: everything after command= is the array)",
        ) from None
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) and "\x00" not in a and _encodable(a) for a in argv)
    ):
        raise _fail(name, "command", "expected a non-empty JSON array of strings (an exec array)")
    if not argv[0]:
        raise _fail(name, "command", "the program (first element) is empty")
    if len(argv) > MAX_COMMAND_ARGS:
        raise _fail(name, "command", f"at most {MAX_COMMAND_ARGS} arguments")
    return tuple(argv)


def _encodable(text: str) -> bool:
    """No lone surrogate (``"\\ud800"`` in JSON): an argument exec cannot pass on."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_template(text: str) -> tuple[str, str]:
    """One ``--template NAME=TEXT``: (name, text), the text a valid ``string.Template``."""
    name, sep, body = text.partition("=")
    if not sep or not NAME.match(name):
        raise SpecError("--template: expected NAME=TEXT, NAME the credential's name")
    if len(body.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise _template_error(name, f"at most {MAX_TEMPLATE_BYTES} bytes")
    if not body:
        raise _template_error(name, "the template is empty")
    if not string.Template(body).is_valid():
        raise _template_error(
            name,
            "not a valid template: use ${key} or $key for a field of the credential's data "
            "and $$ for a literal $",
        )
    return name, body


def _template_error(name: str, problem: str) -> SpecError:
    return SpecError(f"--template {name}: {problem}", credential=name, option="template")


def build_specs(
    credentials: Iterable[str], templates: Iterable[str] = ()
) -> tuple[CredentialSpec, ...]:
    """Every ``--credential`` with its ``--template``; names and files unique, a template
    exactly for each ``format=template`` credential."""
    specs = [parse_credential(c) for c in credentials]
    if not specs:
        raise SpecError("--credential: give at least one NAME=ROLE")
    texts: dict[str, str] = {}
    for t in templates:
        name, text = parse_template(t)
        if name in texts:
            raise _template_error(name, "given twice")
        texts[name] = text
    seen: dict[str, str] = {}
    out: list[CredentialSpec] = []
    for spec in specs:
        if spec.name in {s.name for s in out}:
            raise _fail(spec.name, "NAME", "given twice")
        for f in spec.files():
            if f in seen:
                raise _fail(spec.name, "NAME", f"writes {f}, which credential {seen[f]} writes too")
            seen[f] = spec.name
        body = texts.pop(spec.name, None)
        if spec.format == "template":
            if body is None:
                raise _fail(spec.name, "format", f"template needs --template {spec.name}=TEXT")
            spec = replace(spec, template=body)
        elif body is not None:
            raise _template_error(spec.name, f"that credential's format is {spec.format}")
        out.append(spec)
    if texts:
        raise _template_error(sorted(texts)[0], "no --credential of that name")
    return tuple(out)
