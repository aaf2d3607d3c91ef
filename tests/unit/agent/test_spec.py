"""The agent's ``--credential`` and ``--template`` strings: every option, and every
mistake refused with a message that names the credential, the key and what is expected."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.agent.spec import (
    CredentialSpec,
    SignalTarget,
    SpecError,
    build_specs,
    parse_credential,
    parse_template,
)

GOOD = [
    ("db=orders-ro", CredentialSpec("db", "orders-ro"), "defaults"),
    ("db=orders_ro,format=pgpass,perms=0440,ttl=15m",
     CredentialSpec("db", "orders_ro", "pgpass", 0o440, 900), "format-perms-ttl"),
    ("tls=web-cert,format=pem,keygen=ec-p256,cn=api.workload.internal",
     CredentialSpec("tls", "web-cert", "pem", keygen="ec-p256", cn="api.workload.internal"),
     "keygen-with-cn"),
    ("ssh=login,keygen=ed25519", CredentialSpec("ssh", "login", keygen="ed25519"),
     "keygen-json"),
    ("tls=c,format=pem,signal=SIGHUP:nginx",
     CredentialSpec("tls", "c", "pem", signal=SignalTarget("SIGHUP", "nginx")), "signal"),
    ('db=r,format=env,command=["nginx","-s","reload"]',
     CredentialSpec("db", "r", "env", command=("nginx", "-s", "reload")), "command"),
    ('db=r,command=["sh","-c","a, b; c=d"]',
     CredentialSpec("db", "r", command=("sh", "-c", "a, b; c=d")),
     "command-with-commas-and-equals"),
    ('db=r,signal=SIGUSR1:app,command=["kill","-HUP","1"]',
     CredentialSpec("db", "r", signal=SignalTarget("SIGUSR1", "app"),
                    command=("kill", "-HUP", "1")), "signal-and-command"),
    ("a=r,perms=0000", CredentialSpec("a", "r", perms=0), "perms-none"),
    ("a=r,perms=0644", CredentialSpec("a", "r", perms=0o644), "perms-world-readable"),
    ("a=r,ttl=90", CredentialSpec("a", "r", ttl=90), "ttl-seconds"),
    ("a=r,format=aws-credential-process",
     CredentialSpec("a", "r", "aws-credential-process"), "aws"),
    ("a-1=r", CredentialSpec("a-1", "r"), "name-with-dash"),
    ("x" * 63 + "=r", CredentialSpec("x" * 63, "r"), "name-63"),
]


@pytest.mark.parametrize(("text", "expected"), [g[:2] for g in GOOD], ids=[g[2] for g in GOOD])
def test_parses(text: str, expected: CredentialSpec) -> None:
    assert parse_credential(text) == expected


BAD = [
    ("db", "NAME=ROLE", "no-equals"),
    ("=role", "NAME", "empty-name"),
    ("DB=role", "NAME", "upper-case-name"),
    ("-db=role", "NAME", "leading-dash"),
    ("db-=role", "NAME", "trailing-dash"),
    ("d.b=role", "NAME", "dot-in-name"),
    ("x" * 64 + "=r", "NAME", "name-too-long"),
    ("db=", "ROLE", "empty-role"),
    ("db=Role", "ROLE", "upper-case-role"),
    ("db=r/x", "ROLE", "slash-in-role"),
    ('db=command=["a"]', "ROLE", "command-without-role"),
    ("db=r,format=yaml", "format: expected one of json, env, pem", "unknown-format"),
    ("db=r,colour=red", "colour: unknown option", "unknown-key"),
    ("db=r,format", "format: unknown option", "key-without-value"),
    ("db=r,,format=env", "unknown option", "empty-item"),
    ("db=r,format=env,format=json", "format: given twice", "duplicate-key"),
    ("db=r,perms=400", "perms: expected four octal digits", "perms-three-digits"),
    ("db=r,perms=0800", "perms: expected four octal digits", "perms-not-octal"),
    ("db=r,perms=1400", "perms: expected four octal digits", "perms-sticky"),
    ("db=r,perms=0420", "group- or world-writable", "perms-group-writable"),
    ("db=r,perms=0402", "group- or world-writable", "perms-world-writable"),
    ("db=r,perms=0600", None, "perms-owner-writable-is-fine"),
    ("db=r,perms=0500", "must not be executable", "perms-exec"),
    ("db=r,perms=0441", "must not be executable", "perms-world-exec"),
    ("db=r,ttl=soon", "ttl: expected a duration", "ttl-words"),
    ("db=r,ttl=0", "ttl: expected at least 1s", "ttl-zero"),
    ("db=r,ttl=-5m", "ttl: expected a duration", "ttl-negative"),
    ("db=r,keygen=dsa", "keygen: expected one of ec-p256, rsa-2048, ed25519", "keygen-unknown"),
    ("db=r,keygen=ec-p256,format=pgpass", "keygen: a generated key goes with a certificate",
     "keygen-pgpass"),
    ("db=r,keygen=ec-p256,format=env", "keygen: a generated key", "keygen-env"),
    ("db=r,cn=a.example", "cn: names the subject of the CSR", "cn-without-keygen"),
    ("db=r,keygen=ec-p256,cn=a b", "cn: expected a DNS name", "cn-space"),
    ("db=r,keygen=ec-p256,cn=" + "a" * 65, "cn: expected a DNS name", "cn-too-long"),
    ("db=r,keygen=ec-p256,cn=-a.example", "cn: expected a DNS name", "cn-leading-dash"),
    ("db=r,keygen=ec-p256,cn=a..b", "cn: expected a DNS name", "cn-empty-label"),
    ("db=r,signal=HUP:nginx", "signal: expected SIGNAL:PROCESS", "signal-without-sig"),
    ("db=r,signal=SIGKILL:nginx", "signal: expected SIGNAL:PROCESS", "signal-kill"),
    ("db=r,signal=SIGHUP", "signal: expected SIGNAL:PROCESS", "signal-no-process"),
    ("db=r,signal=SIGHUP:", "signal: the process name", "signal-empty-process"),
    ("db=r,signal=SIGHUP:a-very-long-process-name", "cuts longer names to 15",
     "signal-process-too-long"),
    ("db=r,signal=SIGHUP:/usr/bin/x", "signal: the process name", "signal-process-path"),
    ("db=r,signal=SIGHUP:a b", "signal: the process name", "signal-process-space"),
    # '=' (and ',', which ends the value before the agent sees it) would let a process name
    # carry another option: signal=SIGHUP:x,perms=0644 is two options to this parser.
    ("db=r,signal=SIGHUP:x=y", "signal: the process name", "signal-process-equals"),
    ("db=r,signal=SIGHUP:a,perms=0644,perms=0400", "perms: given twice",
     "signal-process-comma-is-another-option"),
    ("db=r,command=nginx -s reload", "command: expected a JSON array", "command-shell-string"),
    ("db=r,command=[]", "command: expected a non-empty JSON array", "command-empty"),
    ('db=r,command="nginx"', "command: expected a non-empty JSON array", "command-string"),
    ('db=r,command=["a",1]', "command: expected a non-empty JSON array", "command-number"),
    ('db=r,command=["a\\u0000b"]', "command: expected a non-empty", "command-nul"),
    ('db=r,command=[""]', "command: the program (first element) is empty", "command-empty-prog"),
    ('db=r,command=["a"],format=env', "command: expected a JSON array", "command-not-last"),
    ("db=r,command=" + json.dumps(["a"] * 65), "command: at most 64 arguments",
     "command-too-many"),
    ("db=r,command=" + json.dumps(["a" * 5000]), "command: at most 4096 bytes",
     "command-too-long"),
    ("db=r,command=" + json.dumps(["é" * 2100], ensure_ascii=False),
     "command: at most 4096 bytes", "command-too-many-bytes"),
    ('db=r,command=["a","\\ud800"]', "command: expected a non-empty JSON array",
     "command-lone-surrogate"),
]


@pytest.mark.parametrize(("text", "message"), [b[:2] for b in BAD], ids=[b[2] for b in BAD])
def test_refuses_with_what_to_fix(text: str, message: str | None) -> None:
    if message is None:
        parse_credential(text)
        return
    with pytest.raises(SpecError) as err:
        parse_credential(text)
    assert message in str(err.value)
    assert str(err.value).startswith("--credential")


def test_an_error_names_the_credential_and_never_repeats_a_template() -> None:
    with pytest.raises(SpecError, match=r"^--credential db: perms: "):
        parse_credential("db=r,perms=0777")
    with pytest.raises(SpecError) as err:
        build_specs(["t=r,format=template"], ["t=secret-looking ${"])
    assert "secret-looking" not in str(err.value)


@pytest.mark.parametrize(("creds", "templates", "credential", "option"), [
    (["db=r,perms=0777"], [], "db", "perms"),
    (["db=r,keygen=ec-p256,cn=a b"], [], "db", "cn"),
    (["Db=r"], [], "", "NAME"),
    (["db=R"], [], "db", "ROLE"),
    (['db=r,command=["a"],ttl=1s'], [], "db", "command"),
    (["a=r", "a=q"], [], "a", "NAME"),
    (["t=r,format=template"], [], "t", "format"),
    (["t=r,format=template"], ["t=$"], "t", "template"),
    (["t=r"], ["t=x"], "t", "template"),
    (["t=r,format=template"], ["t=x", "u=y"], "u", "template"),
], ids=["perms", "cn", "name", "role", "command", "twice", "template-missing", "template-bad",
        "template-unused", "template-orphan"])
def test_an_error_says_which_credential_and_which_option(
        creds: list[str], templates: list[str], credential: str, option: str) -> None:
    """What the injector names the annotation by, when it checks what it emits."""
    with pytest.raises(SpecError) as err:
        build_specs(creds, templates)
    assert (err.value.credential, err.value.option) == (credential, option)


def test_signal_number() -> None:
    import signal

    assert SignalTarget("SIGHUP", "x").number == signal.SIGHUP
    assert SignalTarget("SIGUSR2", "x").number == signal.SIGUSR2


@pytest.mark.parametrize(("spec", "files"), [
    (CredentialSpec("db", "r"), ("db",)),
    (CredentialSpec("db", "r", "pgpass"), ("db",)),
    (CredentialSpec("tls", "r", "pem"), ("tls.crt", "tls.key", "tls-ca.crt")),
    (CredentialSpec("tls", "r", "pem", keygen="ec-p256"), ("tls.crt", "tls.key", "tls-ca.crt")),
    (CredentialSpec("ssh", "r", keygen="ed25519"), ("ssh", "ssh.key", "ssh.key-cert.pub")),
], ids=["json", "pgpass", "pem", "pem-keygen", "json-keygen"])
def test_files(spec: CredentialSpec, files: tuple[str, ...]) -> None:
    assert spec.files() == files


def test_digest_follows_what_the_files_depend_on_and_nothing_else() -> None:
    base = parse_credential("db=r,format=env")
    assert base.digest() == parse_credential("db=r,format=env").digest()
    changed = ["db=q,format=env", "db=r,format=json", "db=r,format=env,perms=0440",
               "db=r,format=env,ttl=5m"]
    assert len({base.digest(), *(parse_credential(c).digest() for c in changed)}) == 5
    hooks = ['db=r,format=env,command=["x"]', "db=r,format=env,signal=SIGHUP:x"]
    assert {parse_credential(c).digest() for c in hooks} == {base.digest()}
    [t1] = build_specs(["t=r,format=template"], ["t=${a}"])
    [t2] = build_specs(["t=r,format=template"], ["t=${b}"])
    assert t1.digest() != t2.digest()


def test_build_specs_attaches_templates() -> None:
    specs = build_specs(["a=r", "t=r,format=template"], ["t=user=${username}\n"])
    assert [s.name for s in specs] == ["a", "t"]
    assert specs[1].template == "user=${username}\n"
    assert "user=" not in repr(specs[1])  # a template is not shown in a repr


BUILD_BAD = [
    ([], [], "--credential: give at least one", "none"),
    (["a=r", "a=q"], [], "--credential a: NAME: given twice", "duplicate-name"),
    (["a=r,format=pem", "a-ca=r,format=pem"], [],
     "--credential a-ca: NAME: writes a-ca.crt, which credential a writes too", "file-clash"),
    (["t=r,format=template"], [], "template needs --template t=TEXT", "template-missing"),
    (["t=r"], ["t=x"], "--template t: that credential's format is json", "template-for-json"),
    (["t=r,format=template"], ["t=x", "t=y"], "--template t: given twice", "template-twice"),
    (["t=r,format=template"], ["t=x", "u=y"], "--template u: no --credential of that name",
     "template-orphan"),
    (["t=r,format=template"], ["t"], "--template: expected NAME=TEXT", "template-no-equals"),
    (["t=r,format=template"], ["T=x"], "--template: expected NAME=TEXT", "template-bad-name"),
    (["t=r,format=template"], ["t="], "--template t: the template is empty", "template-empty"),
    (["t=r,format=template"], ["t=a $ b"], "--template t: not a valid template",
     "template-bare-dollar"),
    (["t=r,format=template"], ["t=${a.b}"], "--template t: not a valid template",
     "template-attribute"),
    (["t=r,format=template"], ["t=" + "x" * 16385], "--template t: at most 16384 bytes",
     "template-too-long"),
    (["t=r,format=template"], ["t=" + "é" * 8193], "--template t: at most 16384 bytes",
     "template-too-many-bytes"),
]


@pytest.mark.parametrize(("creds", "templates", "message"), [b[:3] for b in BUILD_BAD],
                         ids=[b[3] for b in BUILD_BAD])
def test_build_specs_refuses(creds: list[str], templates: list[str], message: str) -> None:
    with pytest.raises(SpecError) as err:
        build_specs(creds, templates)
    assert message in str(err.value)


def test_parse_template_keeps_the_text_whole() -> None:
    assert parse_template("t=a=b,c=${d}") == ("t", "a=b,c=${d}")
    assert parse_template("t=$$literal") == ("t", "$$literal")


@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_with_a_spec_error(text: str) -> None:
    try:
        spec = parse_credential(text)
    except SpecError:
        return
    assert parse_credential(text) == spec
    assert spec.files()
