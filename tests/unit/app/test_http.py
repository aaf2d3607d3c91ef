"""The broker's HTTP part: a serving certificate that cannot be loaded stops start-up
before anything is opened, naming the file; plain HTTP off loopback is served with a
warning that says what makes it safe; the loopback check behind that warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from broker.app import Broker, assemble
from broker.app.http import HttpServer
from broker.config import ServerTlsSettings, load_settings
from broker.dev.environment import dev_settings_dict
from broker.errors import ConfigError
from broker.settings import is_loopback


def _settings(tmp_path: Path, tls: dict[str, object] | None):  # type: ignore[no-untyped-def]
    data = dev_settings_dict(
        vault_addr="http://127.0.0.1:1", broker_token="s.not-a-real-token",
        issuer="http://127.0.0.1:2", jwks_uri="http://127.0.0.1:2/jwks.json",
        store_url=f"sqlite:///{tmp_path / 'broker.db'}", admin_token_sha256="0" * 64,
        with_database=False, port=0)
    data["server"]["tls"] = tls
    return load_settings(data, source="test")


async def test_a_missing_certificate_stops_the_broker_before_it_opens_anything(
        tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("broker.test").cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    settings = _settings(tmp_path, {"cert_file": str(tmp_path / "tls.crt"),
                                    "key_file": str(tmp_path / "tls.key")})
    broker = Broker(assemble(settings))
    with pytest.raises(ConfigError) as err:
        await broker.start()
    await broker.stop()
    assert str(err.value) == (
        f"server.tls: cannot load {tmp_path}/tls.crt and {tmp_path}/tls.key: "
        f"No such file or directory: {tmp_path}/tls.key")
    assert not (tmp_path / "broker.db").exists()  # the store was never opened
    assert broker.url is None


async def test_the_certificate_is_loaded_once_and_served_over_https(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    tls = ServerTlsSettings(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
    server = HttpServer(web.Application(), "127.0.0.1", 0, tls)
    server.load_certificate()
    loaded = server.tls
    try:
        url = await server.bind()
        assert url.startswith("https://127.0.0.1:") and server.tls is loaded
    finally:
        await server.close()


@pytest.mark.parametrize(("loopback", "warned"), [(True, False), (False, True)],
                         ids=["loopback", "elsewhere"])
async def test_plain_http_off_loopback_is_served_with_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        loopback: bool, warned: bool) -> None:
    # The socket stays on loopback: only the server's view of its address is changed.
    monkeypatch.setattr("broker.app.http.is_loopback", lambda host: loopback)
    server = HttpServer(web.Application(), "127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, logger="broker.app.http"):
        try:
            assert (await server.bind()).startswith("http://127.0.0.1:")
        finally:
            await server.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "broker.app.http"]
    if warned:
        (message,) = messages
        assert message.startswith("serving plain HTTP on a non-loopback address")
        assert "proxy or service mesh" in message and "server.tls" in message
    else:
        assert messages == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "broker.svc", "", "[::]"])
def test_hosts_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)
