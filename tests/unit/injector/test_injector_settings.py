"""The injector's configuration: documented defaults with no file, a full file, ``${ENV}``,
command-line overrides checked like the keys they replace, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_yaml_model
from broker.errors import ConfigError
from broker.injector.settings import InjectorSettings, parse_listen
from broker.settings import is_loopback

FULL = """
listen: 0.0.0.0:9443
tls: {cert_file: /tls/tls.crt, key_file: /tls/tls.key, reload_s: 5}
broker_url: https://ephemeral-broker.ephemeral-broker.svc:8300/
preview: {token_file: /var/run/secrets/injector/admin-token, timeout_s: 1.5}
issuer: k8s-prod
audience: ${AUDIENCE}
token_expiration_s: 900
strict: true
skip_namespaces: [kube-system, kube-public, kube-node-lease]
agent:
  image: registry.example/ephemeral-broker@sha256:0123abcd
  image_pull_policy: Always
  run_as_user: 10001
  ready_port: 9399
  mount_path: /run/credentials
  ca_file: /etc/ssl/broker-ca.pem
  exit_timeout_s: 25
  resources: {requests: {cpu: 20m, memory: 48Mi}, limits: {cpu: 200m, memory: 96Mi}}
"""


def errors(path: Path | None, text: str | None = None, **overrides: str) -> list[str]:
    if text is not None and path is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml_model(InjectorSettings, path, overrides=overrides, env={})
    return str(info.value).splitlines()


def test_defaults_with_no_file() -> None:
    s = load_yaml_model(InjectorSettings, None, env={})
    assert s == InjectorSettings()
    assert (s.listen, s.broker_url, s.audience, s.token_expiration_s, s.strict) == (
        "0.0.0.0:8443", "https://ephemeral-broker.ephemeral-broker.svc:8300",
        "ephemeral-broker", 600, False)
    assert s.skip_namespaces == ("kube-system", "kube-public")
    assert s.preview is None and s.issuer is None
    assert (s.tls.cert_file, s.tls.key_file, s.tls.reload_s) == (
        Path("/etc/injector/tls/tls.crt"), Path("/etc/injector/tls/tls.key"), 10)
    a = s.agent
    assert (a.image, a.image_pull_policy, a.run_as_user, a.ready_port, a.mount_path,
            a.ca_file, a.exit_timeout_s, a.startup_timeout_s) == (
        "ghcr.io/example/ephemeral-broker:0.1.0", "IfNotPresent", 65532, 8399,
        "/var/run/ephemeral-broker", None, 20, 900)
    assert a.resources.model_dump() == {"requests": {"cpu": "10m", "memory": "32Mi"},
                                        "limits": {"cpu": "100m", "memory": "64Mi"}}


def test_a_full_file(tmp_path: Path) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text(FULL)
    s = load_yaml_model(InjectorSettings, path, env={"AUDIENCE": "broker.example"})
    assert s.listen == "0.0.0.0:9443" and s.tls.reload_s == 5
    assert s.broker_url == "https://ephemeral-broker.ephemeral-broker.svc:8300"
    assert s.preview_url == s.broker_url
    assert s.audience == "broker.example"
    assert s.agent.mount_path == "/run/credentials" and s.agent.ca_file == "/etc/ssl/broker-ca.pem"
    assert s.agent.resources.limits.memory == "96Mi"


def test_flags_override_the_file_and_are_checked_like_it(tmp_path: Path) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text("listen: 0.0.0.0:9443\nbroker_url: https://a.svc\n")
    s = load_yaml_model(InjectorSettings, path, overrides={
        "listen": "127.0.0.1:0", "broker_url": "http://127.0.0.1:8300", "issuer": None})
    assert (s.listen, s.broker_url) == ("127.0.0.1:0", "http://127.0.0.1:8300")
    assert errors(path, listen="nowhere") == [
        f"{path}: invalid configuration",
        "  listen: expected HOST:PORT (e.g. 0.0.0.0:8443 or [::1]:8443), got 'nowhere'"]


@pytest.mark.parametrize(("text", "line"), [
    ("broker_url: http://broker.svc:8300", "  broker_url: expected https:// (plain http is "
     "allowed only to a loopback address)"),
    ("broker_url: broker.svc", "  broker_url: expected an http(s) URL like "
     "https://broker.namespace.svc:8300"),
    ("token_expiration_s: 300", "  token_expiration_s: Input should be greater than or equal "
     "to 600"),
    ("preview: {}", "  (top level): issuer: required with preview (the broker maps the pod's "
     "claims with that issuer's claim mapping)"),
    ("strict: true", "  (top level): strict: needs the preview section (strict refuses what "
     "it refuses)"),
    ("issuer: K8s Prod", "  issuer: expected the broker's issuer name (lower-case letters, "
     "digits, _ -)"),
    ("agent: {mount_path: relative}", "  agent.mount_path: expected a normalized absolute "
     "path other than /, got 'relative'"),
    ("agent: {mount_path: /var/run/secrets}", "  agent.mount_path: must not overlap the "
     "agent's token directory /var/run/secrets/ephemeral-broker"),
    ("agent: {mount_path: /a/../b}", "  agent.mount_path: expected a normalized absolute path "
     "other than /, got '/a/../b'"),
    ("agent: {image: 'bad image'}", "  agent.image: expected an image reference like "
     "registry/name:tag"),
    ("agent: {run_as_user: 0}", "  agent.run_as_user: Input should be greater than or equal "
     "to 1"),
    ("agent: {resources: {requests: {cpu: 1, memory: 1Mi}}}", "  agent.resources.requests.cpu: "
     "Input should be a valid string"),
    ("agent: {resources: {requests: {cpu: '2', memory: 1Mi}}}", "  agent.resources: requests.cpu "
     "must not exceed limits.cpu"),
    ("agent: {resources: {limits: {cpu: 1 core, memory: 1Mi}}}",
     "  agent.resources.limits.cpu: expected a Kubernetes quantity like 100m, 0.5, 64Mi or 1G, "
     "got '1 core'"),
    ("surprise: 1", "  surprise: Extra inputs are not permitted"),
    ("audience: ${MISSING}", None),
], ids=["http-off-loopback", "not-a-url", "short-token", "preview-without-issuer",
        "strict-without-preview", "issuer-name", "relative-mount", "mount-overlaps-token",
        "mount-not-normalized", "image", "root", "quantity-not-a-string", "request-over-limit",
        "bad-quantity", "unknown-key", "missing-env"])
def test_errors_name_the_key(tmp_path: Path, text: str, line: str | None) -> None:
    path = tmp_path / "injector.yaml"
    got = errors(path, text)
    if line is None:
        assert got == [f"{path}: environment variable not set",
                       "  audience: environment variable MISSING is not set"]
    else:
        assert got == [f"{path}: invalid configuration", line]


def test_file_errors(tmp_path: Path) -> None:
    assert errors(tmp_path / "absent.yaml") == [
        f"{tmp_path / 'absent.yaml'}: cannot read: No such file or directory"]
    path = tmp_path / "bad.yaml"
    assert errors(path, "listen: [") == [f"{path}: line 1, column 10 not valid YAML"]
    assert errors(path, "- a\n- b\n") == [f"{path}: expected a mapping at the top level"]
    path.write_text("")
    assert load_yaml_model(InjectorSettings, path, env={}) == InjectorSettings()


@pytest.mark.parametrize(("text", "parsed"), [
    ("0.0.0.0:8443", ("0.0.0.0", 8443)), ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)), ("injector.svc:65535", ("injector.svc", 65535)),
])
def test_listen(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["8443", ":8443", "host:", "host:65536", "::1:80", "a b:1"])
def test_bad_listen(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)


def test_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "injector.svc"))
