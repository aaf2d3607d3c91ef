"""The one loader of the configuration: YAML (plus ``${ENV}`` references) into typed,
frozen ``Settings``.

Each domain owns its section's settings (``broker.vault.settings``,
``broker.identity.settings``, ``broker.engines.role``, ``broker.policy.settings``, …); this
module puts them together, checks what one section says about another (a rule's roles
exist, a role's engine has the sections it needs), and is the only place that reads the
environment. Nothing deeper in the broker reads the environment or a file for
configuration: every component receives the part of ``Settings`` it needs. A bad file
stops start-up with the path of the offending key and what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from broker.api.settings import AdminSettings
from broker.audit.settings import AuditSettings
from broker.aws.settings import AwsSettings
from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import ConfigError
from broker.events.settings import EventSettings
from broker.identity.settings import POD_UID_CLAIM, IdentitySettings
from broker.kubernetes.settings import KubernetesSettings
from broker.leases.settings import StoreSettings
from broker.policy.settings import PolicySettings
from broker.revocation.settings import ReconcileSettings, RevocationSettings
from broker.settings import NAME, Frozen
from broker.vault.settings import TOKEN_REUSE_MARGIN_S, VaultSettings

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
M = TypeVar("M", bound=BaseModel)


class ServerTlsSettings(Frozen):
    """The broker's serving certificate (PEM, with its chain) and key. The files are
    read at start (a pair that does not load stops it, naming the file) and again when
    they change, checked every ``reload_s``: new connections get the new certificate."""

    cert_file: Path
    key_file: Path
    reload_s: float = Field(10, ge=0.05, le=3600)


class ServerSettings(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8300, ge=0, le=65535)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # None: plain HTTP (loopback, or behind a proxy or mesh that terminates TLS).
    tls: ServerTlsSettings | None = None


class Settings(Frozen):
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    vault: VaultSettings
    identity: IdentitySettings
    roles: dict[str, RoleSettings] = Field(min_length=1)
    policy: PolicySettings = PolicySettings()
    admin: AdminSettings
    revocation: RevocationSettings = RevocationSettings()
    aws: AwsSettings | None = None  # needed by aws roles that deal with STS themselves
    reconcile: ReconcileSettings = ReconcileSettings()
    events: EventSettings = EventSettings()
    kubernetes: KubernetesSettings | None = None
    audit: AuditSettings = AuditSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _references(self) -> Settings:
        issuer_names = {i.name for i in self.identity.issuers}
        for name in self.roles:
            if not NAME.match(name):
                raise ValueError(f"role name {name!r}: expected lower-case letters, digits, _ or -")
        longest = max(r.max_ttl for r in self.roles.values())
        if longest + TOKEN_REUSE_MARGIN_S > self.vault.instance_token_ttl:
            raise ValueError(
                "vault.instance_token_ttl must exceed the longest role max_ttl "
                f"({longest}s) by at least {TOKEN_REUSE_MARGIN_S}s: a lease cannot outlive "
                "the instance token it was read with"
            )
        self._engine_needs()
        pod_uid_issuers = {
            i.name for i in self.identity.issuers if i.instance_claim == POD_UID_CLAIM
        }
        for idx, iss in enumerate(self.identity.issuers):
            if iss.liveness.check == "kubernetes" and self.kubernetes is None:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: kubernetes needs the "
                    "kubernetes section (the API server to ask)"
                )
            if iss.liveness.check == "kubernetes" and iss.name not in pod_uid_issuers:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: kubernetes compares the pod's "
                    "uid with the instance id, so instance_claim must be "
                    "[kubernetes.io, pod, uid]"
                )
            if iss.liveness.check == "aws_ec2" and self.aws is None:
                raise ValueError(
                    f"identity.issuers.{idx}.liveness.check: aws_ec2 needs the aws section"
                )
        if self.kubernetes is not None and self.kubernetes.watch and not self.kubernetes.issuer:
            raise ValueError(
                "kubernetes.issuer: required with watch: true (the issuer whose instances "
                "pods are; only its instances are terminated)"
            )
        if (
            self.kubernetes is not None
            and self.kubernetes.watch
            and self.kubernetes.issuer in issuer_names
            and self.kubernetes.issuer not in pod_uid_issuers
        ):
            raise ValueError(
                "kubernetes.issuer: the watch terminates instances by pod uid, so the "
                "issuer's instance_claim must be [kubernetes.io, pod, uid]"
            )
        for where, named in (
            ("events.sqs.issuer", self.events.sqs.issuer if self.events.sqs else None),
            ("kubernetes.issuer", self.kubernetes.issuer if self.kubernetes else None),
        ):
            if named is not None and named not in issuer_names:
                raise ValueError(f"{where}: unknown issuer {named!r}")
        self._operators_apart()
        for idx, rule in enumerate(self.policy.rules):
            for role in rule.allow:
                if role not in self.roles:
                    raise ValueError(f"policy.rules.{idx}.allow: unknown role {role!r}")
            if rule.issuer is not None and rule.issuer not in issuer_names:
                raise ValueError(f"policy.rules.{idx}.issuer: unknown issuer {rule.issuer!r}")
            if rule.issuer is None and len(issuer_names) > 1:
                # Workload names of different issuers can look alike (a namespace/sa and
                # an owner/repo): a rule must say whose tokens it is about.
                raise ValueError(
                    f"policy.rules.{idx}.issuer: required when more than one issuer is configured"
                )
        return self

    def _operators_apart(self) -> None:
        """An operator's token must never be a workload's: the operator issuer's audience is
        not the workloads' audience, and it is not one of the workload issuers (any of whose
        workloads could then ask it for a token with the admin audience)."""
        oidc = self.admin.oidc
        if oidc is None:
            return
        if oidc.audience == self.identity.audience:
            raise ValueError(
                "admin.oidc.audience: must differ from identity.audience (a workload's token "
                "must never pass as an operator's)"
            )
        url = oidc.issuer.rstrip("/")
        same = [i.name for i in self.identity.issuers if i.issuer.rstrip("/") == url]
        if same:
            raise ValueError(
                f"admin.oidc.issuer: is also the workload issuer {same[0]!r}; operators need "
                "an issuer of their own (its workloads could obtain operator tokens)"
            )

    def _engine_needs(self) -> None:
        for name, role in self.roles.items():
            wanted = ENGINES[role.engine].requires(role)
            if "aws" in wanted and self.aws is None:
                raise ValueError(
                    f"aws: role {name!r} exchanges tokens at AWS STS or denies its sessions "
                    "in IAM on termination; configure the aws section"
                )
            if "entity" in wanted and self.vault.entity_alias == "none":
                raise ValueError(
                    f"vault.entity_alias: role {name!r} reads an OIDC token from Vault's "
                    "identity engine, which needs the instance token to have an entity; "
                    "set entity_alias: workload"
                )


def _expand_env(node: Any, path: str, env: dict[str, str], missing: list[str]) -> Any:
    """``node`` with every ``${NAME}`` replaced; each reference to an unset variable is
    appended to ``missing`` (as ``path: environment variable NAME is not set``) and left
    as written, so one pass finds all of them."""
    if isinstance(node, dict):
        return {
            k: _expand_env(v, f"{path}.{k}" if path else str(k), env, missing)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_env(v, f"{path}.{i}", env, missing) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                missing.append(f"{path or '(top level)'}: environment variable {name} is not set")
                return m.group(0)
            return env[name]

        return _ENV_REF.sub(sub, node)
    return node


def _expand_all(data: dict[str, Any], source: str, env: dict[str, str] | None) -> dict[str, Any]:
    """``data`` with ``${ENV}`` references expanded from ``env`` (None: the process
    environment); ``ConfigError`` naming the file and every unset variable at once."""
    missing: list[str] = []
    expanded = _expand_env(data, "", dict(os.environ) if env is None else env, missing)
    if missing:
        count = "" if len(missing) == 1 else f"{len(missing)} "
        plural = "" if len(missing) == 1 else "s"
        lines = [f"{source}: {count}environment variable{plural} not set"]
        lines += [f"  {m}" for m in missing]
        raise ConfigError("\n".join(lines))
    assert isinstance(expanded, dict)
    return expanded


_LIST_TYPES = {"list_type", "tuple_type", "set_type", "frozen_set_type"}
_MAPPING_TYPES = {"dict_type", "model_type", "model_attributes_type"}


def _yaml_kind(value: Any) -> str:
    """What a YAML value is, in YAML's words (the value itself is never shown: it may be
    a secret put under the wrong key)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _message(err: Mapping[str, Any]) -> str:
    """Pydantic's message for one error, in the configuration file's terms where
    pydantic's are Python's ("a valid tuple", "a valid dictionary")."""
    kind = err["type"]
    if kind in _LIST_TYPES:
        got = _yaml_kind(err.get("input"))
        hint = " (one '- item' line per entry, or [a, b])" if got != "a mapping" else ""
        return f"expected a list, got {got}{hint}"
    if kind in _MAPPING_TYPES:
        return f"expected a mapping (key: value lines), got {_yaml_kind(err.get('input'))}"
    return str(err["msg"]).removeprefix("Value error, ")


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    errors = exc.errors()
    deeper = [tuple(e["loc"]) for e in errors]
    for err in errors:
        loc_t = tuple(err["loc"])
        if err["type"] == "too_short" and any(
            other[: len(loc_t)] == loc_t and other != loc_t for other in deeper
        ):
            continue  # a list came out short only because one of its items was refused
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"  {loc or '(top level)'}: {_message(err)}")
    return "\n".join(lines)


