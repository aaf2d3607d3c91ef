"""A credential as the files a workload reads, one function per ``format``. Pure.

Each returns ``{relative file name: bytes}`` for the credential's directory. A credential
that does not fit the format (no ``password`` for ``pgpass``, no certificate for ``pem``,
a template naming a field the data lacks) is a ``RenderError`` whose message names the
credential and the missing field, never a value.

- ``json``: the response's ``data``, as a JSON object.
- ``env``: ``KEY='value'`` lines, POSIX shell syntax (``set -a; . FILE; set +a``): keys
  upper-cased with every character outside ``[A-Z0-9_]`` made ``_``, values in single
  quotes (a quote inside written ``'\\''``), nested values as JSON.
- ``pem``: ``NAME.crt`` (the certificate), ``NAME.key`` (its private key: Vault's in
  ``issue`` mode, the agent's own with ``keygen``), ``NAME-ca.crt`` (the CA chain).
- ``pgpass``: ``*:*:*:USER:PASSWORD`` with ``:`` and ``\\`` escaped, for ``PGPASSFILE``.
- ``aws-credential-process``: the JSON an AWS SDK's ``credential_process`` prints
  (``Version`` 1, keys, ``Expiration``): ``credential_process = cat FILE``.
- ``template``: Python's ``string.Template`` over ``data`` (``${username}``): substitution
  only, no expressions, attribute access or loops, so a template cannot run anything.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.agent.spec import CredentialSpec


class RenderError(ValueError):
    """The credential cannot be written in the asked format; the message says why."""


@dataclass(frozen=True)
class Issued:
    """What the broker answered, as the renderers need it."""

    kind: str
    data: Mapping[str, Any]
    expires_at: datetime

    def __repr__(self) -> str:
        return f"Issued(kind={self.kind!r}, data=***)"


@dataclass(frozen=True)
class GeneratedKey:
    """A private key the agent made (``keygen``), as written to ``NAME.key``."""

    private: bytes  # PEM (PKCS#8) for a CSR, OpenSSH format for an SSH certificate

    def __repr__(self) -> str:
        return "GeneratedKey(***)"


Files = dict[str, bytes]


def render(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None = None) -> Files:
    """Every file of ``spec``'s credential. With a generated key, ``NAME.key`` holds it
    (and an SSH certificate goes to ``NAME.key-cert.pub``, where ssh looks for it)."""
    files = _FORMATS[spec.format](spec, issued, key)
    if key is not None:
        files[f"{spec.name}.key"] = key.private
        signed = issued.data.get("signed_key")
        if isinstance(signed, str):
            files[f"{spec.name}.key-cert.pub"] = _line(signed)
    return files


def _json(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    return {spec.name: (json.dumps(dict(issued.data), indent=2, sort_keys=True) + "\n").encode()}


_ENV_UNSAFE = re.compile(r"[^A-Z0-9_]")


def env_key(key: str) -> str:
    safe = _ENV_UNSAFE.sub("_", key.upper())
    return f"_{safe}" if not safe or safe[0].isdigit() else safe


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True)


def _env(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    lines: dict[str, str] = {}
    for name in sorted(issued.data):
        k = env_key(str(name))
        if k in lines:
            raise RenderError(
                f"credential {spec.name}: fields {name!r} and another both become {k} in env format"
            )
        value = _scalar(issued.data[name]).replace("'", "'\\''")
        lines[k] = f"{k}='{value}'\n"
    return {spec.name: "".join(lines.values()).encode()}


def _need(spec: CredentialSpec, issued: Issued, field: str) -> str:
    value = issued.data.get(field)
    if not isinstance(value, str) or not value:
        raise RenderError(
            f"credential {spec.name}: format {spec.format} needs the field {field!r}, which a "
            f"{issued.kind} credential does not have (it has: {', '.join(sorted(issued.data))})"
        )
    return value


def _line(text: str) -> bytes:
    return (text.strip() + "\n").encode()


def _pem(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    cert = _need(spec, issued, "certificate")
    files = {f"{spec.name}.crt": _line(cert)}
    private = issued.data.get("private_key")
    if isinstance(private, str) and private:
        files[f"{spec.name}.key"] = _line(private)
    elif key is None:
        raise RenderError(
            f"credential {spec.name}: the answer has no private key; for a sign-mode role "
            "set keygen= so that the agent makes one"
        )
    chain = issued.data.get("ca_chain")
    if isinstance(chain, list) and chain and all(isinstance(c, str) for c in chain):
        files[f"{spec.name}-ca.crt"] = b"".join(_line(c) for c in chain)
    else:
        files[f"{spec.name}-ca.crt"] = _line(_need(spec, issued, "issuing_ca"))
    return files


def pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _pgpass(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    user, password = _need(spec, issued, "username"), _need(spec, issued, "password")
    if any(c in v for v in (user, password) for c in "\r\n"):
        raise RenderError(
            f"credential {spec.name}: a line break cannot be written to a pgpass file"
        )
    return {spec.name: f"*:*:*:{pgpass_field(user)}:{pgpass_field(password)}\n".encode()}


def aws_time(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aws(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    out: dict[str, Any] = {
        "Version": 1,
        "AccessKeyId": _need(spec, issued, "AccessKeyId"),
        "SecretAccessKey": _need(spec, issued, "SecretAccessKey"),
    }
    token = issued.data.get("SessionToken")
    if isinstance(token, str) and token:
        out["SessionToken"] = token
    expiration = issued.data.get("Expiration")
    out["Expiration"] = (
        expiration if isinstance(expiration, str) and expiration else aws_time(issued.expires_at)
    )
    return {spec.name: (json.dumps(out, indent=2) + "\n").encode()}


def _template(spec: CredentialSpec, issued: Issued, key: GeneratedKey | None) -> Files:
    if spec.template is None:
        raise RenderError(f"credential {spec.name}: format template needs --template")
    values = {str(k): _scalar(v) for k, v in issued.data.items()}
    try:
        text = string.Template(spec.template).substitute(values)
    except KeyError as exc:
        raise RenderError(
            f"credential {spec.name}: the template uses ${{{exc.args[0]}}}, which a "
            f"{issued.kind} credential does not have (it has: {', '.join(sorted(values))})"
        ) from None
    except ValueError:
        raise RenderError(f"credential {spec.name}: the template is not valid") from None
    return {spec.name: text.encode()}


_FORMATS: dict[str, Callable[[CredentialSpec, Issued, GeneratedKey | None], Files]] = {
    "json": _json,
    "env": _env,
    "pem": _pem,
    "pgpass": _pgpass,
    "aws-credential-process": _aws,
    "template": _template,
}
