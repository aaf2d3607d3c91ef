"""PKI through the broker on a real OpenBao, on a PKI mount of this module's own: ``issue``
(Vault makes the key) and ``sign`` (the workload's CSR, made by ``openssl req``; the key
stays with it). Certificates carry exactly the templated names and chain to the mount's
CA (``openssl verify``); a CSR asking for another name is refused by the broker, a
templated name outside the Vault role by Vault (a clear 502, the lease recorded failed);
terminating the instance puts every certificate's serial on the mount's CRL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness.api import issue, terminate
from tests.harness.pki import (
    PKI_PARAMS,
    Mount,
    build_csr,
    fetch_crl,
    mounted_pki,
    openssl_csr,
    openssl_verify,
    pki_role,
    serial_of,
    tampered,
)
from tests.harness.vault import VaultProbe

CN = "payments.workload.internal"
NAMES = (CN, (("DNS", "payments.svc.internal"), ("DNS", CN),
              ("URI", "spiffe://td.test/payments")))
ISSUED = {"certificate", "private_key", "private_key_type", "ca_chain", "issuing_ca",
          "serial_number", "expiration"}
SIGNED = ISSUED - {"private_key", "private_key_type"}
TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")


@pytest.fixture(scope="module")
def pki(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_pki(vault, {"issue": pki_role(), "sign": pki_role(key_type="any",
                                                                   key_bits=0)}) as mount:
        yield mount


def _roles(mount: str) -> dict[str, dict[str, Any]]:
    common = {"engine": "pki", "mount": mount, "default_ttl": "10m", "max_ttl": "1h"}
    outside = {"common_name": "{workload}.elsewhere.example"}
    return {
        "pki-issue": {**common, "mode": "issue", "vault_role": "issue", "params": PKI_PARAMS},
        "pki-sign": {**common, "mode": "sign", "vault_role": "sign", "params": PKI_PARAMS},
        "pki-issue-outside": {**common, "mode": "issue", "vault_role": "issue",
                              "params": outside},
        "pki-sign-outside": {**common, "mode": "sign", "vault_role": "sign", "params": outside},
    }


@pytest.fixture
async def b(make_broker, pki: Mount):
    return await make_broker(extra_roles=_roles(pki.path), instance_policies=(pki.policy,))








def _names(cert: x509.Certificate) -> tuple[str, tuple[tuple[str, str], ...]]:
    [cn] = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    sans = [("DNS", n) for n in san.get_values_for_type(x509.DNSName)]
    sans += [("URI", n) for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
    sans += [("IP", str(n)) for n in san.get_values_for_type(x509.IPAddress)]
    sans += [("email", n) for n in san.get_values_for_type(x509.RFC822Name)]
    return str(cn.value), tuple(sorted(sans))


def _dump(b) -> str:
    return repr([b.rows(t) for t in TABLES])


def _lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - datetime.now(UTC)


async def test_issue_mode_returns_a_generated_key_and_a_certificate_with_the_templated_names(
        b, pki, http, vault, tmp_path: Path):
    status, cred = await issue(http, b, "i-pki-issue", "pki-issue", ttl="5m")
    assert status == 201, cred
    assert (cred["kind"], cred["role"], cred["leased"], cred["renewable"]) == (
        "x509_certificate", "pki-issue", True, False)
    data = cred["data"]
    assert set(data) == ISSUED
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    assert _names(cert) == NAMES
    assert openssl_verify(pki.ca_pem, data["certificate"], tmp_path) == (0, "CERT: OK\n")
    key = serialization.load_pem_private_key(data["private_key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and data["private_key_type"] == "ec"
    assert key.public_key() == cert.public_key()
    assert data["issuing_ca"].strip() == pki.ca_pem.strip()
    assert serial_of(data["serial_number"]) == cert.serial_number
    assert timedelta(minutes=4, seconds=50) < _lifetime(cert) <= timedelta(minutes=5)
    assert abs(datetime.fromisoformat(cred["expires_at"]) - cert.not_valid_after_utc) < \
        timedelta(seconds=5)

    [lease] = b.rows("leases")
    assert (lease["state"], lease["kind"]) == ("active", "x509_certificate")
    assert lease["vault_lease_id"].startswith(f"{pki.path}/issue/issue/")
    assert vault.lease_exists(lease["vault_lease_id"])
    assert data["private_key"] not in _dump(b)


@pytest.mark.parametrize("key,cn,sans", [
    ("ec-p256", CN, ()),
    ("rsa-2048", CN, ("DNS:payments.svc.internal", f"DNS:{CN}", "URI:spiffe://td.test/payments")),
    ("ed25519", None, ()),
], ids=["ec-p256-cn-only", "rsa-2048-every-templated-name", "ed25519-no-names"])
async def test_sign_mode_signs_the_workloads_csr_with_the_templated_names(
        b, pki, http, vault, tmp_path: Path, key, cn, sans):
    csr_pem, key_file = openssl_csr(tmp_path, key, cn=cn, sans=sans)
    status, cred = await issue(http, b, f"i-pki-sign-{key}", "pki-sign", ttl="5m", csr=csr_pem)
    assert status == 201, cred
    assert (cred["kind"], cred["leased"], cred["renewable"]) == ("x509_certificate", True, False)
    data = cred["data"]
    assert set(data) == SIGNED  # no private key: it never left the workload
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    # Whatever the CSR asked for (within the role), the certificate has the role's names.
    assert _names(cert) == NAMES
    workload_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert cert.public_key() == workload_key.public_key()
    assert openssl_verify(pki.ca_pem, data["certificate"], tmp_path) == (0, "CERT: OK\n")
    assert timedelta(minutes=4, seconds=50) < _lifetime(cert) <= timedelta(minutes=5)

    [lease] = b.rows("leases")
    assert lease["state"] == "active"
    assert lease["vault_lease_id"].startswith(f"{pki.path}/sign/sign/")
    assert vault.lease_exists(lease["vault_lease_id"])


async def test_sign_mode_ttl_is_capped_by_the_role(b, http, tmp_path: Path):
    csr_pem, _ = openssl_csr(tmp_path, cn=CN)
    status, cred = await issue(http, b, "i-pki-cap", "pki-sign", ttl="3h", csr=csr_pem)
    assert status == 201, cred
    cert = x509.load_pem_x509_certificate(cred["data"]["certificate"].encode())
    assert timedelta(minutes=59) < _lifetime(cert) <= timedelta(hours=1)


MAY_ASK = ("a CSR may ask only for CN payments.svc.internal, CN payments.workload.internal, "
           "DNS payments.svc.internal, DNS payments.workload.internal, "
           "URI spiffe://td.test/payments, or for no names at all (the certificate gets the "
           "role's names either way)")


def _refused(kinds: str) -> str:
    return f"csr: it asks for {kinds} names this role does not issue; {MAY_ASK}"


@pytest.mark.parametrize("make,message", [
    (lambda d: openssl_csr(d, cn=CN, sans=[f"DNS:{CN}", "DNS:evil.example"])[0],
     _refused("DNS")),
    (lambda d: openssl_csr(d, cn="admin.workload.internal")[0], _refused("CN")),
    (lambda d: openssl_csr(d, cn=CN, sans=["IP:127.0.0.1"])[0], _refused("IP")),
    (lambda d: openssl_csr(d, sans=["URI:spiffe://td.test/billing"])[0], _refused("URI")),
    (lambda d: openssl_csr(d, sans=["email:payments@workload.internal"])[0], _refused("email")),
    (lambda d: tampered(build_csr(cn=CN), b"payments.workload", b"paymentz.workload"),
     "csr: the CSR's signature does not verify with its own public key"),
    (lambda d: openssl_csr(d, cn=CN)[1].read_text(),
     "csr: expected exactly one PEM block '-----BEGIN CERTIFICATE REQUEST-----' "
     "(this is a private key: send a CSR, keep the key)"),
], ids=["extra-san", "wrong-cn", "ip-san", "other-spiffe-id", "email-san", "bad-signature",
        "private-key-instead"])
async def test_sign_mode_refuses_a_csr_the_role_does_not_cover_and_changes_nothing(
        b, pki, http, vault, tmp_path: Path, make, message):
    sent = make(tmp_path)
    store_before, vault_before = b.store_snapshot(), vault.snapshot()
    leases_before = vault.leases_under(f"{pki.path}/sign/sign/")
    status, body = await issue(http, b, "i-pki-bad-csr", "pki-sign", csr=sent)
    assert (status, body) == (400, {"error": {"code": "invalid_parameter", "message": message}})
    assert b.store_snapshot() == store_before
    assert vault.snapshot() == vault_before
    assert vault.leases_under(f"{pki.path}/sign/sign/") == leases_before


@pytest.mark.parametrize("role,body,status,error", [
    ("pki-sign", {}, 400, {"code": "missing_parameter",
                           "message": "this role needs csr in the request"}),
    ("pki-issue", {"csr": "x"}, 400, {
        "code": "unknown_parameter",
        "message": "role 'pki-issue' does not take csr from a request (it takes: role, ttl)"}),
], ids=["sign-without-csr", "issue-with-csr"])
async def test_csr_is_required_by_sign_and_refused_by_issue(b, http, role, body, status, error):
    got = await issue(http, b, "i-pki-params", role, **body)
    assert got == (status, {"error": error})


@pytest.mark.parametrize("role", ["pki-issue-outside", "pki-sign-outside"],
                         ids=["issue", "sign"])
async def test_vault_role_refuses_a_templated_name_outside_its_domains(
        b, pki, http, vault, tmp_path: Path, role):
    csr_pem, _ = openssl_csr(tmp_path)  # a CSR with no names: the broker's check passes
    body = {"csr": csr_pem} if role.endswith("sign-outside") else {}
    vault_role = "sign" if body else "issue"
    leases_before = vault.leases_under(f"{pki.path}/{vault_role}/{vault_role}/")
    status, answer = await issue(http, b, f"i-{role}", role, **body)
    assert (status, answer) == (502, {"error": {"code": "vault_invalid_request",
                                                "message": "Vault refused the request"}})
    [lease] = b.rows("leases")
    assert (lease["role"], lease["state"], lease["error_code"], lease["vault_lease_id"]) == (
        role, "failed", "vault_invalid_request", None)
    assert vault.leases_under(f"{pki.path}/{vault_role}/{vault_role}/") == leases_before
    status_ok, _ = await issue(http, b, f"i-{role}", role.removesuffix("-outside"), **body)
    assert status_ok == 201  # the same instance still gets a certificate from a good role


async def test_terminating_the_instance_puts_its_certificates_on_the_crl(
        b, pki, http, vault, tmp_path: Path):
    instance = "i-pki-crl"
    csr_pem, _ = openssl_csr(tmp_path, cn=CN)
    serials, pems = [], []
    for role, body in (("pki-issue", {}), ("pki-sign", {"csr": csr_pem})):
        status, cred = await issue(http, b, instance, role, **body)
        assert status == 201, cred
        serials.append(serial_of(cred["data"]["serial_number"]))
        pems.append(cred["data"]["certificate"])
    ca = x509.load_pem_x509_certificate(pki.ca_pem.encode())
    crl = x509.load_pem_x509_crl(fetch_crl(vault, pki.path).encode())
    assert [crl.get_revoked_certificate_by_serial_number(s) for s in serials] == [None, None]
    for pem in pems:
        assert openssl_verify(pki.ca_pem, pem, tmp_path, fetch_crl(vault, pki.path)) == (
            0, "CERT: OK\n")

    shown = await terminate(http, b, instance)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked", "revoked"]
    assert not any(vault.lease_exists(x["vault_lease_id"]) for x in b.rows("leases"))

    crl_pem = fetch_crl(vault, pki.path)
    crl = x509.load_pem_x509_crl(crl_pem.encode())
    assert crl.is_signature_valid(ca.public_key())
    revoked = [crl.get_revoked_certificate_by_serial_number(s) for s in serials]
    assert [r.serial_number for r in revoked if r is not None] == serials
    for pem in pems:
        rc, out = openssl_verify(pki.ca_pem, pem, tmp_path, crl_pem)
        assert (rc, out.splitlines()[1:]) == (2, ["error 23 at 0 depth lookup: certificate revoked",
                                                  "error CERT: verification failed"])
    status, body = await issue(http, b, instance, "pki-sign", csr=csr_pem)
    assert (status, body["error"]["code"]) == (409, "instance_terminated")
