"""``OwnToken`` over a scripted transport: which Vault calls it makes, when, and what it
makes of the answers (no Vault: the integration tests run the real one)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from broker.errors import UpstreamRejected, UpstreamUnavailable
from broker.vault.identity import OwnToken, needs
from broker.vault.settings import VaultSettings

ADDR = "http://127.0.0.1:8200"
ALL_CAPS = {n.path: list(n.capabilities) for n in needs("broker-instance")}


def denied() -> UpstreamRejected:
    return UpstreamRejected("no", code="vault_permission_denied")


class Transport:
    """Answers by path: a dict, or an exception (or a function giving either)."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        self.calls.append(path.removeprefix("/v1/"))
        answer = self.answers[path.removeprefix("/v1/")]
        if isinstance(answer, Callable):  # type: ignore[arg-type]
            answer = answer(kw)
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)


def own(auth: dict[str, Any], answers: dict[str, Any]) -> tuple[OwnToken, Transport]:
    settings = VaultSettings.model_validate({"addr": ADDR, "auth": auth})
    transport = Transport(answers)
    return OwnToken(settings, transport), transport


STATIC = {"method": "token", "token": "s.static-token-value"}
FINE = {
    "auth/token/lookup-self": {"data": {"ttl": 0, "creation_ttl": 0, "renewable": False}},
    "sys/capabilities-self": {"data": ALL_CAPS},
}


async def test_a_valid_static_token_with_every_capability_starts_quietly(caplog) -> None:
    token, transport = own(STATIC, dict(FINE))
    caplog.set_level(logging.DEBUG, logger="broker.vault.identity")
    await token.login()
    await token.check()
    assert transport.calls == ["auth/token/lookup-self", "sys/capabilities-self"]
    assert caplog.records == [] and token.expires_in() is None


async def test_a_refused_token_stops_start_up_naming_the_method_and_vault() -> None:
    token, _ = own(STATIC, {**FINE, "auth/token/lookup-self": denied()})
    await token.login()
    with pytest.raises(UpstreamRejected) as err:
        await token.check()
    assert err.value.code == "vault_token_invalid"
    assert err.value.message.startswith(
        f"Vault refused the broker's own token (auth method token, Vault {ADDR})")
    assert "static-token-value" not in err.value.message


async def test_vault_out_of_reach_at_start_up_is_logged_and_not_fatal(caplog) -> None:
    token, transport = own(STATIC, {**FINE, "auth/token/lookup-self": UpstreamUnavailable("x")})
    await token.login()
    await token.check()
    assert transport.calls == ["auth/token/lookup-self"]
    assert "Vault is unreachable" in caplog.text


async def test_capabilities_self_refused_is_a_warning_not_a_stop(caplog) -> None:
    token, _ = own(STATIC, {**FINE, "sys/capabilities-self": denied()})
    await token.login()
    await token.check()
    assert "could not check the broker's Vault capabilities" in caplog.text


async def test_readiness_asks_vault_at_most_every_recheck_unless_a_call_was_refused() -> None:
    token, transport = own(STATIC, dict(FINE))
    await token.login()
    await token.check()
    transport.calls.clear()
    assert await token.valid() and await token.valid()
    assert transport.calls == []  # the start-up lookup is fresh
    token.refused()
    transport.answers["auth/token/lookup-self"] = denied()
    assert not await token.valid()
    assert not await token.valid()
    assert transport.calls == ["auth/token/lookup-self"]  # once per refusal, then cached


async def test_a_renewable_static_token_is_renewed_at_two_thirds_then_reported(
        caplog, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("broker.vault.identity.time.monotonic", lambda: now[0])
    lookup = {"data": {"ttl": 3000, "creation_ttl": 3000, "renewable": True}}
    renewals = iter([{"auth": {"lease_duration": 3000, "renewable": True}},
                     {"auth": {"lease_duration": 900, "renewable": True}}])
    token, transport = own(STATIC, {**FINE, "auth/token/lookup-self": lookup,
                                    "auth/token/renew-self": lambda kw: next(renewals)})
    await token.login()
    await token.check()
    transport.calls.clear()
    now[0] += 1999
    await token.maintain()
    assert transport.calls == []  # not yet due
    now[0] += 1
    await token.maintain()
    assert transport.calls == ["auth/token/renew-self"] and token.expires_in() == 3000
    now[0] += 2000  # 1000 s left; the max TTL allows only 900 more
    caplog.set_level(logging.WARNING, logger="broker.vault.identity")
    await token.maintain()
    assert transport.calls == ["auth/token/renew-self"] * 2
    assert [r.getMessage() for r in caplog.records] == [
        "the broker's Vault token expires soon and cannot be renewed: give the broker a new one"]
    now[0] += 600
    await token.maintain()  # no more renewals, and the warning waits an hour
    assert transport.calls == ["auth/token/renew-self"] * 2 and len(caplog.records) == 1


async def test_a_login_method_logs_in_again_at_two_thirds_of_its_ttl(monkeypatch, tmp_path):
    now = [50.0]
    monkeypatch.setattr("broker.vault.identity.time.monotonic", lambda: now[0])
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt-one")
    sent: list[str] = []

    def login(kw: dict[str, Any]) -> dict[str, Any]:
        sent.append(kw["json"]["jwt"])
        return {"auth": {"client_token": f"s.login-{len(sent)}", "lease_duration": 600}}

    token, transport = own({"method": "jwt", "role": "broker", "token_path": str(jwt_file)},
                           {**FINE, "auth/jwt/login": login})
    await token.login()
    await token.check()
    now[0] += 399
    await token.maintain()
    assert sent == ["jwt-one"]
    jwt_file.write_text("jwt-two\n")
    now[0] += 1
    await token.maintain()
    assert sent == ["jwt-one", "jwt-two"] and token.token is not None
    assert token.token.reveal() == "s.login-2"


async def test_a_refused_login_says_which_login_and_what_vault_said() -> None:
    err = UpstreamRejected("Vault refused the request", code="vault_invalid_request")
    err.vault_errors = ("invalid role or secret ID",)
    token, _ = own({"method": "approle", "role_id": "r", "secret_id": "sid-value"},
                   {"auth/approle/login": err})
    with pytest.raises(UpstreamRejected) as refused:
        await token.login()
    assert refused.value.code == "vault_invalid_request"
    assert refused.value.message == ("Vault refused the broker's login (auth method approle at "
                                     f"approle, Vault {ADDR}): invalid role or secret ID")


async def test_readiness_does_not_wait_for_a_login_under_way() -> None:
    token, transport = own(STATIC, dict(FINE))
    await token.login()
    await token.check()
    transport.calls.clear()
    token.refused()
    async with token._lock:  # noqa: SLF001 — a login or lookup under way
        assert await token.valid()
    assert transport.calls == []


async def test_a_start_up_check_vault_missed_is_done_at_the_next_upkeep(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr("broker.vault.identity.time.monotonic", lambda: now[0])
    token, transport = own(STATIC, {**FINE, "auth/token/lookup-self": UpstreamUnavailable("x")})
    await token.login()
    await token.check()
    transport.answers["auth/token/lookup-self"] = {
        "data": {"ttl": 300, "creation_ttl": 300, "renewable": True}}
    await token.maintain()
    assert transport.calls == ["auth/token/lookup-self", "auth/token/lookup-self",
                               "sys/capabilities-self"]
    assert token.expires_in() == 300
    await token.maintain()
    assert len(transport.calls) == 3  # checked once: nothing more until renewal is due
