"""SSH through the broker on a real OpenBao, on an SSH CA mount of this module's own: the
workload sends a public key made by ``ssh-keygen``, and ``ssh-keygen -L`` on the signed
certificate shows the templated principals and key id, the mount's CA and a validity
window of the requested TTL. Vault signs without a lease, so the certificate is recorded
as delivered (not revocable, not counted against the lease limit); a principal outside
the Vault role's ``allowed_users`` is refused by Vault (a clear 502, recorded failed)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.harness.api import issue, terminate
from tests.harness.pki import Mount, mounted_ssh_ca, ssh_cert_info, ssh_fingerprint, ssh_keypair
from tests.harness.vault import VaultProbe

SSH_ROLE = {"key_type": "ca", "allow_user_certificates": True, "allow_host_certificates": False,
            "allowed_users": "payments,deploy", "allow_user_key_ids": True,
            "default_extensions": {"permit-pty": ""}, "allowed_extensions": "",
            "allowed_user_key_lengths": {"ed25519": [0], "ecdsa": [256, 384, 521],
                                         "rsa": [3072, 4096]},
            "ttl": "10m", "max_ttl": "1h"}
CERT_TYPES = {"ed25519": "ssh-ed25519-cert-v01@openssh.com",
              "ecdsa-p256": "ecdsa-sha2-nistp256-cert-v01@openssh.com",
              "rsa-3072": "ssh-rsa-cert-v01@openssh.com"}
RESPONSE_FIELDS = {"lease_id", "instance_id", "workload", "role", "kind", "data", "issued_at",
                   "expires_at", "renewable", "leased"}


@pytest.fixture(scope="module")
def ssh(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_ssh_ca(vault, {"user": SSH_ROLE}) as mount:
        yield mount


def _roles(mount: str) -> dict[str, dict[str, Any]]:
    common = {"engine": "ssh", "mount": mount, "vault_role": "user", "default_ttl": "10m",
              "max_ttl": "1h"}
    key_id = "{issuer_name}:{instance_id}"
    return {
        "ssh-user": {**common, "params": {"valid_principals": "{workload}", "key_id": key_id}},
        "ssh-root": {**common, "params": {"valid_principals": "{workload},root",
                                          "key_id": key_id}},
    }


@pytest.fixture
async def b(make_broker, ssh: Mount):
    return await make_broker(extra_roles=_roles(ssh.path), instance_policies=(ssh.policy,))






def _public_key(tmp_path: Path, key: str = "ed25519") -> str:
    return ssh_keypair(tmp_path, key).with_suffix(".pub").read_text()


@pytest.mark.parametrize("key", list(CERT_TYPES), ids=list(CERT_TYPES))
async def test_signs_a_user_certificate_with_the_templated_principals_and_key_id(
        b, ssh, http, vault, tmp_path: Path, key):
    private = ssh_keypair(tmp_path, key)
    public = private.with_suffix(".pub").read_text()
    instance = f"i-ssh-{key}"
    status, cred = await issue(http, b, instance, "ssh-user", ttl="5m", public_key=public)
    assert status == 201, cred
    assert set(cred) == RESPONSE_FIELDS  # no lease_limit: nothing counted against it
    assert (cred["kind"], cred["role"], cred["leased"], cred["renewable"]) == (
        "ssh_certificate", "ssh-user", False, False)
    data = cred["data"]
    assert set(data) == {"signed_key", "serial_number", "expiration"}

    cert_file = Path(f"{private}-cert.pub")
    cert_file.write_text(data["signed_key"])
    info = ssh_cert_info(cert_file)
    assert info.type == f"{CERT_TYPES[key]} user certificate"
    assert info.public_key == ssh_fingerprint(public, tmp_path)
    assert info.signing_ca == ssh_fingerprint(ssh.ca_pem, tmp_path)
    assert info.key_id == f"dev:{instance}"
    assert info.principals == ("payments",)
    assert (info.critical_options, info.extensions) == ((), ("permit-pty",))
    assert info.serial == int(data["serial_number"], 16)
    # Vault back-dates the start by 30 s for clock skew; the end is the TTL asked for.
    assert info.valid_to - info.valid_from == timedelta(minutes=5, seconds=30)
    assert timedelta(minutes=4, seconds=50) < info.valid_to - datetime.now(UTC) \
        <= timedelta(minutes=5)
    assert data["expiration"] == int(info.valid_to.timestamp())
    assert datetime.fromisoformat(cred["expires_at"]) == info.valid_to

    [lease] = b.rows("leases")
    assert (lease["state"], lease["kind"], lease["vault_lease_id"], lease["renewable"],
            lease["error_code"]) == ("delivered", "ssh_certificate", None, False, None)
    assert lease["expires_at"].replace(tzinfo=UTC) == info.valid_to
    assert vault.leases_under(f"{ssh.path}/") == []  # Vault keeps no lease for it
    assert data["signed_key"].split()[1] not in repr(b.rows("leases") + b.rows("audit_events"))


async def test_ttl_is_capped_by_the_role(b, http, tmp_path: Path):
    private = ssh_keypair(tmp_path)
    status, cred = await issue(http, b, "i-ssh-cap", "ssh-user", ttl="3h",
                                public_key=private.with_suffix(".pub").read_text())
    assert status == 201, cred
    cert_file = Path(f"{private}-cert.pub")
    cert_file.write_text(cred["data"]["signed_key"])
    info = ssh_cert_info(cert_file)
    assert timedelta(minutes=59) < info.valid_to - datetime.now(UTC) <= timedelta(hours=1)


@pytest.mark.parametrize("role,key", [("ssh-root", "ed25519"), ("ssh-user", "rsa-2048")],
                         ids=["principal-outside-allowed-users", "key-length-outside-the-role"])
async def test_vault_role_refuses_what_it_does_not_allow(b, ssh, http, vault, tmp_path: Path,
                                                         role, key):
    status, body = await issue(http, b, "i-ssh-refused", role,
                                public_key=_public_key(tmp_path, key))
    assert (status, body) == (502, {"error": {"code": "vault_invalid_request",
                                              "message": "Vault refused the request"}})
    [lease] = b.rows("leases")
    assert (lease["role"], lease["state"], lease["error_code"], lease["vault_lease_id"]) == (
        role, "failed", "vault_invalid_request", None)


async def test_delivered_certificates_are_not_limited_and_outlive_termination_in_the_record(
        b, http, tmp_path: Path):
    instance = "i-ssh-many"
    role = b.settings.roles["ssh-user"]
    for _ in range(role.max_leases_per_instance + 1):
        status, cred = await issue(http, b, instance, "ssh-user",
                                    public_key=_public_key(tmp_path))
        assert status == 201, cred
    shown = await terminate(http, b, instance)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    # Nothing in Vault can take a signed certificate back: the record says so.
    assert [x["state"] for x in shown["leases"]] == ["delivered"] * 4
    status, body = await issue(http, b, instance, "ssh-user", public_key=_public_key(tmp_path))
    assert (status, body["error"]["code"]) == (409, "instance_terminated")


@pytest.mark.parametrize("make,message", [
    (lambda d: ssh_keypair(d).read_text(),
     "public_key: this is a private key: send the public key (the .pub file), keep the key"),
    (lambda d: 'from="10.0.0.0/8" ' + _public_key(d),
     "public_key: expected '<type> <base64> [comment]' with type one of ssh-ed25519, "
     "ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521, ssh-rsa "
     "(no authorized_keys options, no certificates)"),
    (lambda d: _public_key(d) + _public_key(d),
     "public_key: expected a single line with no control characters"),
], ids=["private-key", "authorized-keys-options", "two-keys"])
async def test_a_bad_public_key_is_refused_and_changes_nothing(
        b, http, vault, tmp_path: Path, make, message):
    sent = make(tmp_path)
    store_before, vault_before = b.store_snapshot(), vault.snapshot()
    status, body = await issue(http, b, "i-ssh-bad", "ssh-user", public_key=sent)
    assert (status, body) == (400, {"error": {"code": "invalid_parameter", "message": message}})
    assert not [x for x in sent.split() if len(x) > 20 and x in body["error"]["message"]]
    assert (b.store_snapshot(), vault.snapshot()) == (store_before, vault_before)


async def test_principals_cannot_be_sent_by_the_caller(b, http, tmp_path: Path):
    status, body = await issue(http, b, "i-ssh-ask", "ssh-user", valid_principals="root",
                                public_key=_public_key(tmp_path))
    assert (status, body["error"]) == (400, {
        "code": "unknown_parameter",
        "message": "role 'ssh-user' does not take valid_principals from a request "
                   "(it takes: public_key, role, ttl)"})
