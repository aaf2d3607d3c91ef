"""The ``aws`` section (the broker's own access to AWS): bad keys are named, static keys stay
secret. Pure: no AWS."""

from __future__ import annotations

import pytest

from broker.config import load_settings
from broker.errors import ConfigError
from tests.unit.aws.settingskit import WEB, settings_with


@pytest.mark.parametrize(
    "aws,line",
    [
        ({"sts_endpoint": "http://sts.example.com"}, "aws.sts_endpoint: expected https://"),
        ({"iam_endpoint": "https://iam.example.com/path"}, "aws.iam_endpoint: expected http(s)"),
        ({"region": "mars"}, "aws.region: expected an AWS region"),
        ({"revoked_sessions_policy": "no spaces"}, "aws.revoked_sessions_policy: expected"),
        (
            {
                "credentials": {
                    "method": "static",
                    "access_key_id": "short",
                    "secret_access_key": "s",
                }
            },
            "aws.credentials.static.access_key_id",
        ),
        ({"credentials": {"method": "keys"}}, "aws.credentials"),
    ],
    ids=[
        "sts-plain-http-off-loopback",
        "iam-endpoint-with-path",
        "region",
        "policy-name",
        "access-key-id",
        "unknown-method",
    ],
)
def test_bad_aws_settings_name_the_key(aws, line):
    with pytest.raises(ConfigError) as err:
        load_settings(settings_with({"web": WEB}, aws=aws, vault={"entity_alias": "workload"}))
    assert line in str(err.value)


def test_static_aws_keys_are_secret_in_settings():
    s = load_settings(
        settings_with(
            {"web": WEB},
            vault={"entity_alias": "workload"},
            aws={
                "sts_endpoint": "http://127.0.0.1:5000",
                "iam_endpoint": "http://127.0.0.1:5000/",
                "credentials": {
                    "method": "static",
                    "access_key_id": "AKIAIOSFODNN7EXAMPLE",
                    "secret_access_key": "wJalrXUtnFEMI/K7MDENG",
                },
            },
        )
    )
    assert s.aws is not None and s.aws.iam_endpoint == "http://127.0.0.1:5000"
    assert "wJalrXUtnFEMI" not in repr(s)
