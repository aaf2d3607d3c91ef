"""What a bad configuration file says: the exact text of the loader's error (the file, then
one line per problem with its key path and what was expected), for a table of typical
mistakes. Driven through ``load_settings_file``, the loader's entry point."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_settings_file
from tests.contract.golden import assert_golden

# A complete valid configuration (the dev one) that every case spoils in one place.
BASE_YAML = """\
server:
  host: 127.0.0.1
  port: 8300
store:
  url: sqlite:///broker.db
vault:
  addr: http://127.0.0.1:8200
  auth:
    method: token
    token: ${BROKER_TEST_VAULT_TOKEN}
  token_role: broker-instance
  instance_policies:
  - broker-instance
  instance_token_ttl: 24h
identity:
  audience: ephemeral-broker
  issuers:
  - name: dev
    issuer: https://issuer.example
    jwks_uri: https://issuer.example/jwks.json
    algorithms:
    - ES256
    instance_claim: instance_id
    workload_claim: workload
    leeway_s: 30
    max_token_lifetime: 1h
    replay: 'off'
    jwks_refresh_cooldown_s: 5
roles:
  dev-cert:
    engine: pki
    mount: pki
    vault_role: dev-cert
    default_ttl: 10m
    max_ttl: 1h
    params:
      common_name: '{workload}.workload.internal'
  dev-db:
    engine: database
    mount: database
    vault_role: dev-db
    default_ttl: 10m
    max_ttl: 1h
policy:
  rules:
  - name: dev-workloads
    issuer: dev
    match:
    - identity: workload
      regex: '[a-z0-9-]{1,63}'
    allow:
    - dev-cert
    - dev-db
admin:
  token_sha256: abababababababababababababababababababababababababababababababab
revocation:
  tick_s: 1.0