def load_settings(
    data: dict[str, Any], *, source: str = "config", env: dict[str, str] | None = None
) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    expanded = _expand_all(data, source, env)
    try:
        return Settings.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _repeated_keys(
    loader: yaml.SafeLoader, node: yaml.Node, path: str, walked: set[int]
) -> list[tuple[int, str]]:
    """(line, "key.path: given twice (lines a and b)") for every mapping under ``node``
    that names a key more than once; YAML itself would silently keep the last one."""
    if id(node) in walked:  # an alias: already looked at where its anchor is
        return []
    walked.add(id(node))
    found: list[tuple[int, str]] = []
    if isinstance(node, yaml.SequenceNode):
        for idx, item in enumerate(node.value):
            found += _repeated_keys(loader, item, f"{path}.{idx}", walked)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[Any, list[int]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<": keys merged in may be overridden, that is what it is for
            try:
                key = loader.construct_object(key_node, deep=True)
                hash(key)
            except (yaml.YAMLError, TypeError):
                key = (key_node.tag, repr(key_node.value))
            lines.setdefault(key, []).append(key_node.start_mark.line + 1)
            shown = f"{path}.{key}" if path else str(key)
            found += _repeated_keys(loader, value_node, shown, walked)
        for key, at in lines.items():
            if len(at) > 1:
                shown = f"{path}.{key}" if path else str(key)
                times = "twice" if len(at) == 2 else f"{len(at)} times"
                listed = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
                found.append((at[1], f"{shown}: given {times} (lines {listed})"))
    return found


def _parse_yaml(text: str, path: Path) -> Any:
    """The YAML document in ``text``; ``ConfigError`` listing every key given twice."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        repeated = sorted(_repeated_keys(loader, node, "", set()))
        if repeated:
            lines = [f"{path}: a key is given more than once (YAML would keep only the last)"]
            lines += [f"  {message}" for _, message in repeated]
            raise ConfigError("\n".join(lines))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = _parse_yaml(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_settings_file(path: str | Path, *, env: dict[str, str] | None = None) -> Settings:
    path = Path(path)
    return load_settings(_read_yaml(path), source=str(path), env=env)


def load_yaml_model(
    model: type[M],
    path: str | Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> M:
    """Another program's settings (``broker injector``) the same way as the broker's: a
    YAML file (none: the model's defaults), ``${ENV}`` references expanded, then top-level
    ``overrides`` (command-line flags, which win) before one validation, so a flag is
    checked exactly like the key it replaces."""
    source = "defaults" if path is None else str(path)
    data = {} if path is None else _read_yaml(Path(path))
    expanded = _expand_all(data, source, env)
    expanded.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
