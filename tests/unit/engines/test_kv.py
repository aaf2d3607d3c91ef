"""KV: the secret's path comes from the identity through the role's template, segment by
segment validated and escaped; a caller cannot name one; the answer's shape per version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from broker.engines import ENGINES, read_caller_params
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, NotPermitted, UpstreamRejected
from broker.identity.model import Identity
from broker.policy import render_params

KV = ENGINES["kv"]
TEMPLATE = {"path": "apps/{workload}/config"}


def kv_role(
    mode: str | None = None, path: str = "apps/{workload}/config", mount: str = "secret"
) -> RoleSettings:
    return RoleSettings(
        engine="kv", mode=mode, mount=mount, vault_role="unused", params={"path": path}
    )


def identity(workload: str) -> Identity:
    return Identity(
        issuer_name="dev",
        issuer="https://issuer.example",
        subject=workload,
        instance_id="i-1",
        workload=workload,
        issued_at=datetime(2024, 1, 1, tzinfo=UTC),
        expires_at=datetime(2024, 1, 1, 1, tzinfo=UTC),
        claims={},
    )


def test_kv_engine_identity():
    assert (KV.name, KV.kind, list(KV.modes)) == ("kv", "static_secret", ["v2", "v1"])
    assert [m.leased for m in KV.modes.values()] == [False, False]


@pytest.mark.parametrize(
    "mode,path,expected",
    [
        (None, "apps/{workload}/config", "secret/data/apps/payments/config"),
        ("v2", "apps/{workload}/config", "secret/data/apps/payments/config"),
        ("v1", "apps/{workload}/config", "secret/apps/payments/config"),
        ("v2", "{workload}", "secret/data/payments"),
        ("v2", "shared/tls.bundle", "secret/data/shared/tls.bundle"),
        (
            "v2",
            "teams/{issuer_name}/{workload}/{instance_id}",
            "secret/data/teams/dev/payments/i-1",
        ),
        ("v2", "apps/svc@{workload}:cfg", "secret/data/apps/svc%40payments%3Acfg"),
    ],
    ids=["default-v2", "v2", "v1", "top-level", "untemplated", "several-fields", "escaped"],
)
def test_kv_request_reads_the_rendered_path(mode, path, expected):
    role = kv_role(mode, path)
    params = render_params(role.params, identity("payments"))
    req = KV.request(role, params, {}, 600)
    assert (req.method, req.path, req.body, req.ttl_applied) == ("GET", expected, None, False)


def test_kv_the_identity_picks_the_secret():
    role = kv_role()
    paths = {
        w: KV.request(role, render_params(role.params, identity(w)), {}, 60).path
        for w in ("payments", "billing")
    }
    assert paths == {
        "payments": "secret/data/apps/payments/config",
        "billing": "secret/data/apps/billing/config",
    }


@pytest.mark.parametrize(
    "workload",
    ["../billing", "a/b", "..", "", "pay ments", "x" * 64],
    ids=["climb", "slash", "dotdot", "empty", "space", "too-long"],
)
def test_kv_identity_value_that_could_reach_another_path_is_refused(workload):
    with pytest.raises(NotPermitted) as err:
        render_params(TEMPLATE, identity(workload))
    assert err.value.code == "template_value_refused"


@pytest.mark.parametrize(
    "rendered",
    [
        "",
        "apps/../billing/config",
        "apps//config",
        "/apps/x",
        "apps/x/",
        "..",
        "apps/./config",
        "apps/-x/config",
        "apps/x y/config",
        "apps/%2e%2e/config",
    ],
    ids=[
        "empty",
        "climb",
        "double-slash",
        "leading-slash",
        "trailing-slash",
        "dotdot",
        "dot",
        "leading-dash",
        "space",
        "encoded-dotdot",
    ],
)
@pytest.mark.parametrize("mode", ["v2", "v1"])
def test_kv_request_refuses_a_path_that_climbs_or_is_empty(mode, rendered):
    # The load-time check and the identity-value rule make this unreachable; the request
    # checks again so that no later change can make it reachable.
    with pytest.raises(UpstreamRejected) as err:
        KV.request(kv_role(mode), {"path": rendered}, {}, 60)
    assert err.value.code == "vault_path_refused"


PATH_MESSAGE = (
    "params.path: expected segments separated by single '/', each starting with "
    "a letter or digit and made of letters, digits, '_', '.', '@', ':', '-' "
    "(no '..', no leading, trailing or doubled '/')"
)


@pytest.mark.parametrize(
    "path,message",
    [
        ("", PATH_MESSAGE),
        ("apps/../{workload}", PATH_MESSAGE),
        ("apps/{workload}..", PATH_MESSAGE),
        ("/apps/{workload}", PATH_MESSAGE),
        ("apps/{workload}/", PATH_MESSAGE),
        ("apps//{workload}", PATH_MESSAGE),
        ("apps/.{workload}", PATH_MESSAGE),
        ("apps/{workload} cfg", PATH_MESSAGE),
        ("apps/" + "x" * 200 + "{workload}", PATH_MESSAGE),
        ("apps/{workload", "params.path: malformed template (unbalanced braces)"),
        ("apps/{0}", "params.path: template field {0} must be a plain name like {workload}"),
        ("apps/{workload!r}", "params.path: template field {workload} must be a plain name"),
        ("apps/{nope}", "params.path: unknown template field(s) ['nope']"),
    ],
    ids=[
        "empty",
        "climb",
        "dotdot-after-field",
        "leading-slash",
        "trailing-slash",
        "double-slash",
        "dot-prefix",
        "space",
        "too-long-with-longest-value",
        "unbalanced",
        "positional",
        "conversion",
        "unknown-field",
    ],
)
def test_kv_role_path_template_refused_at_load(path, message):
    with pytest.raises(ValidationError) as err:
        kv_role(path=path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "role,message",
    [
        ({"params": {}}, "params: engine kv needs path"),
        (
            {"params": {"path": "a/{workload}", "version": "2"}},
            "params: engine kv takes no version (allowed: path)",
        ),
        (
            {"params": {"path": "a/{workload}"}, "request_params": ["path"]},
            "request_params: engine kv lets a caller send nothing; got path",
        ),
        (
            {"params": {"path": "a/{workload}"}, "options": {"version": 3}},
            "options: engine kv takes no version (allowed: none)",
        ),
        (
            {"params": {"path": "a/{workload}"}, "mode": "v3"},
            "mode: engine kv has modes v2, v1; got 'v3'",
        ),
    ],
    ids=["no-path", "other-param", "caller-path", "option", "unknown-mode"],
)
def test_kv_role_refused_at_load(role, message):
    with pytest.raises(ValidationError) as err:
        RoleSettings(engine="kv", mount="secret", vault_role="unused", **role)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "body,unknown",
    [
        ({"path": "apps/billing/config"}, "path"),
        ({"path": "apps/billing/config", "mount": "other"}, "mount, path"),
        ({"version": 1}, "version"),
    ],
    ids=["path", "path-and-mount", "version"],
)
def test_kv_caller_cannot_name_the_secret(body, unknown):
    with pytest.raises(BadRequest) as err:
        read_caller_params(KV, "kv-config", kv_role(), body)
    assert (err.value.code, err.value.status) == ("unknown_parameter", 400)
    assert err.value.message == (
        f"role 'kv-config' does not take {unknown} from a request (it takes: role, ttl)"
    )


# ``data`` of GET secret/data/:path, as Vault and OpenBao document and answer it.
V2_ANSWER: dict[str, Any] = {
    "data": {"foo": "bar", "nested": {"a": [1, 2]}},
    "metadata": {
        "created_time": "2018-03-22T02:24:06.945319214Z",
        "custom_metadata": None,
        "deletion_time": "",
        "destroyed": False,
        "version": 2,
    },
}


@pytest.mark.parametrize(
    "mode,answer,expected",
    [
        (
            "v2",
            V2_ANSWER,
            {
                "values": {"foo": "bar", "nested": {"a": [1, 2]}},
                "version": 2,
                "created_time": "2018-03-22T02:24:06.945319214Z",
            },
        ),
        ("v1", {"foo": "bar", "ttl": "1h"}, {"values": {"foo": "bar", "ttl": "1h"}}),
        ("v1", {}, {"values": {}}),
    ],
    ids=["v2", "v1", "v1-empty"],
)
def test_kv_answer_shape(mode, answer, expected):
    assert KV.shape(kv_role(mode), answer) == expected


@pytest.mark.parametrize(
    "answer,what",
    [
        ({**V2_ANSWER, "data": None}, "the secret has no data"),
        ({"metadata": V2_ANSWER["metadata"]}, "the secret has no data"),
        ({"data": ["LEAK"], "metadata": V2_ANSWER["metadata"]}, "the secret has no data"),
        ({"data": {"k": "LEAK"}}, "the secret has no version metadata"),
        ({"data": {"k": "LEAK"}, "metadata": "v1"}, "the secret has no version metadata"),
        (
            {"data": {"k": "LEAK"}, "metadata": {"created_time": "2018-03-22T02:24:06Z"}},
            "the secret's version is not a positive integer",
        ),
        (
            {"data": {"k": "LEAK"}, "metadata": {"version": True, "created_time": "t"}},
            "the secret's version is not a positive integer",
        ),
        (
            {"data": {"k": "LEAK"}, "metadata": {"version": 0, "created_time": "t"}},
            "the secret's version is not a positive integer",
        ),
        (
            {"data": {"k": "LEAK"}, "metadata": {"version": "2", "created_time": "t"}},
            "the secret's version is not a positive integer",
        ),
        (
            {"data": {"k": "LEAK"}, "metadata": {"version": 2}},
            "the secret's created_time is missing",
        ),
        ({"foo": "LEAK"}, "the secret has no data"),
    ],
    ids=[
        "deleted",
        "no-data",
        "data-list",
        "no-metadata",
        "metadata-string",
        "no-version",
        "version-bool",
        "version-zero",
        "version-string",
        "no-created-time",
        "v1-answer-to-a-v2-role",
    ],
)
def test_kv_v2_malformed_answer_is_a_clear_upstream_error(answer, what):
    with pytest.raises(UpstreamRejected) as err:
        KV.shape(kv_role("v2"), answer)
    assert (err.value.code, err.value.status) == ("vault_bad_response", 502)
    assert err.value.message == (
        f"Vault's KV answer is not usable: {what}; check that the role's mode matches the "
        "mount's KV version and that the secret has a current version"
    )
    assert "LEAK" not in err.value.message