"""
ENV = {"BROKER_TEST_VAULT_TOKEN": "s.test-token-value"}


def put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = d
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = d
        for p in parents:
            node = node[p]
        del node[last]
    return mutate


def both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for m in mutations:
            m(d)
    return mutate


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown top-level key": put("bogus", 1),
    "unknown nested key": put("vault.bogus", 1),
    "wrong type": put("server.port", "eighty"),
    "port out of range": put("server.port", 70000),
    "bad duration (role max_ttl)": put("roles.dev-cert.max_ttl", "10x"),
    "bad duration (instance token ttl)": put("vault.instance_token_ttl", "1 day"),
    "default_ttl above max_ttl": put("roles.dev-cert.default_ttl", "2h"),
    "instance token shorter than a role": put("vault.instance_token_ttl", "30m"),
    "bad issuer name": put("identity.issuers.0.name", "Dev"),
    "bad jwks uri": put("identity.issuers.0.jwks_uri", "file:///etc/passwd"),
    "refused algorithm": put("identity.issuers.0.algorithms", ["ES256", "HS256"]),
    "unknown role engine": put("roles.dev-cert.engine", "nosuch"),
    "unknown engine param": put("roles.dev-cert.params.ttl", "1h"),
    "engine param missing": put("roles.dev-cert.params", {}),
    "unknown template field": put("roles.dev-cert.params.common_name", "{email}.x"),
    "rule allows unknown role": put("policy.rules.0.allow", ["dev-cert", "nope"]),
    "rule names unknown issuer": put("policy.rules.0.issuer", "other"),
    "rule regex does not compile": put("policy.rules.0.match.0.regex", "(unclosed"),
    "missing vault address": drop("vault.addr"),
    "missing vault section": drop("vault"),
    "vault address with a path": put("vault.addr", "http://127.0.0.1:8200/v1"),
    "non-TLS vault off loopback": put("vault.addr", "http://vault.internal:8200"),
    "unknown vault auth method": put("vault.auth.method", "ldap"),
    "store url scheme": put("store.url", "mysql://db"),
    "admin token instead of its hash": put("admin.token_sha256", "adm-plaintext-token"),
    "missing environment variable": put("vault.auth.token", "${BROKER_TEST_UNSET}"),
    "several missing environment variables": both(
        put("vault.auth.token", "${BROKER_TEST_UNSET}"),
        put("vault.addr", "https://${BROKER_TEST_HOST}:${BROKER_TEST_PORT}"),
        put("admin.token_sha256", "${BROKER_TEST_UNSET}")),
    "a string where a list is expected": put("vault.instance_policies", "broker-instance"),
    "a mapping where a list is expected": put("identity.issuers", {"name": "dev"}),
    "a string where a mapping is expected": put("server.tls", "on"),
    "audit file signer without a key": put("audit", {"checkpoint": {"signer": "file"}}),
    "audit unknown signer": put("audit", {"checkpoint": {"signer": "kms"}}),
    "audit checkpoint every zero": put("audit", {"checkpoint": {"every": "0s",
                                                                "every_events": 0}}),
    "audit transit key with a slash": put("audit", {"transit": {"key": "a/b"}}),
    "no operator at all": put("admin", {}),
    "operator name taken by token_sha256": put("admin.operators", [
        {"name": "admin", "token_sha256": "cd" * 32, "scope": "read"}]),
    "operator names repeated": both(drop("admin.token_sha256"), put("admin.operators", [
        {"name": "alice", "token_sha256": "cd" * 32, "scope": "read"},
        {"name": "alice", "token_sha256": "ef" * 32, "scope": "admin"}])),
    "operator hashes repeated": put("admin.operators", [
        {"name": "alice", "token_sha256": "ab" * 32, "scope": "read"}]),
    "operator name and scope": put("admin.operators", [
        {"name": "Alice Smith", "token_sha256": "cd" * 32, "scope": "root"}]),
    "operator issuer with workload keys": put("admin.oidc", {
        "issuer": "https://sso.example.org", "discovery": True, "audience": "brokerctl",
        "instance_claim": "sub", "scopes": [{"claim": "groups", "value": "sec",
                                             "scope": "read"}]}),
    "operator issuer without scopes or keys": put("admin.oidc", {
        "issuer": "https://sso.example.org", "audience": "brokerctl", "scopes": []}),
    "operator issuer with the workloads' audience": put("admin.oidc", {
        "issuer": "https://sso.example.org", "discovery": True,
        "audience": "ephemeral-broker",
        "scopes": [{"claim": "groups", "value": "sec", "scope": "read"}]}),
    "operator issuer that is a workload issuer": put("admin.oidc", {
        "issuer": "https://issuer.example/", "discovery": True, "audience": "brokerctl",
        "scopes": [{"claim": "groups", "value": "sec", "scope": "read"}]}),
    "several problems at once": both(put("server.port", "eighty"), drop("vault.addr"),
                                     put("roles.dev-db.max_ttl", "forever")),
}
RAW = {
    "not YAML": "server: [unclosed\n",
    "a key given twice": BASE_YAML.replace(
        "  token_role: broker-instance\n",
        "  token_role: broker-instance\n  addr: http://127.0.0.1:8201\n",
    ) + "revocation:\n  tick_s: 2.0\n",
    "empty file": "",
    "top level is a list": "- a\n- b\n",
}


def error_of(config: Path, text: str | None) -> list[str]:
    """The error's lines, its class first, the file's path masked."""
    if text is not None:
        config.write_text(text)
    with pytest.raises(Exception) as info:  # noqa: PT011 — the text is what is pinned
        load_settings_file(config, env=ENV)
    message = f"{type(info.value).__name__}: {info.value}".replace(str(config.parent), "<dir>")
    return message.splitlines()


def test_the_base_configuration_loads(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(BASE_YAML)
    load_settings_file(config, env=ENV)


def test_config_error_messages_are_unchanged(tmp_path: Path) -> None:
    base = yaml.safe_load(BASE_YAML)
    config = tmp_path / "broker.yaml"
    messages: dict[str, list[str]] = {}
    for name, mutate in MUTATIONS.items():
        data = copy.deepcopy(base)
        mutate(data)
        messages[name] = error_of(config, yaml.safe_dump(data, sort_keys=False))
    for name, text in RAW.items():
        messages[name] = error_of(config, text)
    messages["missing file"] = error_of(tmp_path / "absent.yaml", None)
    assert "s.test-token-value" not in repr(messages)
    assert_golden("config_errors.json", messages)
