"""``broker agent``'s command line: the injector's emitted form parses, and a bad value
stops the agent with exit 2 and a message saying what to fix."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from broker.agent.options import AgentConfig, config_from, listen_address
from broker.cli.main import _parser, main
from broker.errors import ConfigError

CA = trustme.CA()
CA_PEM = CA.cert_pem.bytes().decode()
KEY_PEM = CA.issue_cert("x").private_key_pem.bytes().decode()


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["agent", "--broker-url", "https://broker.ns.svc:8300", "--token-file",
            str(tmp_path / "token"), "--dir", str(tmp_path), "--credential", "db=orders",
            *extra]


def test_the_injectors_command_line(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(CA_PEM)
    args = _parser().parse_args(_args(
        tmp_path, "--credential", 'tls=cert,format=pem,keygen=ec-p256,command=["nginx","-s"]',
        "--credential", "t=r,format=template", "--template", "t=${username}",
        "--ready-listen", "0.0.0.0:8399", "--on-exit", "release", "--exit-timeout", "30s",
        "--ca-file", str(tmp_path / "ca.pem")))
    config = config_from(args)
    assert isinstance(config, AgentConfig)
    assert [c.name for c in config.credentials] == ["db", "tls", "t"]
    assert (config.ready_listen, config.on_exit, config.exit_timeout_s, config.once) == (
        ("0.0.0.0", 8399), "release", 30.0, False)
    assert config.state_path == tmp_path / ".agent-state.json"
    assert config_from(_parser().parse_args(_args(tmp_path, "--once"))).on_exit == "terminate"


@pytest.mark.parametrize(("extra", "message"), [
    (["--credential", "db=x"], "--credential db: NAME: given twice"),
    (["--exit-timeout", "soon"], "--exit-timeout: expected a duration"),
    (["--exit-timeout", "0s"], "--exit-timeout: expected 1s to 600s"),
    (["--exit-timeout", "11m"], "--exit-timeout: expected 1s to 600s"),
    (["--ready-listen", "8399"], "--ready-listen '8399': expected IP:PORT"),
    (["--ready-listen", "localhost:8399"], "expected IP:PORT"),
    (["--ready-listen", "0.0.0.0:99999"], "expected IP:PORT"),
    (["--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem: no such file"),
    (["--ca-file", "/etc/hostname"],
     "--ca-file /etc/hostname: not a CA bundle (no certificate or crl found)"),
    (["--ca-pem", ""], "--ca-pem: expected one or more PEM certificates "
                       "(-----BEGIN CERTIFICATE-----), found none"),
    (["--ca-pem", "/etc/ssl/ca.pem"], "--ca-pem: expected one or more PEM certificates"),
    (["--ca-pem", CA_PEM + KEY_PEM],
     "--ca-pem: holds a private key; give the CA certificate(s) only"),
    (["--ca-pem", CA_PEM.replace("-----END CERTIFICATE-----", "")],
     "--ca-pem: a PEM certificate in it does not parse"),
], ids=["duplicate", "timeout-words", "timeout-zero", "timeout-long", "listen-port-only",
        "listen-hostname", "listen-port-range", "ca-missing", "ca-file-not-pem", "ca-pem-empty",
        "ca-pem-a-path", "ca-pem-with-key", "ca-pem-truncated"])
def test_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from(_parser().parse_args(_args(tmp_path, *extra)))
    assert message in str(err.value)
    assert "BEGIN" not in str(err.value).replace("-----BEGIN CERTIFICATE-----", "")


def test_the_ca_as_pem_text_is_checked_and_trusted(tmp_path: Path) -> None:
    config = config_from(_parser().parse_args(_args(tmp_path, "--ca-pem", f"# ours\n{CA_PEM}")))
    assert config.ca_pem == CA_PEM and config.ca_file is None
    context = config.broker_tls()
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert context.get_ca_certs(binary_form=True) == [ssl.PEM_cert_to_DER_cert(CA_PEM)]
    assert config_from(_parser().parse_args(_args(tmp_path))).broker_tls() is True


def test_ca_file_and_ca_pem_exclude_each_other(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.pem").write_text(CA_PEM)
    with pytest.raises(SystemExit) as exit_:
        main(_args(tmp_path, "--ca-file", str(tmp_path / "ca.pem"), "--ca-pem", CA_PEM))
    assert exit_.value.code == 2
    assert "argument --ca-pem: not allowed with argument --ca-file" in capsys.readouterr().err


@pytest.mark.parametrize(("url", "ok"), [
    ("https://broker:8300", True), ("http://127.0.0.1:8300", True), ("http://[::1]:1", True),
    ("http://localhost:8300", True), ("http://broker:8300", False), ("ftp://broker", False),
    ("broker:8300", False),
], ids=["https", "http-loopback", "http-v6-loopback", "http-localhost", "http-remote", "ftp",
        "no-scheme"])
def test_broker_url(tmp_path: Path, url: str, ok: bool) -> None:
    argv = _args(tmp_path)
    argv[2] = url
    args = _parser().parse_args(argv)
    if ok:
        assert config_from(args).broker_url == url
    else:
        with pytest.raises(ConfigError, match="--broker-url"):
            config_from(args)


def test_dir_must_exist(tmp_path: Path) -> None:
    argv = _args(tmp_path)
    argv[6] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a directory"):
        config_from(_parser().parse_args(argv))


def test_listen_address_v6() -> None:
    assert listen_address("[::]:8399") == ("::", 8399)


def test_a_bad_spec_exits_2_with_the_message(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, "--credential", "x=r,perms=0777")) == 2
    assert capsys.readouterr().err == (
        "broker: --credential x: perms: a credential file must not be group- or "
        "world-writable\n")
