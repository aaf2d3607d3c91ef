"""The rabbitmq engine: which Vault path it reads, what of Vault's answer reaches the
caller, and which roles the configuration accepts for it."""

from __future__ import annotations

from typing import Any

import pytest

from broker.config import load_settings
from broker.dev.environment import dev_settings_dict
from broker.engines import ENGINES, read_caller_params
from broker.engines.rabbitmq import RabbitMqEngine
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, ConfigError

ENGINE = ENGINES["rabbitmq"]
ROLE = RoleSettings(engine="rabbitmq", mount="rabbitmq", vault_role="orders-publisher")


def settings_with(role: dict[str, Any]) -> dict[str, Any]:
    data = dev_settings_dict(
        vault_addr="http://127.0.0.1:8200",
        broker_token="s.brokerTokenValue1234567890",
        issuer="https://issuer.example",
        jwks_uri="https://issuer.example/jwks.json",
        store_url="sqlite:///broker.db",
        admin_token_sha256="ab" * 32,
        with_database=False,
    )
    data["roles"]["mq"] = role
    data["policy"]["rules"][0]["allow"] = sorted(data["roles"])
    return data


def test_the_engine_is_discovered_with_its_kind_and_one_leased_mode():
    assert isinstance(ENGINE, RabbitMqEngine)
    assert (ENGINE.name, ENGINE.kind, list(ENGINE.modes)) == (
        "rabbitmq",
        "rabbitmq_login",
        ["dynamic"],
    )
    mode = ENGINE.modes["dynamic"]
    assert (
        mode.templates,
        mode.required_templates,
        dict(mode.caller),
        mode.required_caller,
        mode.options,
        mode.required_options,
        mode.leased,
    ) == (frozenset(), frozenset(), {}, frozenset(), frozenset(), frozenset(), True)
    assert ENGINE.mode(ROLE) is mode


@pytest.mark.parametrize("ttl", [1, 300, 3600, 86400], ids=["1s", "5m", "1h", "1d"])
def test_request_reads_the_creds_path_and_leaves_the_ttl_to_a_renewal(ttl):
    req = ENGINE.request(ROLE, {}, {}, ttl)
    assert (req.method, req.path, req.body, req.ttl_applied) == (
        "GET",
        "rabbitmq/creds/orders-publisher",
        None,
        False,
    )


@pytest.mark.parametrize(
    "mount,vault_role,path",
    [
        ("rabbitmq", "app", "rabbitmq/creds/app"),
        ("mq-prod.eu", "orders_v2", "mq-prod.eu/creds/orders_v2"),
        ("rabbitmq-tenant-7", "publisher.readonly", "rabbitmq-tenant-7/creds/publisher.readonly"),
    ],
    ids=["plain", "dots-and-underscores", "dotted-role"],
)
def test_request_path_is_built_from_the_role_mount_and_vault_role(mount, vault_role, path):
    role = RoleSettings(engine="rabbitmq", mount=mount, vault_role=vault_role)
    assert ENGINE.request(role, {}, {}, 600).path == path


@pytest.mark.parametrize(
    "data,shaped",
    [
        (
            {"username": "v-app-9f2c", "password": "pw-1"},
            {"username": "v-app-9f2c", "password": "pw-1"},
        ),
        (
            {
                "username": "v-app-9f2c",
                "password": "pw-1",
                "vhosts": {"orders": {}},
                "tags": "x",
                "connection_uri": "http://mq:15672",
            },
            {"username": "v-app-9f2c", "password": "pw-1"},
        ),
    ],
    ids=["exact", "extra-fields-dropped"],
)
def test_shape_hands_out_the_username_and_password_only(data, shaped):
    assert ENGINE.shape(ROLE, data) == shaped


def test_a_role_loads_with_the_default_mode_and_its_ttls():
    settings = load_settings(
        settings_with(
            {
                "engine": "rabbitmq",
                "mount": "rabbitmq",
                "vault_role": "orders-publisher",
                "default_ttl": "15m",
                "max_ttl": "2h",
                "max_leases_per_instance": 2,
                "on_limit": "refuse",
            }
        )
    )
    role = settings.roles["mq"]
    assert (
        role.engine,
        role.mode,
        role.mount,
        role.vault_role,
        role.default_ttl,
        role.max_ttl,
        role.params,
        role.request_params,
        role.options,
        role.max_leases_per_instance,
        role.on_limit,
    ) == ("rabbitmq", None, "rabbitmq", "orders-publisher", 900, 7200, {}, None, {}, 2, "refuse")
    assert ENGINE.mode(role) is ENGINE.modes["dynamic"]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"mode": "static"}, "mode: engine rabbitmq has modes dynamic; got 'static'"),
        (
            {"params": {"vhost": "{workload}"}},
            "params: engine rabbitmq takes no vhost (allowed: none)",
        ),
        (
            {"params": {"username": "{instance_id}", "tags": "x"}},
            "params: engine rabbitmq takes no tags, username (allowed: none)",
        ),
        (
            {"request_params": ["vhost"]},
            "request_params: engine rabbitmq lets a caller send nothing; got vhost",
        ),
        (
            {"options": {"tags": "administrator"}},
            "options: engine rabbitmq takes no tags (allowed: none)",
        ),
        ({"vault_role": "a/b"}, None),
        ({"mount": "rabbit..mq"}, None),
    ],
    ids=[
        "unknown-mode",
        "templated-vhost",
        "templated-username-and-tags",
        "caller-vhost",
        "tags-option",
        "vault-role-slash",
        "mount-dotdot",
    ],
)
def test_a_role_that_would_reach_past_the_vault_role_is_refused_at_load(extra, message):
    role = {"engine": "rabbitmq", "mount": "rabbitmq", "vault_role": "orders-publisher", **extra}
    with pytest.raises(ConfigError) as info:
        load_settings(settings_with(role))
    key = next(iter(extra))
    expected = (
        f"roles.mq: {message}"
        if message is not None
        else f"roles.mq.{key}: expected one Vault path segment (letters, digits, _ . -)"
    )
    assert str(info.value).splitlines() == ["config: invalid configuration", f"  {expected}"]


@pytest.mark.parametrize(
    "body",
    [
        {"vhost": "orders"},
        {"username": "admin"},
        {"tags": "administrator", "vhost": "/"},
    ],
    ids=["vhost", "username", "tags-and-vhost"],
)
def test_a_caller_can_send_nothing_that_reaches_vault(body):
    with pytest.raises(BadRequest) as info:
        read_caller_params(ENGINE, "mq", ROLE, body)
    assert info.value.code == "unknown_parameter"
    assert str(info.value) == (
        f"role 'mq' does not take {', '.join(sorted(body))} from a request (it takes: role, ttl)"
    )
    assert read_caller_params(ENGINE, "mq", ROLE, {}) == {}
