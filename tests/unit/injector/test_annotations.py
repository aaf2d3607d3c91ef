"""The annotation contract: what each key becomes in the spec, and every refusal naming
the annotation and what it expects — through ``mutate``, as a pod's creator sees it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from broker.injector.annotations import CredentialSpec, InvalidAnnotations, parse
from broker.injector.model import Patch, Refusal, Skip
from broker.injector.mutate import mutate
from broker.injector.quantity import parse_quantity
from broker.injector.settings import AgentResources
from tests.unit.injector.podkit import CONFIG, P, container, pod

DEFAULTS = AgentResources()


def spec_of(annotations: dict[str, Any], share: bool = False):
    return parse({P + "inject": "true", **annotations}, share_process_namespace=share,
                 defaults=DEFAULTS)


def refused(annotations: dict[str, str], **spec: Any) -> str:
    obj = pod({"containers": [container("app")], **spec}, annotations)
    outcome = mutate(obj, "shop", CONFIG)
    assert isinstance(outcome, Refusal), outcome
    assert outcome.code == 400
    return outcome.message


def test_defaults() -> None:
    s = spec_of({P + "credential-db": "app-db"})
    assert s.credentials == (CredentialSpec(name="db", role="app-db"),)
    assert (s.mode, s.on_exit, s.containers) == ("native", "terminate", None)
    assert s.resources == {"requests": {"cpu": "10m", "memory": "32Mi"},
                           "limits": {"cpu": "100m", "memory": "64Mi"}}


def test_every_option() -> None:
    s = spec_of({
        P + "credential-db": "app-db", P + "format-db": "template",
        P + "template-db": "user=${username} $$HOME", P + "perms-db": "0444",
        P + "command-db": '["/usr/bin/reload", "a,b"]', P + "ttl-db": "1h30m",
        P + "credential-tls": "app-cert", P + "keygen-tls": "rsa-2048",
        P + "common-name-tls": "api.app.example.com", P + "signal-tls": "SIGUSR1:app.bin",
        P + "mode": "sidecar", P + "on-exit": "keep", P + "containers": " app , worker,app",
        P + "agent-cpu-request": "0.05", P + "agent-memory-limit": "1Gi",
    }, share=True)
    assert s.credentials == (
        CredentialSpec(name="db", role="app-db", format="template",
                       template="user=${username} $$HOME", perms="0444",
                       command=("/usr/bin/reload", "a,b"), ttl_s=5400),
        CredentialSpec(name="tls", role="app-cert", keygen="rsa-2048",
                       common_name="api.app.example.com", signal="SIGUSR1:app.bin"),
    )
    assert (s.mode, s.on_exit, s.containers) == ("sidecar", "keep", ("app", "worker"))
    assert s.resources == {"requests": {"cpu": "0.05", "memory": "32Mi"},
                           "limits": {"cpu": "100m", "memory": "1Gi"}}
    assert s.roles == ("app-cert", "app-db")


def test_init_only_keeps_by_default() -> None:
    assert spec_of({P + "credential-db": "r", P + "mode": "init-only"}).on_exit == "keep"


def test_annotations_outside_the_prefix_are_not_ours() -> None:
    s = spec_of({P + "credential-db": "r", "ephemeral-broker.io/credential-x": "?",
                 "vault.hashicorp.com/agent-inject": "true", "kubectl.kubernetes.io/x": "y"})
    assert [c.name for c in s.credentials] == ["db"]


REFUSALS = [
    ({P + "perm-db": "0400"}, "ephemeral-broker/perm-db: unknown annotation (did you mean "
     "ephemeral-broker/perms-db?)"),
    ({P + "moed": "native"}, "ephemeral-broker/moed: unknown annotation (did you mean "
     "ephemeral-broker/mode?)"),
    ({P + "credential-Db": "r"}, "ephemeral-broker/credential-Db: the credential name 'Db' is "
     "its file name"),
    ({P + "credential-": "r"}, "ephemeral-broker/credential-: the credential name '' is"),
    ({P + "credential-a.b": "r"}, "ephemeral-broker/credential-a.b: the credential name"),
    ({P + "credential-" + "a" * 64: "r"}, "the credential name"),
    ({P + "credential-x": "Bad Role"}, "ephemeral-broker/credential-x: expected a role name"),
    ({P + "format-db": "yaml"}, "ephemeral-broker/format-db: expected json | env | pem | "
     "pgpass | aws-credential-process | template, got 'yaml'"),
    ({P + "format-db": "template"}, "ephemeral-broker/template-db: required with "
     "ephemeral-broker/format-db: template"),
    ({P + "template-db": "${x}"}, "ephemeral-broker/template-db: only with "
     "ephemeral-broker/format-db: template"),
    ({P + "format-db": "template", P + "template-db": "$ bad"},
     "ephemeral-broker/template-db: expected a Python string.Template"),
    ({P + "format-db": "template", P + "template-db": ""}, "ephemeral-broker/template-db: "),
    ({P + "perms-db": "0777"}, "ephemeral-broker/perms-db: expected an octal file mode like "
     "0400 or 0440"),
    ({P + "perms-db": "0420"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "perms-db": "0402"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "perms-db": "0500"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "perms-db": "0040"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "perms-db": "400"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "perms-db": "0o400"}, "ephemeral-broker/perms-db: expected an octal file mode"),
    ({P + "command-db": "nginx -s reload"}, "ephemeral-broker/command-db: expected a JSON "
     "array of strings"),
    ({P + "command-db": "[]"}, "ephemeral-broker/command-db: expected a JSON array"),
    ({P + "command-db": '[""]'}, "ephemeral-broker/command-db: expected a JSON array"),
    ({P + "command-db": '["a", 1]'}, "ephemeral-broker/command-db: expected a JSON array"),
    ({P + "command-db": '{"cmd": "a"}'}, "ephemeral-broker/command-db: expected a JSON array"),
    ({P + "command-db": '["a\\u0000b"]'}, "ephemeral-broker/command-db: expected a JSON"),
    ({P + "command-db": '["' + "a" * 5000 + '"]'}, "ephemeral-broker/command-db: expected"),
    # The agent's limits, counted as the agent counts them: in arguments, and in bytes.
    ({P + "command-db": '["x"' + ',"a"' * 64 + "]"}, "ephemeral-broker/command-db: expected "
     'a JSON array of strings, the program first, like ["nginx", "-s", "reload"] (run '
     "directly, never through a shell), at most 64 of them"),
    ({P + "command-db": '["x","' + "é" * 2100 + '"]'}, "ephemeral-broker/command-db: expected "
     "a JSON array of strings, the program first, like"),
    ({P + "command-db": '["x","\\ud800"]'}, "ephemeral-broker/command-db: expected a JSON"),
    ({P + "format-db": "template", P + "template-db": "é" * 9000},
     "ephemeral-broker/template-db: expected a Python string.Template over the response's "
     "data, like 'postgres://${username}:${password}@db/app' ($$ for a literal $) (1 to 16384 "
     "bytes, no NUL)"),
    ({P + "signal-db": "SIGHUP:nginx"}, "ephemeral-broker/signal-db: the agent can signal "
     "another container's process only when the pod sets shareProcessNamespace: true"),
    ({P + "ttl-db": "soon"}, "ephemeral-broker/ttl-db: expected a duration like 15m"),
    ({P + "ttl-db": "0s"}, "ephemeral-broker/ttl-db: expected a duration like 15m"),
    ({P + "keygen-db": "dsa"}, "ephemeral-broker/keygen-db: expected ec-p256 | rsa-2048 | "
     "ed25519, got 'dsa'"),
    ({P + "common-name-db": "db.example.com"}, "ephemeral-broker/common-name-db: only with "
     "ephemeral-broker/keygen-db"),
    ({P + "keygen-db": "ec-p256", P + "common-name-db": "a b"},
     "ephemeral-broker/common-name-db: expected a DNS name"),
    ({P + "keygen-db": "ec-p256", P + "common-name-db": "a,b"},
     "ephemeral-broker/common-name-db: expected a DNS name"),
    ({P + "keygen-db": "ec-p256", P + "common-name-db": "*.shop.svc"},
     "ephemeral-broker/common-name-db: expected a DNS name like api.shop.svc, at most 64 "
     "characters, got '*.shop.svc'"),
    ({P + "keygen-db": "ec-p256", P + "common-name-db": "a" * 60 + ".svc1"},
     "ephemeral-broker/common-name-db: expected a DNS name like api.shop.svc, at most 64"),
    ({P + "keygen-db": "ed25519", P + "format-db": "env"},
     "ephemeral-broker/keygen-db: a generated key goes with a certificate: "
     "ephemeral-broker/format-db must be json, pem, template"),
    ({P + "format-db": "pem", P + "credential-db-ca": "r", P + "format-db-ca": "pem"},
     "ephemeral-broker/credential-db-ca: it writes db-ca.crt, which credential db writes too"),
    ({P + "keygen-db": "ed25519", P + "credential-db.key": "r"},
     "ephemeral-broker/credential-db.key: the credential name 'db.key' is its file name"),
    ({P + "format-other": "env"}, "ephemeral-broker/format-other: there is no "
     "ephemeral-broker/credential-other to apply to"),
    ({P + "mode": "daemon"}, "ephemeral-broker/mode: expected native | sidecar | init-only, "
     "got 'daemon'"),
    ({P + "on-exit": "revoke"}, "ephemeral-broker/on-exit: expected terminate | release | "
     "keep, got 'revoke'"),
    ({P + "mode": "init-only", P + "on-exit": "terminate"}, "ephemeral-broker/on-exit: mode "
     "init-only leaves no agent running"),
    ({P + "containers": ""}, "ephemeral-broker/containers: expected comma-separated "
     "container names"),
    ({P + "containers": "app,,worker"}, "ephemeral-broker/containers: expected"),
    ({P + "containers": "nope"}, "ephemeral-broker/containers: no app container named 'nope' "
     "(app containers: app)"),
    ({P + "agent-cpu-request": "lots"}, "ephemeral-broker/agent-cpu-request: expected a "
     "Kubernetes quantity like 100m, 0.5, 64Mi or 1G, got 'lots'"),
    ({P + "agent-memory-limit": "-1Mi"}, "ephemeral-broker/agent-memory-limit: expected a "
     "Kubernetes quantity"),
    ({P + "agent-memory-limit": "1e3"}, "ephemeral-broker/agent-memory-limit: expected"),
    ({P + "agent-cpu-request": "500m"}, "ephemeral-broker/agent-cpu-request: the agent's cpu "
     "request (500m) must not exceed its limit (100m)"),
    ({P + "agent-memory-request": "1Gi", P + "agent-memory-limit": "512Mi"},
     "ephemeral-broker/agent-memory-request and ephemeral-broker/agent-memory-limit: the "
     "agent's memory request (1Gi) must not exceed its limit (512Mi)"),
    ({P + "status": "done"}, "ephemeral-broker/status: expected \"injected\" (written by the "
     "webhook) or no value, got 'done'"),
]


@pytest.mark.parametrize(("annotations", "message"), REFUSALS,
                         ids=[f"{i}-{next(iter(a)).removeprefix(P)[:20]}"
                              for i, (a, _) in enumerate(REFUSALS)])
def test_refusals_name_the_annotation_and_what_is_expected(
        annotations: dict[str, str], message: str) -> None:
    got = refused({P + "credential-db": "app-db", **annotations})
    assert message in got, got


def test_every_problem_is_reported_at_once() -> None:
    got = refused({P + "credential-db": "app-db", P + "perms-db": "0777", P + "mode": "x",
                   P + "ttl-db": "?"})
    assert got.count("ephemeral-broker/") >= 3
    assert "perms-db" in got and "mode" in got and "ttl-db" in got


def test_a_pod_that_asks_for_nothing_is_refused() -> None:
    obj = pod({"containers": [container("app")]}, {P + "mode": "native"})
    outcome = mutate(obj, "shop", CONFIG)
    assert outcome == Refusal("ephemeral-broker/inject: the pod asks for no credential; add "
                              "ephemeral-broker/credential-<name>: <role>")


def test_at_most_32_credentials() -> None:
    many = {f"{P}credential-c{i}": "r" for i in range(33)}
    assert "at most 32 credentials per pod, got 33" in refused(many)
    assert isinstance(mutate(pod({"containers": [container("app")]},
                                 {f"{P}credential-c{i}": "r" for i in range(32)}),
                             "shop", CONFIG), Patch)


@pytest.mark.parametrize("value", ["SIGHUP:nginx", "SIGUSR2:php-fpm7.4", "SIGTERM:java",
                                   "SIGHUP:(sd-pam)", "SIGWINCH:x" + "y" * 14])
def test_signal_with_a_shared_process_namespace_is_accepted(value: str) -> None:
    obj = pod({"containers": [container("app")], "shareProcessNamespace": True},
              {P + "credential-db": "r", P + "signal-db": value})
    assert isinstance(mutate(obj, "shop", CONFIG), Patch)


@pytest.mark.parametrize("value", ["SIGKILL:nginx", "SIGSTOP:x", "HUP:nginx", "SIGHUP",
                                   "SIGHUP:", "SIGHUP:a-process-name-too-long", "SIGHUP:a b",
                                   "SIGHUP:../x", "SIGHUP:a:b", "SIGHUP:a\tb",
                                   # each would be another option on the agent's command line
                                   "SIGHUP:a,ttl=1s", "SIGHUP:x,perms=0644", "SIGHUP:a,cn=b",
                                   "SIGHUP:a=b", "SIGHUP:a,"])
def test_bad_signals(value: str) -> None:
    got = refused({P + "credential-db": "r", P + "signal-db": value}, shareProcessNamespace=True)
    assert got.startswith("ephemeral-broker/signal-db: expected SIGNAL:PROCESS_NAME"), got


def test_non_string_values_are_refused_not_crashed_on() -> None:
    with pytest.raises(InvalidAnnotations) as info:
        spec_of({P + "credential-db": "r", P + "ttl-db": 5})
    assert info.value.problems == ["ephemeral-broker/ttl-db: expected a string value"]


@pytest.mark.parametrize(("labels", "annotations"), [
    ({}, {P + "inject": "true"}),
    ({P + "inject": "true"}, {}),
    ({P + "inject": "true"}, {P + "inject": "false"}),
    ({P + "inject": "false"}, {P + "inject": "true"}),
    ({P + "inject": "True"}, {P + "inject": "true"}),
], ids=["annotation-only", "label-only", "annotation-false", "label-false", "label-True"])
def test_only_label_and_annotation_together_opt_in(labels: dict, annotations: dict) -> None:
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "labels": labels,
                        "annotations": {**annotations, P + "credential-db": "r",
                                        P + "perms-db": "0777"}},
           "spec": {"containers": [container("app")]}}
    assert mutate(obj, "shop", CONFIG) == Skip("not_opted_in")


@pytest.mark.parametrize(("text", "value"), [
    ("100m", Decimal("0.1")), ("0.5", Decimal("0.5")), ("1", Decimal(1)), (".5", Decimal("0.5")),
    ("64Mi", Decimal(64 * 2**20)), ("1G", Decimal(10**9)), ("1k", Decimal(1000)),
    ("1Ki", Decimal(1024)), ("2.5Gi", Decimal("2.5") * 2**30), ("10n", Decimal("1e-8")),
    ("0", Decimal(0)),
], ids=lambda v: str(v))
def test_quantities(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "m", "1.2.3", "-1", "+1", "1e3", "1 Mi", "1mi", "1KB",
                                  "1Ki ", "0x10", "1" * 40, "١"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        parse_quantity(text)
