"""How ``brokerctl`` reaches the broker, before any request: the CA it verifies the
broker's certificate with (``--ca-file``/``BROKER_CA_FILE``), and a warning before it
sends its admin token over plain http to anything but this machine. (Against a broker
over TLS: tests/integration/test_broker_tls.py.)"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from broker.cli.ctl import EXIT_USAGE, Client, CtlError


@pytest.mark.parametrize("url", ["http://broker.example:8300", "http://10.0.0.7:8300",
                                 "http://0.0.0.0:8300"])
def test_plain_http_off_loopback_is_warned_about(url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    Client(url, "adm-token")
    err = capsys.readouterr().err
    assert err == (f"brokerctl: warning: {url} is plain http: the admin token crosses the "
                   "network in clear text; use https:// (or a port-forward to 127.0.0.1)\n")
    assert "adm-token" not in err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8300", "http://localhost:8300",
                                 "http://[::1]:8300", "https://broker.example:8300"])
def test_loopback_and_https_are_not(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    Client(url, "adm-token")
    assert capsys.readouterr().err == ""


def test_the_ca_file_is_what_the_broker_is_verified_with(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    client = Client("https://broker.example:8300", "t", ca_file=str(tmp_path / "ca.crt"))
    assert client.ssl is not None and client.ssl.verify_mode == ssl.CERT_REQUIRED
    assert client.ssl.get_ca_certs(binary_form=True) == [
        ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())]
    assert Client("https://broker.example:8300", "t").ssl is None  # the system's CAs


@pytest.mark.parametrize(("content", "says"), [
    (None, "--ca-file {p}: No such file or directory"),
    (b"not a certificate", "--ca-file {p}: not a CA bundle (no certificate or crl found)"),
], ids=["missing", "not-pem"])
def test_a_ca_file_that_is_not_a_bundle_is_a_usage_error(tmp_path: Path, content: bytes | None,
                                                         says: str) -> None:
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CtlError) as err:
        Client("https://broker.example:8300", "t", ca_file=str(path))
    assert (str(err.value), err.value.exit_code) == (says.format(p=path), EXIT_USAGE)
