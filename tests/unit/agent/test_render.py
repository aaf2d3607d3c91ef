"""Each format's exact bytes, the escaping that keeps a value from breaking out of its
field, and the errors that name the missing field without showing a value."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.agent.render import (
    GeneratedKey,
    Issued,
    RenderError,
    env_key,
    pgpass_field,
    render,
)
from broker.agent.spec import CredentialSpec

EXPIRES = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
DB = {"username": "v-app-1", "password": "p:a\\ss'w\"o$rd"}
CERT = {"certificate": "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----",
        "private_key": "-----BEGIN EC PRIVATE KEY-----\nK\n-----END EC PRIVATE KEY-----\n",
        "ca_chain": ["-----BEGIN CERTIFICATE-----\nINT\n-----END CERTIFICATE-----",
                     "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n"],
        "issuing_ca": "-----BEGIN CERTIFICATE-----\nINT\n-----END CERTIFICATE-----",
        "serial_number": "01:02"}
AWS = {"Version": 1, "AccessKeyId": "AKIA1", "SecretAccessKey": "s3cr3t",
       "SessionToken": "tok", "Expiration": "2030-01-02T03:04:05Z"}


def issued(data: dict[str, Any], kind: str = "database_login") -> Issued:
    return Issued(kind, data, EXPIRES)


def spec(fmt: str, **kw: Any) -> CredentialSpec:
    return CredentialSpec("c", "r", fmt, **kw)


def test_json_is_the_data() -> None:
    files = render(spec("json"), issued(DB))
    assert files == {"c": (json.dumps(DB, indent=2, sort_keys=True) + "\n").encode()}
    assert json.loads(files["c"]) == DB


def test_env_lines_quoted_for_a_posix_shell(tmp_path: Path) -> None:
    data = {**DB, "lease-ttl": 300, "renewable": True, "nested": {"a": [1]}, "none": None,
            "multi\nline": "one\ntwo", "9lives": "x"}
    files = render(spec("env"), issued(data))
    assert files["c"].decode().splitlines()[0] == "_9LIVES='x'"
    path = tmp_path / "c"
    path.write_bytes(files["c"])
    shown = subprocess.run(
        ["sh", "-c", f'set -a; . "{path}"; printf "%s|" "$USERNAME" "$PASSWORD" "$LEASE_TTL" '
         '"$RENEWABLE" "$NESTED" "$NONE" "$MULTI_LINE" "$_9LIVES"'],
        capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]}, check=True)
    assert shown.stdout.split("|")[:-1] == [
        DB["username"], DB["password"], "300", "true", '{"a": [1]}', "", "one\ntwo", "x"]


@pytest.mark.parametrize(("key", "expected"), [
    ("username", "USERNAME"), ("AccessKeyId", "ACCESSKEYID"), ("a-b.c d", "A_B_C_D"),
    ("1x", "_1X"), ("", "_"), ("é", "_"), ("$(id)", "__ID_"),
], ids=["lower", "camel", "punctuation", "leading-digit", "empty", "non-ascii", "shell"])
def test_env_key(key: str, expected: str) -> None:
    assert env_key(key) == expected


def test_env_refuses_two_fields_that_become_one_key() -> None:
    with pytest.raises(RenderError, match="both become A_B in env format"):
        render(spec("env"), issued({"a-b": "1", "a.b": "2"}))


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=30), max_size=4))
def test_env_round_trips_through_sh(data: dict[str, str]) -> None:
    if len({env_key(k) for k in data}) != len(data) or any("\x00" in v for v in data.values()):
        return
    text = render(spec("env"), issued(data))["c"].decode()
    names = [env_key(k) for k in data]
    script = text + "".join(f'printf "%s\\0" "${n}"\n' for n in names)
    out = subprocess.run(["sh", "-c", script], capture_output=True, timeout=30,
                         env={"PATH": os.environ["PATH"]}, check=True).stdout
    assert out.decode().split("\0")[:-1] == list(data.values())


def test_pgpass_escapes_colon_and_backslash() -> None:
    files = render(spec("pgpass"), issued(DB))
    assert files == {"c": b"*:*:*:v-app-1:p\\:a\\\\ss'w\"o$rd\n"}
    assert pgpass_field("a:b\\c") == "a\\:b\\\\c"


@pytest.mark.parametrize("data,message", [
    ({"username": "u"}, "needs the field 'password'"),
    ({"password": "p"}, "needs the field 'username'"),
    ({"username": "u", "password": ""}, "needs the field 'password'"),
    ({"username": "u", "password": 5}, "needs the field 'password'"),
    ({"username": "u", "password": "a\nb"}, "a line break cannot be written"),
], ids=["no-password", "no-username", "empty-password", "number", "newline"])
def test_pgpass_refuses(data: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError) as err:
        render(spec("pgpass"), issued(data))
    assert message in str(err.value) and "credential c" in str(err.value)
    assert "a\nb" not in str(err.value)


def test_pem_files_from_an_issue_mode_answer() -> None:
    files = render(spec("pem"), issued(CERT, "x509_certificate"))
    assert files == {
        "c.crt": b"-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n",
        "c.key": CERT["private_key"].encode(),
        "c-ca.crt": (b"-----BEGIN CERTIFICATE-----\nINT\n-----END CERTIFICATE-----\n"
                     b"-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n"),
    }


def test_pem_with_a_generated_key_and_only_an_issuing_ca() -> None:
    data = {k: v for k, v in CERT.items() if k not in ("private_key", "ca_chain")}
    key = GeneratedKey(b"-----BEGIN PRIVATE KEY-----\nMINE\n-----END PRIVATE KEY-----\n")
    files = render(spec("pem", keygen="ec-p256"), issued(data, "x509_certificate"), key)
    assert files["c.key"] == key.private
    assert files["c-ca.crt"] == b"-----BEGIN CERTIFICATE-----\nINT\n-----END CERTIFICATE-----\n"
    assert "MINE" not in repr(key)


@pytest.mark.parametrize("data,key,message", [
    (DB, None, "format pem needs the field 'certificate', which a database_login"),
    ({"certificate": "C", "issuing_ca": "I"}, None, "the answer has no private key"),
    ({"certificate": "C", "private_key": "K"}, None, "needs the field 'issuing_ca'"),
], ids=["not-a-certificate", "sign-mode-without-keygen", "no-chain"])
def test_pem_refuses(data: dict[str, Any], key: GeneratedKey | None, message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render(spec("pem"), issued(data), key)


def test_ssh_certificate_with_a_generated_key() -> None:
    data = {"signed_key": "ssh-ed25519-cert-v01@openssh.com AAAA\n", "serial_number": "1"}
    key = GeneratedKey(b"-----BEGIN OPENSSH PRIVATE KEY-----\nK\n")
    files = render(spec("json", keygen="ed25519"), issued(data, "ssh_certificate"), key)
    assert files == {"c": (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                     "c.key": key.private,
                     "c.key-cert.pub": b"ssh-ed25519-cert-v01@openssh.com AAAA\n"}


def test_aws_credential_process() -> None:
    files = render(spec("aws-credential-process"), issued(AWS, "aws_credentials"))
    assert json.loads(files["c"]) == AWS
    without = {k: v for k, v in AWS.items() if k not in ("SessionToken", "Expiration")}
    without["SessionToken"] = None
    doc = json.loads(render(spec("aws-credential-process"),
                            issued(without, "aws_credentials"))["c"])
    assert doc == {"Version": 1, "AccessKeyId": "AKIA1", "SecretAccessKey": "s3cr3t",
                   "Expiration": "2030-01-02T03:04:05Z"}  # the lease's expiry
    with pytest.raises(RenderError, match="needs the field 'AccessKeyId'"):
        render(spec("aws-credential-process"), issued(DB))


def test_template_substitutes_data_only() -> None:
    tpl = "host=db user=${username} password=$password cost=$$5 ttl=${ttl}\n"
    out = render(spec("template", template=tpl), issued({**DB, "ttl": 30}))["c"].decode()
    assert out == f"host=db user=v-app-1 password={DB['password']} cost=$5 ttl=30\n"


def test_template_names_a_missing_key_and_what_there_is() -> None:
    with pytest.raises(RenderError) as err:
        render(spec("template", template="${username}:${secret}"), issued(DB))
    assert str(err.value) == (
        "credential c: the template uses ${secret}, which a database_login credential does "
        "not have (it has: password, username)")


@pytest.mark.parametrize(("tpl", "refused"), [
    ("${__class__}", True), ("${username.__class__}", True), ("${username!r}", True),
    ("{username}", False), ("{{username}}", False), ("{% for x in y %}", False),
], ids=["dunder", "attribute", "conversion", "format-braces", "jinja", "jinja-loop"])
def test_template_has_no_expressions(tpl: str, refused: bool) -> None:
    """Only ``$name`` and ``${name}`` of a top-level field are replaced; anything else is
    refused or stays text."""
    if refused:
        with pytest.raises(RenderError):
            render(spec("template", template=tpl), issued(DB))
    else:
        assert render(spec("template", template=tpl), issued(DB))["c"].decode() == tpl


def test_issued_repr_hides_the_data() -> None:
    assert "p:a" not in repr(issued(DB)) and "***" in repr(issued(DB))
