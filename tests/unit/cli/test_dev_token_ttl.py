"""``broker dev token --ttl``: what the dev broker accepts, and the range it says."""

from __future__ import annotations

import pytest

from broker.dev.environment import dev_settings_dict
from broker.dev.issuer import DEV_MAX_TOKEN_LIFETIME_S, dev_token_ttl


@pytest.mark.parametrize(("text", "seconds"), [("1", 1), ("1s", 1), ("5m", 300), ("1h", 3600)])
def test_lifetimes_the_dev_broker_accepts(text: str, seconds: int) -> None:
    assert dev_token_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "61m", "1h1s", "2h"])
def test_lifetimes_it_would_refuse_say_the_range(text: str) -> None:
    with pytest.raises(ValueError, match="the dev broker accepts tokens valid for 1s to 1h"):
        dev_token_ttl(text)


def test_the_range_is_the_dev_issuers_own_limit() -> None:
    settings = dev_settings_dict(vault_addr="http://127.0.0.1:1", broker_token="t",
                                 issuer="https://i", jwks_uri="https://i/jwks",
                                 store_url="sqlite:///x", admin_token_sha256="ab" * 32,
                                 with_database=False)
    assert settings["identity"]["issuers"][0]["max_token_lifetime"] == DEV_MAX_TOKEN_LIFETIME_S
