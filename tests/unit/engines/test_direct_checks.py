"""Direct checks of a lost lease's credential: the pure parts (serials in every form Vault
or an operator writes them, the PKI mount from a credential path, a CRL's serials, the
database checker's setting) and the dispatch by role, with fakes for the I/O."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.config import ConfigError, load_settings
from broker.dev.environment import dev_settings_dict
from broker.engines.checks import (
    CrlCheck,
    DirectChecks,
    PostgresRoleCheck,
    Verdict,
    check_name,
    role_answer,
)
from broker.engines.role import DatabaseCheck, RoleSettings
from broker.errors import UpstreamUnavailable
from broker.vault.crl import Crl, format_serial, parse_serial, pki_mount, revoked_serials


@dataclass(frozen=True)
class Lease:
    lease_id: str = "l-1"
    role: str = "web-cert"
    vault_path: str | None = "pki/issue/web"
    credential_ref: dict[str, str] | None = None


# -- serials ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, number", [
    ("1a:2b:3c", 0x1A2B3C),
    ("1A-2B-3C", 0x1A2B3C),
    ("01:02", 0x0102),
    ("1:2", 0x0102),  # a pair written without its leading zero is still a pair
    ("1a2b3c", 0x1A2B3C),
    ("0x1a2b3c", 0x1A2B3C),
    (" 1a:2b ", 0x1A2B),
    (0x1A2B3C, 0x1A2B3C),
    ("00", 0),
])
def test_a_serial_reads_the_same_in_every_form(text: Any, number: int) -> None:
    assert parse_serial(text) == number


@pytest.mark.parametrize("bad", [
    "", "zz:11", "1a::2b", ":1a", "1a:", "abc:1", "1a:2b-3c:", "-5", -5, True, None, 1.5,
    "ff" * 22, 1 << 200, [1],
])
def test_anything_else_is_no_serial(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_serial(bad)


@given(st.integers(min_value=0, max_value=(1 << 160) - 1))
def test_vault_form_round_trips(number: int) -> None:
    text = format_serial(number)
    assert parse_serial(text) == number
    assert parse_serial(text.upper().replace(":", "-")) == number
    assert parse_serial(text.replace(":", "")) == number


def test_format_is_vaults() -> None:
    assert format_serial(0x1A2B3C) == "1a:2b:3c"
    assert format_serial(0) == "00"


# -- the mount from the credential path --------------------------------------------------

@pytest.mark.parametrize("path, mount", [
    ("pki/issue/web", "pki"),
    ("pki/sign/web", "pki"),
    ("team/pki/issue/web", "team/pki"),
    ("/pki/issue/web/", "pki"),
    ("issue/issue/web", "issue"),  # a mount may be named like the verb
    ("pki/issue", None),
    ("database/creds/dev-db", None),
    ("issue/web", None),
    ("", None),
    ("pki//issue/web", None),
])
def test_the_pki_mount_comes_from_the_path(path: str, mount: str | None) -> None:
    assert pki_mount(path) == mount


# -- a CRL -------------------------------------------------------------------------------

def crl_pem(serials: list[int]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
               .last_update(now).next_update(now + timedelta(hours=1)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_a_crl_lists_its_serials() -> None:
    assert revoked_serials(crl_pem([0x1A2B, 7])) == {0x1A2B, 7}
    assert revoked_serials(crl_pem([])) == frozenset()


@pytest.mark.parametrize("bad", [
    "", "not a crl", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----",
])
def test_anything_else_is_no_crl(bad: str) -> None:
    with pytest.raises(ValueError):
        revoked_serials(bad)


class FakeCrl:
    def __init__(self, serials: set[int] | None = None, fail: bool = False) -> None:
        self.serials = serials or set()
        self.fail = fail
        self.asked: list[str] = []

    async def revoked(self, mount: str) -> frozenset[int]:
        self.asked.append(mount)
        if self.fail:
            raise UpstreamUnavailable("Vault is unreachable; retry shortly")
        return frozenset(self.serials)


async def test_a_serial_on_the_crl_is_gone_one_not_on_it_is_valid() -> None:
    crl = FakeCrl({0x1A2B})
    check = CrlCheck(crl)  # type: ignore[arg-type]
    assert await check.gone(Lease(credential_ref={"serial_number": "1a:2b"})) is True
    assert await check.gone(Lease(credential_ref={"serial_number": "1a:2c"})) is False
    assert crl.asked == ["pki", "pki"]


@pytest.mark.parametrize("lease", [
    Lease(credential_ref=None),
    Lease(credential_ref={}),
    Lease(credential_ref={"serial_number": "not hex"}),
    Lease(vault_path=None, credential_ref={"serial_number": "1a:2b"}),
    Lease(vault_path="database/creds/x", credential_ref={"serial_number": "1a:2b"}),
])
async def test_without_a_serial_or_a_mount_the_crl_cannot_tell(lease: Lease) -> None:
    crl = FakeCrl({0x1A2B})
    assert await CrlCheck(crl).gone(lease) is None  # type: ignore[arg-type]
    assert crl.asked == []


async def test_an_unreadable_crl_cannot_tell() -> None:
    check = CrlCheck(FakeCrl(fail=True))  # type: ignore[arg-type]
    assert await check.gone(Lease(credential_ref={"serial_number": "1a:2b"})) is None


# -- the database checker's setting ---------------------------------------------------------

def db_role(**check: Any) -> RoleSettings:
    return RoleSettings(engine="database", mount="database", vault_role="app",
                        check=check or None)


def test_a_database_role_takes_a_read_only_checker() -> None:
    role = db_role(url="postgresql://checker@db.internal:5433/postgres?sslmode=require",
                   password="s3cret-value")
    assert role.check is not None
    assert role.check.where == "checker@db.internal:5433"
    assert "s3cret-value" not in repr(role) and "s3cret-value" not in str(role.check)
    assert check_name(role) == "database"
    assert check_name(db_role()) is None


def dev_config(check: dict[str, Any]) -> dict[str, Any]:
    data = dev_settings_dict(
        vault_addr="http://127.0.0.1:8200", broker_token="s.brokerTokenValue1234567890",
        issuer="https://issuer.example", jwks_uri="https://issuer.example/jwks.json",
        store_url="sqlite:///broker.db", admin_token_sha256="ab" * 32, with_database=True)
    data["roles"]["dev-db"]["check"] = check
    return data


def test_the_checker_password_comes_from_the_environment() -> None:
    settings = load_settings(
        dev_config({"url": "postgresql://checker@db/postgres", "password": "${PG_CHECKER_PW}"}),
        env={"PG_CHECKER_PW": "from-the-env"})
    check = settings.roles["dev-db"].check
    assert check is not None and check.password is not None
    assert check.password.get_secret_value() == "from-the-env"
    assert "from-the-env" not in repr(settings)
    with pytest.raises(ConfigError, match="PG_CHECKER_PW"):
        load_settings(dev_config({"url": "postgresql://checker@db/postgres",
                                  "password": "${PG_CHECKER_PW}"}), env={})


@pytest.mark.parametrize("url, says", [
    ("postgresql://checker:hunter22@db/postgres", "check.password"),
    ("mysql://checker@db/mysql", "postgresql://"),
    ("postgresql:///postgres", "host"),
    ("postgresql://db/postgres", "user"),
    ("postgresql://checker@db:notaport/postgres", "URL like"),
    ("postgresql://checker@db/postgres?password=hunter22", "sets password"),
    ("postgresql://checker@db/postgres?sslmode=require&PassWord=hunter22", "sets password"),
    ("postgresql://checker@db/postgres?host=replica.internal", "sets host"),
    ("postgresql://checker@db/postgres?hostaddr=10.0.0.9&port=6432", "sets hostaddr, port"),
    ("postgresql://checker@db/postgres?user=postgres", "sets user"),
    ("postgresql://checker@db/postgres?service=other", "sets service"),
    ("postgresql://checker@db1,db2/postgres", "one host"),
])
def test_a_bad_checker_url_is_refused_without_echoing_a_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(dev_config({"url": url}))
    lines = str(info.value).splitlines()
    assert lines[1].startswith("  roles.dev-db.check.url: ")
    assert says in lines[1]
    assert "hunter22" not in str(info.value)


def test_a_checker_url_may_set_other_connection_options() -> None:
    check = DatabaseCheck(url="postgresql://checker@db/postgres?sslmode=verify-full"
                          "&sslrootcert=/etc/ca.pem&application_name=broker-check",
                          expect_role="vault_orders")
    assert check.where == "checker@db:5432" and check.expect_role == "vault_orders"
    with pytest.raises(ValidationError):
        DatabaseCheck(url="postgresql://checker@db/postgres", expect_role="")


def test_only_a_database_role_takes_a_check() -> None:
    with pytest.raises(ValidationError, match="only a database role"):
        RoleSettings(engine="pki", mount="pki", vault_role="web",
                     params={"common_name": "{workload}.example"},
                     check={"url": "postgresql://checker@db/postgres"})


def test_the_checker_refuses_unknown_keys_and_a_silly_timeout() -> None:
    with pytest.raises(ValidationError):
        DatabaseCheck(url="postgresql://checker@db/postgres", dsn="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DatabaseCheck(url="postgresql://checker@db/postgres", timeout_s=0)


async def test_an_unreachable_checker_cannot_tell(caplog: pytest.LogCaptureFixture) -> None:
    check = PostgresRoleCheck(DatabaseCheck(url="postgresql://checker@127.0.0.1:1/postgres",
                                            password="pw-never-logged", timeout_s=2))
    assert await check.gone(Lease(role="app-db", credential_ref={"username": "v-x"})) is None
    assert "pw-never-logged" not in caplog.text
    assert await check.gone(Lease(role="app-db", credential_ref=None)) is None


# -- dispatch ------------------------------------------------------------------------------

class Answer:
    def __init__(self, name: str, answer: bool | None) -> None:
        self.name = name
        self.answer = answer
        self.asked: list[str] = []

    async def gone(self, lease: Any) -> bool | None:
        self.asked.append(lease.lease_id)
        return self.answer


async def test_dispatch_goes_by_the_lease_role_to_its_engines_check() -> None:
    roles = {
        "web-cert": RoleSettings(engine="pki", mount="pki", vault_role="web",
                                 params={"common_name": "{workload}.example"}),
        "app-db": db_role(url="postgresql://checker@db/postgres"),
        "plain-db": db_role(),
        "kv": RoleSettings(engine="kv", mount="secret", vault_role="unused",
                           params={"path": "apps/{workload}"}),
    }
    checks = DirectChecks(roles, vault=None)  # type: ignore[arg-type]
    assert checks.check_for(Lease(role="web-cert")).name == "crl"  # type: ignore[union-attr]
    assert checks.check_for(Lease(role="app-db")).name == "database"  # type: ignore[union-attr]
    for role in ("plain-db", "kv", "no-longer-configured"):
        assert checks.check_for(Lease(role=role)) is None
        assert await checks.gone(Lease(role=role)) == Verdict(None, "direct")
    assert await checks.gone(Lease(role="kv")) == Verdict(None, "direct")
    fake = Answer("crl", True)
    checks._by_role["web-cert"] = fake
    # the answer carries the name of the check that gave it: the audit's confirmed_by
    assert await checks.gone(Lease(lease_id="l-9", role="web-cert")) == Verdict(True, "crl")
    assert fake.asked == ["l-9"]
    checks._by_role["app-db"] = Answer("database", False)
    assert await checks.gone(Lease(role="app-db")) == Verdict(False, "database")
    assert await checks.gone(Lease(role="kv")) == Verdict(None, "direct")
    await checks.close()


# -- the CRL is fetched once per mount for a few seconds --------------------------------------

class CrlVault:
    def __init__(self, pem: str) -> None:
        self.pem, self.calls, self.fail = pem, [], False

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        self.calls.append(path)
        await asyncio.sleep(0)
        if self.fail:
            raise UpstreamUnavailable("Vault is unreachable; retry shortly")
        return {"data": {"certificate": self.pem}}


async def test_a_crl_is_fetched_once_per_mount_while_it_is_fresh() -> None:
    vault = CrlVault(crl_pem([0x1A2B]))
    now = [100.0]
    crl = Crl(vault, max_age_s=5, monotonic=lambda: now[0])  # type: ignore[arg-type]
    # many lost leases of one mount at once: one download
    got = await asyncio.gather(*(crl.revoked("pki") for _ in range(10)))
    assert all(serials == {0x1A2B} for serials in got)
    assert vault.calls == ["/v1/pki/cert/crl"]
    await crl.revoked("team/pki")
    assert vault.calls == ["/v1/pki/cert/crl", "/v1/team/pki/cert/crl"]
    now[0] += 4.9
    await crl.revoked("pki")
    assert len(vault.calls) == 2
    now[0] += 0.2  # stale: fetched again
    vault.pem = crl_pem([0x1A2B, 7])
    assert await crl.revoked("pki") == {0x1A2B, 7}
    assert len(vault.calls) == 3


async def test_a_failed_crl_fetch_is_not_remembered() -> None:
    vault = CrlVault(crl_pem([7]))
    vault.fail = True
    crl = Crl(vault, monotonic=lambda: 0.0)  # type: ignore[arg-type]
    with pytest.raises(UpstreamUnavailable):
        await crl.revoked("pki")
    vault.fail = False
    assert await crl.revoked("pki") == {7}
    assert len(vault.calls) == 2


# -- what PostgreSQL's answer means ---------------------------------------------------------

@pytest.mark.parametrize("in_recovery", [False, True])
@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("control", [None, False, True])
def test_only_the_primary_with_no_such_role_in_any_case_says_gone(
        in_recovery: bool, exists: bool, control: bool | None) -> None:
    answer = role_answer(in_recovery, exists, control)
    if in_recovery or control is False:
        assert answer is None  # a replica, or not the server the logins live on
    else:
        assert answer is (not exists)
