"""PKI and SSH engines: the Vault request each mode builds, what of Vault's answer reaches
the caller, and the checks of what a caller sends: a CSR (valid PEM, self-signed by an
accepted key, bounded, asking for no name the role does not template) and an OpenSSH
public key (one line of an accepted type, bounded)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificateBuilder,
    SSHCertificateType,
)
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from broker.engines import ENGINES, read_caller_params
from broker.engines.pki import MAX_CSR_BYTES, Csr, allowed_names, read_csr
from broker.engines.role import RoleSettings
from broker.engines.ssh import MAX_PUBLIC_KEY_BYTES, read_public_key
from broker.errors import BadRequest
from broker.identity.model import Identity
from broker.policy import render_params
from tests.harness.pki import (
    PKI_PARAMS,
    build_csr,
    duplicate_san_csr,
    self_signed_certificate,
    tampered,
)

PKI = ENGINES["pki"]
SSH = ENGINES["ssh"]
RENDERED = {"common_name": "payments.workload.internal", "alt_names": "payments.svc.internal",
            "uri_sans": "spiffe://td.test/payments"}
MAY_ASK = ("a CSR may ask only for CN payments.svc.internal, CN payments.workload.internal, "
           "DNS payments.svc.internal, DNS payments.workload.internal, "
           "URI spiffe://td.test/payments, or for no names at all (the certificate gets the "
           "role's names either way)")
SSH_PARAMS = {"valid_principals": "{workload}", "key_id": "{issuer_name}:{instance_id}"}


def pki_role(mode: str | None = None, **kw: Any) -> RoleSettings:
    return RoleSettings(engine="pki", mode=mode, mount="pki", vault_role="workload",
                        params=kw.pop("params", PKI_PARAMS), **kw)


def ssh_role(**kw: Any) -> RoleSettings:
    return RoleSettings(engine="ssh", mount="ssh", vault_role="workload",
                        params=kw.pop("params", SSH_PARAMS), **kw)


def identity(workload: str = "payments", instance_id: str = "i-1") -> Identity:
    return Identity(issuer_name="dev", issuer="https://issuer.example", subject=workload,
                    instance_id=instance_id, workload=workload,
                    issued_at=datetime(2024, 1, 1, tzinfo=UTC),
                    expires_at=datetime(2024, 1, 1, 1, tzinfo=UTC), claims={})


def openssh(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


# -- PKI: modes, requests, answers ------------------------------------------------------------

def test_pki_modes_issue_is_the_default_and_sign_takes_a_csr():
    assert (PKI.name, PKI.kind, list(PKI.modes)) == ("pki", "x509_certificate", ["issue", "sign"])
    issue, sign = PKI.modes["issue"], PKI.modes["sign"]
    assert issue.templates == sign.templates == {"common_name", "alt_names", "uri_sans"}
    assert issue.required_templates == sign.required_templates == {"common_name"}
    assert (dict(issue.caller), issue.required_caller) == ({}, frozenset())
    assert (set(sign.caller), sign.required_caller) == ({"csr"}, {"csr"})
    assert issue.leased and sign.leased
    assert PKI.mode(pki_role()) is issue


def test_pki_templates_render_from_the_identity():
    assert render_params(PKI_PARAMS, identity()) == RENDERED


def test_pki_issue_request_sends_the_templated_names():
    req = PKI.request(pki_role(), RENDERED, {}, 300)
    assert (req.method, req.path, req.ttl_applied) == ("POST", "pki/issue/workload", True)
    assert req.body == {"common_name": "payments.workload.internal", "ttl": "300s",
                        "format": "pem", "exclude_cn_from_sans": False,
                        "alt_names": "payments.svc.internal",
                        "uri_sans": "spiffe://td.test/payments"}


def test_pki_sign_request_sends_the_csr_with_the_templated_names_not_the_csrs():
    role = pki_role("sign")
    csr = read_csr(build_csr(cn="payments.workload.internal"))
    req = PKI.request(role, RENDERED, {"csr": csr}, 600)
    assert (req.method, req.path, req.ttl_applied) == ("POST", "pki/sign/workload", True)
    assert req.body == {"csr": csr.pem, "common_name": "payments.workload.internal",
                        "ttl": "600s", "format": "pem", "exclude_cn_from_sans": False,
                        "alt_names": "payments.svc.internal",
                        "uri_sans": "spiffe://td.test/payments"}


def test_pki_request_normalises_comma_lists():
    params = {"common_name": "a.workload.internal",
              "alt_names": "b.workload.internal, c.workload.internal",
              "uri_sans": "spiffe://td/a ,spiffe://td/b"}
    body = PKI.request(pki_role(), params, {}, 60).body
    assert (body["alt_names"], body["uri_sans"]) == (
        "b.workload.internal,c.workload.internal", "spiffe://td/a,spiffe://td/b")


VAULT_ANSWER = {"certificate": "C", "private_key": "K", "private_key_type": "ec",
                "ca_chain": ["A"], "issuing_ca": "A", "serial_number": "01", "expiration": 5,
                "not_before": 4, "unexpected": "dropped"}


@pytest.mark.parametrize("mode,expected", [
    ("issue", {"certificate": "C", "private_key": "K", "private_key_type": "ec",
               "ca_chain": ["A"], "issuing_ca": "A", "serial_number": "01", "expiration": 5}),
    ("sign", {"certificate": "C", "ca_chain": ["A"], "issuing_ca": "A", "serial_number": "01",
              "expiration": 5}),
], ids=["issue-keeps-the-generated-key", "sign-never-passes-a-key-on"])
def test_pki_shape(mode, expected):
    assert PKI.shape(pki_role(mode), VAULT_ANSWER) == expected


@pytest.mark.parametrize("kw,message", [
    ({"mode": "sign", "request_params": ()},
     "request_params: engine pki needs csr from the caller"),
    ({"mode": "issue", "request_params": ("csr",)},
     "request_params: engine pki lets a caller send nothing; got csr"),
    ({"params": {"alt_names": "x.workload.internal"}}, "params: engine pki needs common_name"),
    ({"params": {**PKI_PARAMS, "ip_sans": "10.0.0.1"}},
     "params: engine pki takes no ip_sans (allowed: alt_names, common_name, uri_sans)"),
    ({"params": {**PKI_PARAMS, "alt_names": "a.workload.internal,"}},
     "params.alt_names: a comma-separated list without empty entries"),
    ({"params": {**PKI_PARAMS, "uri_sans": "{workload}"}},
     "params.uri_sans: each entry must be a URI, e.g. spiffe://td/{workload}"),
    ({"params": {**PKI_PARAMS, "uri_sans": "spiffe://td/a b"}},
     "params.uri_sans: each entry must be a URI, e.g. spiffe://td/{workload}"),
], ids=["sign-without-csr", "issue-with-csr", "no-common-name", "ip-sans", "empty-alt-name",
        "uri-without-scheme", "uri-with-space"])
def test_pki_role_is_checked_at_load_time(kw, message):
    with pytest.raises(ValidationError) as err:
        pki_role(**kw)
    assert message in str(err.value)


# -- PKI: the CSR a caller sends ------------------------------------------------------------

@pytest.mark.parametrize("key,names", [
    (ec.generate_private_key(ec.SECP256R1()), {"cn": "payments.workload.internal"}),
    (ec.generate_private_key(ec.SECP384R1()), {}),
    (rsa.generate_private_key(65537, 2048),
     {"cn": "payments.workload.internal", "dns": ["payments.svc.internal"]}),
    (ed25519.Ed25519PrivateKey.generate(), {"uris": ["spiffe://td.test/payments"]}),
], ids=["ec-p256-cn", "ec-p384-no-names", "rsa-2048-cn-dns", "ed25519-uri"])
def test_csr_that_parses_and_verifies_is_read_with_its_names(key, names):
    pem = build_csr(key=key, **names)
    csr = read_csr(pem)
    expected = {("CN", names["cn"])} if "cn" in names else set()
    expected |= {("DNS", n) for n in names.get("dns", ())}
    expected |= {("URI", n) for n in names.get("uris", ())}
    assert csr == Csr(pem=pem.strip() + "\n", names=frozenset(expected))


def test_csr_names_of_every_kind_are_read():
    pem = build_csr(cn="a", dns=["b"], ips=["10.0.0.1", "::1"], uris=["spiffe://td/c"],
                    emails=["d@e.example"])
    assert read_csr(pem).names == {("CN", "a"), ("DNS", "b"), ("IP", "10.0.0.1"), ("IP", "::1"),
                                   ("URI", "spiffe://td/c"), ("email", "d@e.example")}


def test_csr_with_surrounding_whitespace_and_the_old_pem_label_is_read():
    pem = build_csr(cn="payments.workload.internal")
    old = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    assert read_csr("\n  " + old + "\n\n").names == {("CN", "payments.workload.internal")}


def _good() -> str:
    return build_csr(cn="payments.workload.internal")


def _oversize() -> str:
    # Valid and well signed, only too big: 300 names.
    return build_csr(cn="payments.workload.internal",
                     dns=[f"n{i}.payments.workload.internal" for i in range(300)])


def _bad_version() -> str:
    der = x509.load_pem_x509_csr(_good().encode()).public_bytes(serialization.Encoding.DER)
    version = der.index(b"\x02\x01\x00")  # the first INTEGER: the CSR's version, 0
    bad = der[:version] + b"\x02\x01\x0e" + der[version + 3:]
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bad).decode() + \
        "-----END CERTIFICATE REQUEST-----"


def _private_key() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


def _certificate() -> str:
    return self_signed_certificate(ec.generate_private_key(ec.SECP256R1()))


NOT_ONE_PEM = "expected exactly one PEM block '-----BEGIN CERTIFICATE REQUEST-----'"
NOT_A_CSR = "not a valid PEM certificate signing request"
KEY_REFUSED = ("the CSR's key type is not accepted; use RSA 2048-8192 bits, ECDSA "
               "P-256/P-384/P-521 or Ed25519")


@pytest.mark.parametrize("make,message", [
    (lambda: 42, "expected a PEM certificate signing request as a non-empty string"),
    (lambda: "", "expected a PEM certificate signing request as a non-empty string"),
    (lambda: " \n", "expected a PEM certificate signing request as a non-empty string"),
    (_oversize, f"too long (at most {MAX_CSR_BYTES} bytes)"),
    (lambda: "hello", NOT_ONE_PEM),
    (_private_key, NOT_ONE_PEM + " (this is a private key: send a CSR, keep the key)"),
    (_certificate, NOT_ONE_PEM),
    (lambda: _good() + _good(), NOT_ONE_PEM),
    (lambda: "subject: me\n" + _good(), NOT_ONE_PEM),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n"
             "-----END CERTIFICATE REQUEST-----", NOT_A_CSR),
    (lambda: _good().replace("-----\n", "-----\nAAAA", 1), NOT_A_CSR),
    (duplicate_san_csr, NOT_A_CSR),
    (_bad_version, NOT_A_CSR),
    (lambda: tampered(_good(), b"payments.workload", b"paymentz.workload"),
     "the CSR's signature does not verify with its own public key"),
    (lambda: build_csr(cn="payments.workload.internal",
                       key=rsa.generate_private_key(65537, 1024)), KEY_REFUSED),
    (lambda: build_csr(cn="payments.workload.internal",
                       key=dsa.generate_private_key(2048)), KEY_REFUSED),
    (lambda: build_csr(cn="payments.workload.internal",
                       key=ec.generate_private_key(ec.SECP256K1())), KEY_REFUSED),
], ids=["not-a-string", "empty", "blank", "oversize", "not-pem", "private-key", "certificate",
        "two-csrs", "text-before", "garbage-in-block", "corrupt-der", "duplicate-san-extension",
        "invalid-version", "bad-signature", "rsa-1024", "dsa", "secp256k1"])
def test_csr_that_is_not_one_valid_self_signed_pem_csr_is_refused(make, message):
    value = make()
    with pytest.raises(ValueError) as err:
        read_csr(value)
    assert str(err.value) == message
    if isinstance(value, str):  # nothing sent is echoed
        assert not [x for x in value.splitlines() if len(x) > 8 and not x.startswith("-----")
                    and x in str(err.value)]


def test_csr_at_the_size_bound_is_read_and_one_byte_more_is_refused():
    pem = _good().strip()
    padded = pem + "\n" * (MAX_CSR_BYTES - len(pem))
    assert read_csr(padded).pem == pem + "\n"
    with pytest.raises(ValueError, match="too long"):
        read_csr(padded + "\n")


def test_allowed_names_are_the_templated_ones():
    assert allowed_names(RENDERED) == {
        ("CN", "payments.workload.internal"), ("CN", "payments.svc.internal"),
        ("DNS", "payments.workload.internal"), ("DNS", "payments.svc.internal"),
        ("URI", "spiffe://td.test/payments")}
    assert allowed_names({"common_name": "Pay.Workload.Internal",
                          "alt_names": "ops@workload.internal"}) == {
        ("CN", "pay.workload.internal"), ("CN", "ops@workload.internal"),
        ("DNS", "pay.workload.internal"), ("email", "ops@workload.internal")}


@pytest.mark.parametrize("names", [
    {},
    {"cn": "payments.workload.internal"},
    {"cn": "payments.svc.internal"},
    {"cn": "PAYMENTS.workload.internal", "dns": ["Payments.Svc.Internal"]},
    {"cn": "payments.workload.internal",
     "dns": ["payments.workload.internal", "payments.svc.internal"],
     "uris": ["spiffe://td.test/payments"]},
], ids=["no-names", "cn", "cn-is-an-alt-name", "case-insensitive-dns", "every-templated-name"])
def test_csr_asking_only_for_templated_names_is_accepted(names):
    csr = read_csr(build_csr(**names))
    PKI.check_caller(pki_role("sign"), RENDERED, {"csr": csr})


@pytest.mark.parametrize("names,kinds", [
    ({"cn": "payments.workload.internal", "dns": ["evil.example"]}, "DNS"),
    ({"cn": "admin.workload.internal"}, "CN"),
    ({"cn": "billing.workload.internal", "dns": ["billing.workload.internal"]}, "CN, DNS"),
    ({"cn": "payments.workload.internal", "ips": ["10.0.0.1"]}, "IP"),
    ({"uris": ["spiffe://td.test/billing"]}, "URI"),
    ({"uris": ["SPIFFE://td.test/payments"]}, "URI"),
    ({"emails": ["payments@workload.internal"]}, "email"),
    ({"dns": ["*.workload.internal"]}, "DNS"),
    ({"dns": ["payments.workload.internal"], "ips": ["::1"], "uris": ["https://x"]},
     "IP, URI"),
], ids=["extra-dns-san", "wrong-cn", "other-workload", "ip-san", "other-spiffe-id",
        "uri-case-differs", "email-san", "wildcard", "several"])
def test_csr_asking_for_a_name_the_role_does_not_template_is_refused(names, kinds):
    csr = read_csr(build_csr(**names))
    with pytest.raises(ValueError) as err:
        PKI.check_caller(pki_role("sign"), RENDERED, {"csr": csr})
    assert str(err.value) == f"csr: it asks for {kinds} names this role does not issue; {MAY_ASK}"


def test_csr_with_an_other_name_kind_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    dirname = x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    pem = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([dirname]), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    csr = read_csr(pem)
    assert csr.names == {("other", "DirectoryName")}
    with pytest.raises(ValueError) as err:
        PKI.check_caller(pki_role("sign"), RENDERED, {"csr": csr})
    assert str(err.value) == f"csr: it asks for other names this role does not issue; {MAY_ASK}"


@pytest.mark.parametrize("role,body,code,message", [
    (pki_role("sign"), {"csr": "nope"}, "invalid_parameter", f"csr: {NOT_ONE_PEM}"),
    (pki_role("sign"), {}, "missing_parameter", "this role needs csr in the request"),
    (pki_role("issue"), {"csr": "x"}, "unknown_parameter",
     "role 'r' does not take csr from a request (it takes: role, ttl)"),
], ids=["invalid", "missing", "issue-mode-takes-none"])
def test_csr_reaches_the_caller_as_a_bad_request(role, body, code, message):
    with pytest.raises(BadRequest) as err:
        read_caller_params(PKI, "r", role, body)
    assert (err.value.status, err.value.code, err.value.message) == (400, code, message)


# -- SSH ------------------------------------------------------------------------------------

def test_ssh_engine_signs_user_certificates_without_a_lease():
    assert (SSH.name, SSH.kind, list(SSH.modes)) == ("ssh", "ssh_certificate", ["sign"])
    sign = SSH.modes["sign"]
    assert sign.templates == sign.required_templates == {"valid_principals", "key_id"}
    assert (set(sign.caller), sign.required_caller, sign.leased) == (
        {"public_key"}, {"public_key"}, False)


def test_ssh_request_sends_the_templated_principals_and_key_id():
    role = ssh_role()
    params = render_params(role.params, identity(instance_id="i-42"))
    key = openssh(ed25519.Ed25519PrivateKey.generate())
    req = SSH.request(role, params, {"public_key": key}, 300)
    assert (req.method, req.path, req.ttl_applied) == ("POST", "ssh/sign/workload", True)
    assert req.body == {"public_key": key, "cert_type": "user", "valid_principals": "payments",
                        "key_id": "dev:i-42", "ttl": "300s"}


def test_ssh_request_normalises_the_principal_list():
    role = ssh_role(params={"valid_principals": "{workload}, deploy", "key_id": "{instance_id}"})
    params = render_params(role.params, identity())
    body = SSH.request(role, params, {"public_key": "k"}, 60).body
    assert (body["valid_principals"], body["key_id"]) == ("payments,deploy", "i-1")


def _ssh_cert(valid_before: int) -> str:
    ca = ed25519.Ed25519PrivateKey.generate()
    user = ed25519.Ed25519PrivateKey.generate()
    cert = (SSHCertificateBuilder().public_key(user.public_key()).serial(7)
            .type(SSHCertificateType.USER).key_id(b"dev:i-1").valid_principals([b"payments"])
            .valid_after(0).valid_before(valid_before).sign(ca))
    return cert.public_bytes().decode() + "\n"


def test_ssh_shape_keeps_the_certificate_and_adds_its_expiry():
    signed = _ssh_cert(1_900_000_000)
    data = {"signed_key": signed, "serial_number": "a1b2", "issuer_id": "x", "other": 1}
    assert SSH.shape(ssh_role(), data) == {"signed_key": signed, "serial_number": "a1b2",
                                           "expiration": 1_900_000_000}
    assert SSH.expires_at(ssh_role(), data) == datetime.fromtimestamp(1_900_000_000, UTC)


@pytest.mark.parametrize("signed", [None, "", "garbage", "ssh-ed25519 AAAA"],
                         ids=["missing", "empty", "garbage", "not-a-certificate"])
def test_ssh_shape_without_a_readable_certificate_has_no_expiry(signed):
    data = {"signed_key": signed, "serial_number": "1"}
    assert SSH.shape(ssh_role(), data) == {"signed_key": signed, "serial_number": "1"}
    assert SSH.expires_at(ssh_role(), data) is None


def test_ssh_certificate_valid_forever_has_no_expiry_to_record():
    data = {"signed_key": _ssh_cert(2**64 - 1), "serial_number": "1"}
    assert SSH.shape(ssh_role(), data)["expiration"] == 2**64 - 1
    assert SSH.expires_at(ssh_role(), data) is None


@pytest.mark.parametrize("kw,message", [
    ({"params": {"valid_principals": "{workload}"}}, "params: engine ssh needs key_id"),
    ({"params": {"key_id": "{instance_id}"}}, "params: engine ssh needs valid_principals"),
    ({"params": {**SSH_PARAMS, "valid_principals": "{workload},"}},
     "params.valid_principals: a comma-separated list without empty entries"),
    ({"params": {**SSH_PARAMS, "key_id": "{workload},{instance_id}"}},
     "params.key_id: one key id, no commas"),
    ({"request_params": ()}, "request_params: engine ssh needs public_key from the caller"),
    ({"mode": "issue"}, "mode: engine ssh has modes sign; got 'issue'"),
], ids=["no-key-id", "no-principals", "empty-principal", "several-key-ids",
        "no-public-key", "no-such-mode"])
def test_ssh_role_is_checked_at_load_time(kw, message):
    with pytest.raises(ValidationError) as err:
        ssh_role(**kw)
    assert message in str(err.value)


_ED = openssh(ed25519.Ed25519PrivateKey.generate())


@pytest.mark.parametrize("make", [
    lambda: openssh(ed25519.Ed25519PrivateKey.generate()),
    lambda: openssh(ec.generate_private_key(ec.SECP256R1())),
    lambda: openssh(ec.generate_private_key(ec.SECP384R1())),
    lambda: openssh(ec.generate_private_key(ec.SECP521R1())),
    lambda: openssh(rsa.generate_private_key(65537, 2048)),
], ids=["ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048"])
def test_public_key_of_an_accepted_type_is_read(make):
    key = make()
    assert read_public_key(key) == key


@pytest.mark.parametrize("value", [
    _ED + " workload@host", _ED + " a comment with spaces\n", _ED + "\r\n", "  " + _ED + "  ",
], ids=["comment", "comment-and-newline", "crlf", "surrounding-spaces"])
def test_public_key_comment_and_line_end_are_dropped(value):
    assert read_public_key(value) == _ED


ACCEPTED = ("expected '<type> <base64> [comment]' with type one of ssh-ed25519, "
            "ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521, ssh-rsa "
            "(no authorized_keys options, no certificates)")


def _cert_line() -> str:
    return _ssh_cert(1_900_000_000).strip()


def _private_openssh() -> str:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()


@pytest.mark.parametrize("make,message", [
    (lambda: None, "expected an OpenSSH public key line as a non-empty string"),
    (lambda: "", "expected an OpenSSH public key line as a non-empty string"),
    (lambda: "ssh-ed25519 " + "A" * MAX_PUBLIC_KEY_BYTES,
     f"too long (at most {MAX_PUBLIC_KEY_BYTES} bytes)"),
    (_private_openssh,
     "this is a private key: send the public key (the .pub file), keep the key"),
    (lambda: _ED + "\n" + _ED, "expected a single line with no control characters"),
    (lambda: _ED.replace(" ", "\t"), "expected a single line with no control characters"),
    (lambda: _ED + " x\x00y", "expected a single line with no control characters"),
    (lambda: 'command="/bin/sh" ' + _ED, ACCEPTED),
    (_cert_line, ACCEPTED),
    (lambda: "ssh-dss AAAAB3NzaC1kc3MAAACBAP", ACCEPTED),
    (lambda: "sk-ssh-ed25519@openssh.com AAAA", ACCEPTED),
    (lambda: "ssh-ed25519", "expected '<type> <base64> [comment]'"),
    (lambda: "ssh-ed25519 AAAA!!!!", "not a valid ssh-ed25519 public key"),
    (lambda: "ssh-ed25519 " + openssh(rsa.generate_private_key(65537, 2048)).split()[1],
     "not a valid ssh-ed25519 public key"),
    (lambda: "ssh-ed25519 " + _ED.split()[1][:-8] + "AAAAAAA=",
     "not a valid ssh-ed25519 public key"),
    (lambda: openssh(rsa.generate_private_key(65537, 1024)), "RSA keys must have 2048-8192 bits"),
], ids=["not-a-string", "empty", "oversize", "private-key", "two-lines", "tab", "nul",
        "authorized-keys-options", "certificate", "dsa", "security-key", "type-only",
        "bad-base64", "type-mismatch", "truncated", "rsa-1024"])
def test_public_key_that_is_not_one_accepted_line_is_refused(make, message):
    value = make()
    with pytest.raises(ValueError) as err:
        read_public_key(value)
    assert str(err.value) == message
    if isinstance(value, str):  # nothing sent is echoed
        assert not [x for x in value.split() if len(x) > 20 and x in str(err.value)]


@pytest.mark.parametrize("body,code,message", [
    ({"public_key": "nope"}, "invalid_parameter", f"public_key: {ACCEPTED}"),
    ({}, "missing_parameter", "this role needs public_key in the request"),
    ({"public_key": _ED, "valid_principals": "root"}, "unknown_parameter",
     "role 'r' does not take valid_principals from a request (it takes: public_key, role, ttl)"),
], ids=["invalid", "missing", "principals-come-from-the-role"])
def test_public_key_reaches_the_caller_as_a_bad_request(body, code, message):
    with pytest.raises(BadRequest) as err:
        read_caller_params(SSH, "r", ssh_role(), body)
    assert (err.value.status, err.value.code, err.value.message) == (400, code, message)


def test_csr_name_that_only_unicode_folding_makes_templated_is_refused():
    # "\u212a" (KELVIN SIGN) lower-cases to "k": "\u212aafka" is not the name "kafka".
    rendered = {**RENDERED, "common_name": "kafka.workload.internal"}
    csr = read_csr(build_csr(cn="\u212aafka.workload.internal"))
    with pytest.raises(ValueError):
        PKI.check_caller(pki_role("sign"), rendered, {"csr": csr})


def test_public_key_with_a_compressed_ec_point_is_refused_not_a_crash():
    # cryptography cannot load a compressed point (NotImplementedError): a 400, not a 500.
    key = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAAAhAst3Cr"
           "Kz5C7ayTwbWpKQZk6r3oqtzZRrAlsPra5EzMC2")
    with pytest.raises(ValueError) as err:
        read_public_key(key)
    assert str(err.value) == "not a valid ecdsa-sha2-nistp256 public key"
