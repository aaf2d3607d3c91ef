"""Settings loading: the dev dict loads; each bad config names the key path and what was
expected; ``${VAR}`` expansion; YAML file errors; frozen settings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from broker.config import Settings, load_settings, load_settings_file
from broker.dev.environment import dev_settings_dict
from broker.engines import ENGINES
from broker.errors import ConfigError
from broker.identity.model import Identity
from broker.identity.settings import ALLOWED_ALGORITHMS
from broker.policy.templates import render_params

ADMIN_SHA = "ab" * 32
BROKER_TOKEN = "s.brokerTokenValue1234567890"


def base() -> dict[str, Any]:
    return dev_settings_dict(
        vault_addr="http://127.0.0.1:8200", broker_token=BROKER_TOKEN,
        issuer="https://issuer.example", jwks_uri="https://issuer.example/jwks.json",
        store_url="sqlite:///broker.db", admin_token_sha256=ADMIN_SHA, with_database=True)


def errors_of(data: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(data, **kw)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{kw.get('source', 'config')}: invalid configuration"
    return lines[1:]


# ---------------------------------------------------------------------------------------------
# the valid dev configuration
# ---------------------------------------------------------------------------------------------

def test_dev_settings_dict_loads() -> None:
    s = load_settings(base())
    assert isinstance(s, Settings)
    assert s.vault.addr == "http://127.0.0.1:8200"
    assert s.vault.auth.method == "token"
    assert s.vault.auth.token.get_secret_value() == BROKER_TOKEN
    assert s.vault.instance_token_ttl == 86400
    assert s.vault.instance_policies == ("broker-instance",)
    iss = s.identity.issuers[0]
    assert (iss.name, iss.issuer, iss.algorithms, iss.instance_claim, iss.workload_claim,
            iss.leeway_s, iss.max_token_lifetime) == (
        "dev", "https://issuer.example", ("ES256",), ("instance_id",), ("workload",), 30, 3600)
    assert sorted(s.roles) == ["dev-cert", "dev-db"]
    cert = s.roles["dev-cert"]
    assert (cert.engine, cert.mount, cert.vault_role, cert.default_ttl, cert.max_ttl,
            cert.params) == ("pki", "pki", "dev-cert", 600, 3600,
                             {"common_name": "{workload}.workload.internal"})
    assert s.roles["dev-db"].params == {}
    (r,) = s.policy.rules
    assert (r.name, r.issuer, r.allow, r.max_ttl) == ("dev-workloads", "dev",
                                                      ("dev-cert", "dev-db"), None)
    (m,) = r.match
    assert (m.identity, m.claim, m.regex, m.exact, m.glob, m.one_of) == (
        "workload", None, "[a-z0-9-]{1,63}", None, None, None)
    assert s.admin.token_sha256 == ADMIN_SHA
    assert s.revocation.tick_s == 1.0
    assert s.log_level == "info"


def test_secret_values_not_in_repr() -> None:
    s = load_settings(base())
    assert BROKER_TOKEN not in repr(s)
    assert BROKER_TOKEN not in str(s)


NORMALISE_CASES = [
    (lambda d: d["vault"].__setitem__("addr", "https://vault.example:8200/"),
     lambda s: s.vault.addr, "https://vault.example:8200", "addr-trailing-slash-stripped"),
    (lambda d: d["admin"].__setitem__("token_sha256", " " + "AB" * 32 + "\n"),
     lambda s: s.admin.token_sha256, ADMIN_SHA, "admin-sha-stripped-lowercased"),
    (lambda d: d["roles"]["dev-cert"].update(default_ttl=90, max_ttl="1h30m"),
     lambda s: (s.roles["dev-cert"].default_ttl, s.roles["dev-cert"].max_ttl), (90, 5400),
     "durations-parsed"),
    (lambda d: d["identity"]["issuers"][0].__setitem__("workload_claim",
                                                       ["kubernetes.io", "namespace"]),
     lambda s: s.identity.issuers[0].workload_claim, ("kubernetes.io", "namespace"),
     "claim-path-list"),
    (lambda d: d["policy"]["rules"][0].__setitem__("max_ttl", "5m"),
     lambda s: s.policy.rules[0].max_ttl, 300, "rule-max-ttl-parsed"),
    (lambda d: d["vault"].__setitem__("auth", {"method": "approle", "role_id": "rid",
                                               "secret_id": "sid"}),
     lambda s: (s.vault.auth.method, s.vault.auth.role_id,
                s.vault.auth.secret_id.get_secret_value(), s.vault.auth.mount),
     ("approle", "rid", "sid", "approle"), "approle-auth"),
    (lambda d: d["vault"].__setitem__("auth", {"method": "kubernetes", "role": "broker"}),
     lambda s: (s.vault.auth.method, s.vault.auth.role, s.vault.auth.mount,
                s.vault.auth.token_path),
     ("kubernetes", "broker", "kubernetes",
      Path("/var/run/secrets/kubernetes.io/serviceaccount/token")), "kubernetes-auth-defaults"),
    (lambda d: d["vault"].__setitem__("auth", {"method": "jwt", "role": "broker",
                                               "mount": "jwt-k8s", "token_path": "/t/vault"}),
     lambda s: (s.vault.auth.method, s.vault.auth.role, s.vault.auth.mount,
                s.vault.auth.token_path),
     ("jwt", "broker", "jwt-k8s", Path("/t/vault")), "jwt-auth"),
    (lambda d: d["policy"].__setitem__("rules", []),
     lambda s: s.policy.rules, (), "no-rules-is-valid"),
    (lambda d: None, lambda s: s.server.tls, None, "plain-http-by-default"),
    (lambda d: d["server"].__setitem__("tls", {"cert_file": "/tls/tls.crt",
                                               "key_file": "/tls/tls.key"}),
     lambda s: (s.server.tls.cert_file, s.server.tls.key_file, s.server.tls.reload_s),
     (Path("/tls/tls.crt"), Path("/tls/tls.key"), 10), "server-tls-reloads-every-10s"),
]


@pytest.mark.parametrize(("mutate", "get", "expected"),
                         [(a, b, c) for a, b, c, _ in NORMALISE_CASES],
                         ids=[i for *_, i in NORMALISE_CASES])
def test_valid_variants(mutate: Callable[[dict[str, Any]], Any],
                        get: Callable[[Settings], Any], expected: Any) -> None:
    data = base()
    mutate(data)
    assert get(load_settings(data)) == expected


# ---------------------------------------------------------------------------------------------
# bad configurations: each names the key path and the expectation
# ---------------------------------------------------------------------------------------------

def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return mutate


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node = d
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return mutate


def _rename_role(d: dict[str, Any]) -> None:
    d["roles"]["Dev_Cert"] = d["roles"].pop("dev-cert")
    d["policy"]["rules"][0]["allow"] = ["Dev_Cert"]


def _dup_issuer(d: dict[str, Any]) -> None:
    d["identity"]["issuers"].append(dict(d["identity"]["issuers"][0], issuer="https://other"))


ALG_LIST = ", ".join(ALLOWED_ALGORITHMS)

BAD_CASES: list[tuple[Callable[[dict[str, Any]], None], str, str]] = [
    # server
    (_set(["server", "tls"], {"cert_file": "/tls/tls.crt"}),
     "server.tls.key_file: Field required", "server-tls-without-key"),
    (_set(["server", "tls"], {"key_file": "/tls/tls.key"}),
     "server.tls.cert_file: Field required", "server-tls-without-certificate"),
    (_set(["server", "tls"], {"cert_file": "/a", "key_file": "/b", "reload_s": 0}),
     "server.tls.reload_s: Input should be greater than or equal to 0.05",
     "server-tls-reload-zero"),
    (_set(["server", "tls"], {"cert_file": "/a", "key_file": "/b", "ca_file": "/c"}),
     "server.tls.ca_file: Extra inputs are not permitted", "server-tls-unknown-key"),
    (_set(["server", "tls"], True), "server.tls: expected a mapping (key: value lines), "
     "got a boolean", "server-tls-not-a-section"),
    # vault
    (_set(["vault", "addr"], "http://127.0.0.1:8200/v1"),
     "vault.addr: expected http(s)://host:port with no path", "vault-addr-with-path"),
    (_set(["vault", "addr"], "127.0.0.1:8200"),
     "vault.addr: expected http(s)://host:port with no path", "vault-addr-no-scheme"),
    (_set(["vault", "addr"], "ftp://vault:8200"),
     "vault.addr: expected http(s)://host:port with no path", "vault-addr-ftp"),
    (_del(["vault", "auth", "token"]), "vault.auth.token.token: Field required",
     "vault-auth-token-missing"),
    (_set(["vault", "auth", "method"], "ldap"), "vault.auth: Input tag 'ldap' found using "
     "'method' does not match any of the expected tags: 'token', 'approle', 'kubernetes', "
     "'jwt'", "vault-auth-unknown-method"),
    (_set(["vault", "auth"], {"method": "jwt", "role": "broker"}),
     "vault.auth.jwt.token_path: Field required", "vault-auth-jwt-token-path-missing"),
    (_set(["vault", "auth"], {"method": "kubernetes", "role": "a/b"}),
     "vault.auth.kubernetes.role: expected a Vault name (letters, digits, _ . -; no '/')",
     "vault-auth-kubernetes-role-slash"),
    (_set(["vault", "token_role"], "a/b"),
     "vault.token_role: expected a Vault token role name (letters, digits, _ . -)",
     "vault-token-role-slash"),
    (_set(["vault", "bogus"], 1), "vault.bogus: Extra inputs are not permitted",
     "vault-unknown-key"),
    (_del(["vault"]), "vault: Field required", "vault-missing"),
    (_set(["vault", "instance_token_ttl"], "30m"),
     "(top level): vault.instance_token_ttl must exceed the longest role max_ttl "
     "(3600s) by at least 60s: a lease cannot outlive the instance token it was read with",
     "instance-token-ttl-shorter-than-role-max"),
    (_set(["vault", "instance_token_ttl"], "1h"),
     "(top level): vault.instance_token_ttl must exceed the longest role max_ttl "
     "(3600s) by at least 60s: a lease cannot outlive the instance token it was read with",
     "instance-token-ttl-equal-to-role-max"),
    (_set(["vault", "addr"], "http://vault.internal:8200"),
     "vault.addr: expected https:// (plain http is allowed only to a loopback address)",
     "vault-plain-http-off-loopback"),
    (_set(["identity", "issuers", 0, "jwks_uri"], "http://idp.example/jwks"),
     "identity.issuers.0.jwks_uri: expected https:// (plain http is allowed only to a "
     "loopback address)", "jwks-plain-http-off-loopback"),
    (_set(["vault", "instance_token_ttl"], "1 day"),
     "vault.instance_token_ttl: expected a duration like '10m', '1h30m' or a number of "
     "seconds, got '1 day'", "instance-token-ttl-unparseable"),
    # identity
    (_set(["identity", "issuers", 0, "algorithms"], ["ES256", "HS256"]),
     f"identity.issuers.0.algorithms: expected a non-empty list from {ALG_LIST}; "
     "refused: HS256", "algorithms-hs256"),
    (_set(["identity", "issuers", 0, "algorithms"], ["none"]),
     f"identity.issuers.0.algorithms: expected a non-empty list from {ALG_LIST}; "
     "refused: none", "algorithms-none"),
    (_set(["identity", "issuers", 0, "algorithms"], ["HS256", "none", "RS256"]),
     f"identity.issuers.0.algorithms: expected a non-empty list from {ALG_LIST}; "
     "refused: HS256, none", "algorithms-several-refused"),
    (_set(["identity", "issuers", 0, "algorithms"], []),
     f"identity.issuers.0.algorithms: expected a non-empty list from {ALG_LIST}; "
     "refused: empty list", "algorithms-empty"),
    (_set(["identity", "issuers", 0, "leeway_s"], 61),
     "identity.issuers.0.leeway_s: Input should be less than or equal to 60", "leeway-61"),
    (_set(["identity", "issuers", 0, "leeway_s"], -1),
     "identity.issuers.0.leeway_s: Input should be greater than or equal to 0",
     "leeway-negative"),
    (_set(["identity", "issuers", 0, "name"], "Dev"),
     "identity.issuers.0.name: expected lower-case letters, digits, _ or -",
     "issuer-name-uppercase"),
    (_set(["identity", "issuers", 0, "jwks_uri"], "file:///etc/passwd"),
     "identity.issuers.0.jwks_uri: expected an http(s) URL", "jwks-uri-file"),
    (_set(["identity", "issuers", 0, "workload_claim"], []),
     "identity.issuers.0.workload_claim: expected a claim name or a list of nested claim "
     "names", "workload-claim-empty"),
    (_dup_issuer, "identity: issuer names must be unique", "issuer-names-duplicate"),
    (_set(["identity", "audience"], ""),
     "identity.audience: String should have at least 1 character", "audience-empty"),
    # top level
    (_set(["bogus"], 1), "bogus: Extra inputs are not permitted", "unknown-top-level-key"),
    (_set(["log_level"], "trace"),
     "log_level: Input should be 'debug', 'info', 'warning' or 'error'", "log-level"),
    (_set(["server", "port"], 70000), "server.port: Input should be less than or equal to "
     "65535", "server-port"),
    (_set(["store", "url"], "mysql://db"),
     "store.url: unsupported scheme 'mysql': the lease store is SQLite or PostgreSQL "
     "(sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)", "store-url-scheme"),
    # roles
    (_set(["roles"], {}), "roles: Dictionary should have at least 1 item after validation, "
     "not 0", "roles-empty"),
    (_set(["roles", "dev-cert", "engine"], "nosuch"),
     f"roles.dev-cert: engine: expected one of {', '.join(sorted(ENGINES))}",
     "role-engine-unknown"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{email}.x"),
     "roles.dev-cert: params.common_name: unknown template field(s) ['email']; "
     "use ['instance_id', 'issuer_name', 'workload']", "template-unknown-field"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload.__class__}.x"),
     "roles.dev-cert: params.common_name: template field {workload.__class__} must be a "
     "plain name like {workload}", "template-attribute-access"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload[0]}.x"),
     "roles.dev-cert: params.common_name: template field {workload[0]} must be a "
     "plain name like {workload}", "template-index-access"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{}.x"),
     "roles.dev-cert: params.common_name: template field {} must be a plain name like "
     "{workload}", "template-positional"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{0}.x"),
     "roles.dev-cert: params.common_name: template field {0} must be a plain name like "
     "{workload}", "template-numbered-positional"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload!r}.x"),
     "roles.dev-cert: params.common_name: template field {workload} must be a plain name "
     "like {workload}", "template-conversion"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload:>80}.x"),
     "roles.dev-cert: params.common_name: template field {workload} must be a plain name "
     "like {workload}", "template-format-spec"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload.x"),
     "roles.dev-cert: params.common_name: malformed template (unbalanced braces)",
     "template-malformed"),
    (_set(["roles", "dev-cert", "params", "common_name"], "{workload}}.x"),
     "roles.dev-cert: params.common_name: malformed template (unbalanced braces)",
     "template-stray-closing-brace"),
    (_set(["roles", "dev-cert", "params", "ttl"], "1h"),
     "roles.dev-cert: params: engine pki takes no ttl "
     "(allowed: alt_names, common_name, uri_sans)",
     "pki-param-not-taken"),
    (_set(["roles", "dev-db", "params"], {"common_name": "x"}),
     "roles.dev-db: params: engine database takes no common_name (allowed: none)",
     "database-takes-no-params"),
    (_set(["roles", "dev-cert", "params"], {}),
     "roles.dev-cert: params: engine pki needs common_name", "pki-without-common-name"),
    (_set(["roles", "dev-cert", "default_ttl"], "2h"),
     "roles.dev-cert: default_ttl must not exceed max_ttl", "default-ttl-above-max-ttl"),
    (_set(["roles", "dev-cert", "max_ttl"], 0),
     "roles.dev-cert: max_ttl must be at least 1s", "max-ttl-zero"),
    (_set(["roles", "dev-cert", "max_ttl"], "10x"),
     "roles.dev-cert.max_ttl: expected a duration like '10m', '1h30m' or a number of "
     "seconds, got '10x'", "max-ttl-unparseable"),
    (_set(["roles", "dev-cert", "mount"], "pk..i"),
     "roles.dev-cert.mount: expected one Vault path segment (letters, digits, _ . -)",
     "mount-dotdot"),
    (_set(["roles", "dev-cert", "vault_role"], "a/b"),
     "roles.dev-cert.vault_role: expected one Vault path segment (letters, digits, _ . -)",
     "vault-role-slash"),
    (_rename_role,
     "(top level): role name 'Dev_Cert': expected lower-case letters, digits, _ or -",
     "role-name-uppercase"),
    # policy
    (_set(["policy", "rules", 0, "allow"], ["dev-cert", "nope"]),
     "(top level): policy.rules.0.allow: unknown role 'nope'", "rule-allows-unknown-role"),
    (_set(["policy", "rules", 0, "issuer"], "other"),
     "(top level): policy.rules.0.issuer: unknown issuer 'other'", "rule-unknown-issuer"),
    (_set(["policy", "rules", 0, "allow"], []),
     "policy.rules.0.allow: Tuple should have at least 1 item after validation, not 0",
     "rule-allow-empty"),
    (_set(["policy", "rules", 0, "max_ttl"], 0),
     "policy.rules.0.max_ttl: Input should be greater than or equal to 1", "rule-max-ttl-zero"),
    (_set(["policy", "rules", 0, "max_ttl"], "0s"),
     "policy.rules.0.max_ttl: Input should be greater than or equal to 1",
     "rule-max-ttl-zero-duration"),
    (_set(["policy", "rules", 0, "match"], [{"identity": "workload", "exact": "a",
                                               "glob": "a*"}]),
     "policy.rules.0.match.0: set exactly one of 'exact', 'glob', 'regex', 'one_of'",
     "claim-match-two-operators"),
    (_set(["policy", "rules", 0, "match"], [{"identity": "workload"}]),
     "policy.rules.0.match.0: set exactly one of 'exact', 'glob', 'regex', 'one_of'",
     "claim-match-no-operator"),
    (_set(["policy", "rules", 0, "match"], [{"identity": "workload", "claim": "sub",
                                               "exact": "a"}]),
     "policy.rules.0.match.0: set exactly one of 'claim' or 'identity'",
     "claim-match-claim-and-identity"),
    (_set(["policy", "rules", 0, "match"], [{"exact": "a"}]),
     "policy.rules.0.match.0: set exactly one of 'claim' or 'identity'",
     "claim-match-no-subject"),
    (_set(["policy", "rules", 0, "match"], [{"identity": "email", "exact": "a"}]),
     "policy.rules.0.match.0.identity: Input should be 'instance_id', 'workload' or "
     "'subject'", "claim-match-unknown-identity-field"),
    (_set(["policy", "rules", 0, "match"], [{"identity": "workload", "regex": "(unclosed"}]),
     "policy.rules.0.match.0.regex: regex does not compile: missing ), unterminated "
     "subpattern at position 0", "regex-does-not-compile"),
    (_set(["policy", "rules", 0, "match"], [{"claim": [], "exact": "a"}]),
     "policy.rules.0.match.0.claim: expected a claim name or a list of nested claim names",
     "claim-path-empty"),
    # admin
    (_set(["admin", "token_sha256"], "a" * 63),
     "admin.token_sha256: expected the hex SHA-256 of the admin token (64 hex digits)",
     "admin-sha-63-digits"),
    (_set(["admin", "token_sha256"], "g" * 64),
     "admin.token_sha256: expected the hex SHA-256 of the admin token (64 hex digits)",
     "admin-sha-not-hex"),
    (_set(["admin", "token_sha256"], "a" * 65),
     "admin.token_sha256: expected the hex SHA-256 of the admin token (64 hex digits)",
     "admin-sha-65-digits"),
    (_set(["admin", "token_sha256"], "adm-plaintext-token"),
     "admin.token_sha256: expected the hex SHA-256 of the admin token (64 hex digits)",
     "admin-plaintext-token"),
]


@pytest.mark.parametrize(("mutate", "expected_line"), [(m, e) for m, e, _ in BAD_CASES],
                         ids=[i for *_, i in BAD_CASES])
def test_bad_config_names_key_and_expectation(mutate: Callable[[dict[str, Any]], None],
                                              expected_line: str) -> None:
    data = base()
    mutate(data)
    lines = errors_of(data)
    assert f"  {expected_line}" in lines, lines


def test_error_source_is_named() -> None:
    data = base()
    data["log_level"] = "loud"
    lines = errors_of(data, source="/etc/broker.yaml")
    assert lines == ["  log_level: Input should be 'debug', 'info', 'warning' or 'error'"]


def test_every_error_is_listed() -> None:
    data = base()
    data["vault"]["addr"] = "http://vault/v1"
    data["admin"]["token_sha256"] = "x"
    data["bogus"] = True
    lines = errors_of(data)
    assert sorted(lines) == sorted([
        "  vault.addr: expected http(s)://host:port with no path",
        "  admin.token_sha256: expected the hex SHA-256 of the admin token (64 hex digits)",
        "  bogus: Extra inputs are not permitted",
    ])


def test_error_message_does_not_leak_secret() -> None:
    data = base()
    data["vault"]["addr"] = "not a url"
    with pytest.raises(ConfigError) as info:
        load_settings(data)
    assert BROKER_TOKEN not in str(info.value)


def test_top_level_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(["not", "a", "mapping"], source="x.yaml")  # type: ignore[arg-type]
    assert str(info.value) == "x.yaml: expected a mapping at the top level"


# Regression guard: _VAULT_SEGMENT once ended in '$' (used with .match()), so 'pki\n' was
# accepted and kept verbatim (a newline inside a Vault path).
@pytest.mark.parametrize(
    ("path", "expected_line"),
    [(["roles", "dev-cert", "mount"],
      "roles.dev-cert.mount: expected one Vault path segment (letters, digits, _ . -)"),
     (["roles", "dev-cert", "vault_role"],
      "roles.dev-cert.vault_role: expected one Vault path segment (letters, digits, _ . -)"),
     (["vault", "token_role"],
      "vault.token_role: expected a Vault token role name (letters, digits, _ . -)")],
    ids=["mount", "vault-role", "token-role"],
)
def test_vault_segment_with_trailing_newline_refused(path: list[str],
                                                     expected_line: str) -> None:
    data = base()
    node: Any = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = node[path[-1]] + "\n"
    assert f"  {expected_line}" in errors_of(data)


def test_vault_addr_with_trailing_newline_refused() -> None:
    data = base()
    data["vault"]["addr"] = "http://127.0.0.1:8200\n"
    assert "  vault.addr: expected http(s)://host:port with no path" in errors_of(data)


# Regression guard: RoleSettings once checked only the field *names* of a template, so
# '{workload!r}' / '{workload:>80}' loaded fine and then failed every request (HTTP 500).
@pytest.mark.parametrize("template", ["{workload!r}.x", "{workload:>80}.x"],
                         ids=["conversion", "format-spec"])
def test_template_that_cannot_render_is_refused_at_load(template: str) -> None:
    data = base()
    data["roles"]["dev-cert"]["params"]["common_name"] = template
    try:
        settings = load_settings(data)
    except ConfigError as exc:
        assert "roles.dev-cert" in str(exc)
        return
    # Loaded: then it must at least render for a perfectly ordinary identity.
    ident = Identity(issuer_name="dev", issuer="https://issuer.example", subject="payments",
                     instance_id="i-1", workload="payments",
                     issued_at=datetime(2024, 1, 1, tzinfo=UTC),
                     expires_at=datetime(2024, 1, 1, 1, tzinfo=UTC), claims={})
    render_params(settings.roles["dev-cert"].params, ident)


# ---------------------------------------------------------------------------------------------
# ${VAR} expansion
# ---------------------------------------------------------------------------------------------

ENV_CASES = [
    (["vault", "auth", "token"], "${BROKER_TOKEN}", {"BROKER_TOKEN": "s.fromEnv"},
     lambda s: s.vault.auth.token.get_secret_value(), "s.fromEnv", "whole-value"),
    (["vault", "addr"], "https://${VAULT_HOST}:${VAULT_PORT}",
     {"VAULT_HOST": "vault.internal", "VAULT_PORT": "8200"},
     lambda s: s.vault.addr, "https://vault.internal:8200", "two-refs-in-one-value"),
    (["identity", "issuers", 0, "jwks_uri"], "${JWKS}", {"JWKS": "https://idp/jwks"},
     lambda s: s.identity.issuers[0].jwks_uri, "https://idp/jwks", "inside-list"),
    (["vault", "auth", "token"], "${OUTER}", {"OUTER": "${INNER}", "INNER": "nope"},
     lambda s: s.vault.auth.token.get_secret_value(), "${INNER}", "not-re-expanded"),
    (["vault", "auth", "token"], "$BROKER_TOKEN", {"BROKER_TOKEN": "x"},
     lambda s: s.vault.auth.token.get_secret_value(), "$BROKER_TOKEN", "no-braces-literal"),
    (["vault", "auth", "token"], "${EMPTY}", {"EMPTY": ""},
     lambda s: s.vault.auth.token.get_secret_value(), "", "empty-variable"),
]


@pytest.mark.parametrize(("path", "raw", "env", "get", "expected"),
                         [c[:5] for c in ENV_CASES], ids=[c[5] for c in ENV_CASES])
def test_env_expansion(path: list[Any], raw: str, env: dict[str, str],
                       get: Callable[[Settings], Any], expected: Any) -> None:
    data = base()
    _set(path, raw)(data)
    assert get(load_settings(data, env=env)) == expected


MISSING_ENV_CASES = [
    (["vault", "auth", "token"], "${NOPE}",
     "vault.auth.token: environment variable NOPE is not set", "nested-key"),
    (["identity", "issuers", 0, "jwks_uri"], "https://${NOPE}/jwks",
     "identity.issuers.0.jwks_uri: environment variable NOPE is not set", "list-index"),
    (["log_level"], "${NOPE}", "log_level: environment variable NOPE is not set", "top-level"),
]


@pytest.mark.parametrize(("path", "raw", "message"), [c[:3] for c in MISSING_ENV_CASES],
                         ids=[c[3] for c in MISSING_ENV_CASES])
def test_missing_env_variable_names_key_path(path: list[Any], raw: str, message: str) -> None:
    data = base()
    _set(path, raw)(data)
    with pytest.raises(ConfigError) as info:
        load_settings(data, env={}, source="broker.yaml")
    assert str(info.value).splitlines() == [
        "broker.yaml: environment variable not set", f"  {message}"]


def test_every_missing_env_variable_is_reported_at_once() -> None:
    """Not the first only: an operator fixes the environment once, not once per run."""
    data = base()
    data["vault"]["auth"]["token"] = "${A}"
    data["vault"]["addr"] = "https://${HOST}:${PORT}"
    data["identity"]["issuers"][0]["jwks_uri"] = "${A}"
    with pytest.raises(ConfigError) as info:
        load_settings(data, env={"PORT": "8200"}, source="broker.yaml")
    assert str(info.value).splitlines() == [
        "broker.yaml: 3 environment variables not set",
        "  vault.addr: environment variable HOST is not set",
        "  vault.auth.token: environment variable A is not set",
        "  identity.issuers.0.jwks_uri: environment variable A is not set",
    ]


def test_explicit_env_replaces_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_TEST_TOKEN", "s.fromProcess")
    data = base()
    data["vault"]["auth"]["token"] = "${BROKER_TEST_TOKEN}"
    with pytest.raises(ConfigError, match="vault.auth.token: environment variable "
                                          "BROKER_TEST_TOKEN is not set"):
        load_settings(data, env={})
    assert load_settings(data).vault.auth.token.get_secret_value() == "s.fromProcess"


def test_expanded_value_is_still_validated() -> None:
    data = base()
    data["vault"]["addr"] = "${ADDR}"
    lines = errors_of(data, env={"ADDR": "http://vault:8200/v1/sys"})
    assert lines == ["  vault.addr: expected http(s)://host:port with no path"]


def test_input_dict_not_mutated_by_expansion() -> None:
    data = base()
    data["vault"]["auth"]["token"] = "${T}"
    before = copy.deepcopy(data)
    load_settings(data, env={"T": "s.x"})
    assert data == before


# ---------------------------------------------------------------------------------------------
# load_settings_file
# ---------------------------------------------------------------------------------------------

def test_load_settings_file_valid(tmp_path: Path) -> None:
    data = base()
    data["vault"]["auth"]["token"] = "${TOKEN}"
    p = tmp_path / "broker.yaml"
    p.write_text(yaml.safe_dump(data))
    s = load_settings_file(p, env={"TOKEN": "s.fileToken"})
    assert s.vault.auth.token.get_secret_value() == "s.fileToken"
    assert s == load_settings(base() | {"vault": data["vault"] | {
        "auth": {"method": "token", "token": "s.fileToken"}}})


YAML_CASES = [
    ("server:\n  host: x\n  port: [1, 2\nvault: 3\n", "line 4, column 6", "unclosed-flow"),
    ("server:\n  host: x\n bad: 1\n", "line 3, column 2", "bad-indentation"),
    ("a: b: c\n", "line 1, column 5", "mapping-in-value"),
    ("log_level: info\nkey: 'unterminated\n", "line 3, column 1", "unterminated-quote"),
    ("\tserver: 1\n", "line 1, column 1", "tab-indent"),
]


@pytest.mark.parametrize(("text", "where"), [(t, w) for t, w, _ in YAML_CASES],
                         ids=[i for *_, i in YAML_CASES])
def test_load_settings_file_invalid_yaml_names_line(tmp_path: Path, text: str,
                                                    where: str) -> None:
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value) == f"{p}: {where} not valid YAML"


def test_load_settings_file_missing(tmp_path: Path) -> None:
    p = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value) == f"{p}: cannot read: No such file or directory"


@pytest.mark.parametrize("text", ["- a\n- b\n", "[]\n", "0\n", "false\n", "''\n", "x\n"],
                         ids=["list", "empty-list", "zero", "false", "empty-string", "scalar"])
def test_load_settings_file_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value) == f"{p}: expected a mapping at the top level"


def test_load_settings_file_empty_lists_required_keys(tmp_path: Path) -> None:
    p = tmp_path / "broker.yaml"
    p.write_text("")
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value).splitlines() == [
        f"{p}: invalid configuration", "  vault: Field required",
        "  identity: Field required", "  roles: Field required", "  admin: Field required"]


def test_load_settings_file_error_names_file_and_key(tmp_path: Path) -> None:
    data = base()
    data["identity"]["issuers"][0]["leeway_s"] = 61
    p = tmp_path / "broker.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{p}: invalid configuration"
    assert "  identity.issuers.0.leeway_s: Input should be less than or equal to 60" in lines


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    """YAML would silently keep the last value; the loader names every repeated key with
    its path and the lines it is on, and loads nothing."""
    text = yaml.safe_dump(base(), sort_keys=False)
    text = text.replace("vault:\n", "vault:\n  addr: http://127.0.0.1:9999\n", 1)
    text += "log_level: debug\nlog_level: info\nlog_level: warning\n"
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    numbered = text.splitlines()
    first_addr = numbered.index("  addr: http://127.0.0.1:9999") + 1
    second_addr = numbered.index("  addr: http://127.0.0.1:8200") + 1
    levels = [i + 1 for i, line in enumerate(numbered) if line.startswith("log_level:")]
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value).splitlines() == [
        f"{p}: a key is given more than once (YAML would keep only the last)",
        f"  vault.addr: given twice (lines {first_addr} and {second_addr})",
        f"  log_level: given 3 times (lines {levels[0]}, {levels[1]} and {levels[2]})",
    ]


@pytest.mark.parametrize(("text", "where"), [
    ("a:\n- x: 1\n  y: 2\n  x: 3\n", "  a.0.x: given twice (lines 2 and 4)"),
    ("a:\n  b:\n    c: 1\n    c: 2\n", "  a.b.c: given twice (lines 3 and 4)"),
    ("a: {x: 1, x: 2}\n", "  a.x: given twice (lines 1 and 1)"),
    ("1: a\n'1': b\n1: c\n", "  1: given twice (lines 1 and 3)"),
], ids=["in-a-list-item", "nested", "flow-mapping", "int-and-string-keys-differ"])
def test_repeated_keys_are_found_at_any_depth(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert str(info.value).splitlines()[1:] == [where]


def test_merge_keys_and_aliases_are_not_repeats(tmp_path: Path) -> None:
    """``<<`` merges keys that the mapping may override, and an alias is the same node
    seen again: neither is a key given twice."""
    data = base()
    text = yaml.safe_dump(data, sort_keys=False)
    text += "x-defaults: &d {default_ttl: 10m, max_ttl: 1h}\nx-again: *d\n"
    p = tmp_path / "broker.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:  # unknown top-level keys, not repeats
        load_settings_file(p)
    assert "given" not in str(info.value)
    p.write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings_file(p)
    assert "given" not in str(info.value)


LIST_CASES = [
    (["vault", "instance_policies"], "broker-instance", "a string"),
    (["policy", "rules", 0, "allow"], "dev-cert", "a string"),
    (["identity", "issuers", 0, "algorithms"], 256, "a number"),
    (["identity", "issuers"], {"name": "dev"}, "a mapping"),
]


@pytest.mark.parametrize(("path", "value", "kind"), LIST_CASES,
                         ids=[".".join(map(str, c[0])) for c in LIST_CASES])
def test_a_scalar_where_a_list_is_expected_says_a_list(path: list[Any], value: Any,
                                                        kind: str) -> None:
    data = base()
    _set(path, value)(data)
    (line,) = errors_of(data)
    where = ".".join(map(str, path))
    assert line.startswith(f"  {where}: expected a list, got {kind}")


def test_a_wrongly_typed_value_is_not_echoed() -> None:
    """A secret put under a list key is described, never shown."""
    data = base()
    data["vault"]["instance_policies"] = BROKER_TOKEN
    (line,) = errors_of(data)
    assert BROKER_TOKEN not in line


# ---------------------------------------------------------------------------------------------
# frozen
# ---------------------------------------------------------------------------------------------

FROZEN_CASES = [
    (lambda s: setattr(s, "log_level", "debug"), "top-level"),
    (lambda s: setattr(s.vault, "addr", "http://evil:8200"), "vault-addr"),
    (lambda s: setattr(s.roles["dev-cert"], "max_ttl", 10**6), "role-max-ttl"),
    (lambda s: setattr(s.policy.rules[0], "allow", ("dev-cert",)), "rule-allow"),
    (lambda s: setattr(s.policy.rules[0].match[0], "regex", ".*"), "claim-match-regex"),
    (lambda s: setattr(s.identity.issuers[0], "leeway_s", 60), "issuer-leeway"),
    (lambda s: setattr(s.admin, "token_sha256", "0" * 64), "admin-sha"),
]


@pytest.mark.parametrize("assign", [a for a, _ in FROZEN_CASES],
                         ids=[i for _, i in FROZEN_CASES])
def test_settings_are_frozen(assign: Callable[[Settings], None]) -> None:
    s = load_settings(base())
    before = s.model_dump()
    with pytest.raises(ValidationError, match="frozen"):
        assign(s)
    assert s.model_dump() == before


def test_rules_and_issuers_are_tuples() -> None:
    s = load_settings(base())
    assert isinstance(s.policy.rules, tuple)
    assert isinstance(s.identity.issuers, tuple)
    assert isinstance(s.policy.rules[0].allow, tuple)


def test_with_several_issuers_every_rule_names_its_issuer() -> None:
    data = base()
    second = dict(data["identity"]["issuers"][0], name="other", issuer="https://other.example")
    data["identity"]["issuers"].append(second)
    data["policy"]["rules"][0].pop("issuer", None)
    assert errors_of(data) == [
        "  (top level): policy.rules.0.issuer: required when more than one issuer is configured"]


def test_a_spiffe_issuer_must_say_which_claim_is_the_instance() -> None:
    data = base()
    data["identity"]["issuers"][0] = {
        "name": "dev", "issuer": "https://spire.example", "kind": "spiffe",
        "trust_domain": "example.org", "spiffe_bundle_uri": "https://spire.example/bundle"}
    # Only the real error: not also "issuers: should have at least 1 item" as a consequence.
    assert errors_of(data) == ["  identity.issuers.0.instance_claim: Field required"]


# ---------------------------------------------------------------------------------------------
# lifecycle sections: liveness, reconcile, events, kubernetes (issue 5)
# ---------------------------------------------------------------------------------------------

def _with(**sections: Any) -> dict[str, Any]:
    data = base()
    data.update(sections)
    return data


def _liveness(**fields: Any) -> dict[str, Any]:
    data = base()
    data["identity"]["issuers"][0]["liveness"] = fields
    return data


SQS = {"queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/ec2-events",
       "region": "eu-west-1"}
LIFECYCLE_BAD = [
    (_liveness(check="kubernetes"), "identity.issuers.0.liveness.check: kubernetes needs",
     "k8s-check-without-section"),
    (_liveness(check="aws_ec2"), "aws_ec2 needs the aws section", "ec2-check-without-aws"),
    (_with(**{**_liveness(check="kubernetes"), "kubernetes": {}}),
     "so instance_claim must be [kubernetes.io, pod, uid]", "k8s-check-not-pod-uid"),
    (_with(kubernetes={"watch": True, "issuer": "dev"}),
     "kubernetes.issuer: the watch terminates instances by pod uid", "k8s-watch-not-pod-uid"),
    (_liveness(check="ping"), "identity.issuers.0.liveness.check", "unknown-check"),
    (_liveness(unseen_grace="30s"), "identity.issuers.0.liveness.unseen_grace: expected 0",
     "grace-too-short"),
    (_with(events={"webhook": {"secrets": ["short"]}}),
     "events.webhook.secrets: each webhook secret must be at least 32 characters",
     "webhook-secret-short"),
    (_with(events={"webhook": {"secrets": []}}), "events.webhook.secrets",
     "webhook-no-secret"),
    (_with(events={"sqs": {**SQS, "queue_url": "https://sqs.example/q"}}),
     "events.sqs.queue_url: expected an SQS queue URL", "sqs-url"),
    (_with(events={"sqs": {**SQS, "queue_url": SQS["queue_url"].replace("https", "http")}}),
     "events.sqs.queue_url: expected https://", "sqs-plain-http-off-loopback"),
    (_with(events={"sqs": {**SQS, "instance_id_format": "{instance}"}}),
     "events.sqs.instance_id_format: expected a template with {instance_id}", "sqs-format"),
    (_with(events={"sqs": {**SQS, "issuer": "nobody"}}),
     "events.sqs.issuer: unknown issuer 'nobody'", "sqs-unknown-issuer"),
    (_with(kubernetes={"issuer": "nobody"}), "kubernetes.issuer: unknown issuer 'nobody'",
     "k8s-unknown-issuer"),
    (_with(kubernetes={"api_url": "http://10.0.0.1:6443"}), "kubernetes.api_url: expected",
     "k8s-plain-http"),
    (_with(kubernetes={"watch": True}), "kubernetes.issuer: required with watch: true",
     "k8s-watch-without-issuer"),
    (_with(reconcile={"tick_s": 0}), "reconcile.tick_s", "reconcile-tick"),
    (_with(reconcile={"revoke_orphans": "maybe"}), "reconcile.revoke_orphans",
     "reconcile-bool"),
]


@pytest.mark.parametrize(("data", "expected"), [(d, e) for d, e, _ in LIFECYCLE_BAD],
                         ids=[i for _, _, i in LIFECYCLE_BAD])
def test_lifecycle_sections_name_the_bad_key(data: dict[str, Any], expected: str) -> None:
    lines = errors_of(data)
    assert any(expected in line for line in lines), lines


def test_lifecycle_sections_load() -> None:
    data = _with(events={"webhook": {"secrets": ["x" * 32]}, "sqs": {**SQS, "issuer": "dev"}},
                 kubernetes={"issuer": "dev", "watch": True},
                 reconcile={"revoke_orphans": True, "tick_s": 30})
    data["identity"]["issuers"][0]["liveness"] = {"check": "kubernetes", "unseen_grace": "2h"}
    data["identity"]["issuers"][0]["instance_claim"] = ["kubernetes.io", "pod", "uid"]
    s = load_settings(data)
    assert s.identity.issuers[0].liveness.unseen_grace == 7200
    assert s.events.sqs is not None and s.events.sqs.wait_time_s == 20
    assert s.kubernetes is not None and s.kubernetes.api_url == "https://kubernetes.default.svc"
    assert s.reconcile.revoke_orphans is True
    assert "x" * 32 not in repr(s)


def test_sqs_states_must_be_ec2_states() -> None:
    lines = errors_of(_with(events={"sqs": {**SQS, "states": ["terminated", "exploded"]}}))
    assert any(line.startswith("  events.sqs.states: expected EC2 instance states")
               for line in lines), lines


def test_the_store_url_and_its_password_are_not_in_the_settings_repr():
    from broker.leases.settings import StoreSettings

    store = StoreSettings(url="postgresql://broker:s3cret-pw@db.internal/broker")
    assert store.url.endswith("@db.internal/broker")
    assert "s3cret-pw" not in repr(store)
    assert "s3cret-pw" not in str(store)
