"""The broker over real TLS on loopback (``server.tls``), with a throwaway CA (``trustme``)
and its certificate in a directory laid out like a mounted secret: readiness and a
credential exchange over HTTPS, nothing served in clear text, a client that does not trust
the CA refused at the handshake; rotated files are served to new handshakes while open
connections keep working, and a pair that does not load leaves the last good one serving.
``broker serve`` with certificate files that are not there stops before opening anything;
``brokerctl`` verifies the broker against ``--ca-file``/``BROKER_CA_FILE`` and says so
when it was not given the right one.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from broker.app.http import HttpServer
from broker.dev.environment import dev_settings_dict
from tests.conftest import ADMIN_TOKEN
from tests.harness.api import issue
from tests.harness.tls import SecretVolume, der, served, trusting
from tests.harness.wait import eventually

NAMES = ("127.0.0.1", "ephemeral-broker.ephemeral-broker.svc")


@dataclass
class TlsBroker:
    b: Any  # the RunningBroker of tests/conftest.py
    ca: trustme.CA
    volume: SecretVolume

    @property
    def server(self) -> HttpServer:
        return self.b.broker.components.server  # type: ignore[no-any-return]

    async def served(self) -> bytes:
        return await served(self.b.url, trusting(self.ca))


def tls_server(volume: SecretVolume, reload_s: float = 0.1) -> dict[str, Any]:
    return {"server": {"host": "127.0.0.1", "port": 0, "tls": {
        "cert_file": str(volume.cert_file), "key_file": str(volume.key_file),
        "reload_s": reload_s}}}


@pytest.fixture
async def tls(make_broker, tmp_path: Path) -> TlsBroker:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path / "broker-tls")
    volume.put(ca.issue_cert(*NAMES), ca)
    b = await make_broker(overrides=tls_server(volume))
    return TlsBroker(b, ca, volume)


async def test_readiness_and_an_exchange_over_https(tls: TlsBroker) -> None:
    url = tls.b.url
    assert url.startswith("https://127.0.0.1:")
    connector = aiohttp.TCPConnector(ssl=trusting(tls.ca))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        status, cred = await issue(http, tls.b, "i-tls-1", "dev-cert", ttl="5m")
        assert status == 201, cred
        assert cred["instance_id"] == "i-tls-1" and cred["kind"] == "x509_certificate"
        assert "BEGIN CERTIFICATE" in cred["data"]["certificate"]
    assert [r["state"] for r in tls.b.rows("leases")] == ["active"]
    # A client that does not trust the CA is refused at the handshake.
    async with aiohttp.ClientSession() as untrusting:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await untrusting.get(f"{url}/readyz")
    # Nothing answers in clear text on the port.
    plain = "http://" + url.removeprefix("https://")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as clear:
        with pytest.raises(aiohttp.ClientError):
            async with clear.get(f"{plain}/healthz") as resp:
                await resp.read()


async def test_rotated_files_are_served_to_new_handshakes(tls: TlsBroker) -> None:
    first = await tls.served()
    connector = aiohttp.TCPConnector(ssl=trusting(tls.ca), limit=1)
    async with aiohttp.ClientSession(connector=connector) as kept:
        async with kept.get(f"{tls.b.url}/healthz") as resp:  # opened before the rotation
            assert resp.status == 200
        second = tls.ca.issue_cert(*NAMES)
        tls.volume.put(second, tls.ca)

        async def serving(leaf: trustme.LeafCert) -> bool:
            return await tls.served() == der(leaf)

        await eventually(lambda: serving(second), "the rotated certificate is served")
        assert first != der(second)
        assert tls.server.tls is not None and tls.server.tls.reloads == 1
        async with kept.get(f"{tls.b.url}/healthz") as resp:  # the kept-alive connection
            assert resp.status == 200

    # A pair that does not load (a key from another rotation) keeps the last good one.
    stray = tls.ca.issue_cert(*NAMES)
    tls.volume.write(tls.ca.issue_cert(*NAMES).cert_chain_pems[0].bytes(),
                     stray.private_key_pem.bytes())
    await eventually(lambda: tls.server.tls is not None and tls.server.tls.failures == 1,
                     "the mismatched pair is tried")
    assert await tls.served() == der(second)
    third = tls.ca.issue_cert(*NAMES)
    tls.volume.put(third, tls.ca)
    await eventually(lambda: serving(third), "the next good certificate is served")


async def test_broker_serve_stops_at_once_when_its_certificate_files_are_missing(
        tmp_path: Path) -> None:
    data = dev_settings_dict(
        vault_addr="http://127.0.0.1:1", broker_token="s.not-a-real-token",
        issuer="http://127.0.0.1:2", jwks_uri="http://127.0.0.1:2/jwks.json",
        store_url=f"sqlite:///{tmp_path / 'broker.db'}", admin_token_sha256="0" * 64,
        with_database=False, port=0)
    data["server"]["tls"] = {"cert_file": str(tmp_path / "tls" / "tls.crt"),
                             "key_file": str(tmp_path / "tls" / "tls.key")}
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.main", "serve", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (2, (
        f"broker: server.tls: cannot load {tmp_path}/tls/tls.crt and {tmp_path}/tls/tls.key: "
        f"No such file or directory: {tmp_path}/tls/tls.crt\n")), out
    assert not (tmp_path / "broker.db").exists()  # the store was not opened


async def _brokerctl(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BROKER_URL", "BROKER_ADMIN_TOKEN", "BROKER_CA_FILE")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.ctl", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**clean, **env})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_brokerctl_trusts_the_ca_it_is_given(tls: TlsBroker) -> None:
    env = {"BROKER_URL": tls.b.url, "BROKER_ADMIN_TOKEN": ADMIN_TOKEN}
    code, out, err = await _brokerctl("-o", "json", "jobs", "list",
                                      env={**env, "BROKER_CA_FILE": str(tls.volume.ca_file)})
    assert (code, json.loads(out), err) == (0, {"jobs": [], "next": None}, "")
    code, out, err = await _brokerctl("--ca-file", str(tls.volume.ca_file), "jobs", "list",
                                      env=env)
    assert (code, out, err) == (0, "(none)\n", "")
    # Without it the system's CAs are used, which never signed this certificate.
    code, out, err = await _brokerctl("jobs", "list", env=env)
    assert (code, out) == (5, "")
    assert err == (f"brokerctl: the broker's TLS certificate at {tls.b.url} is not trusted "
                   "(unable to get local issuer certificate); pass --ca-file or set "
                   "BROKER_CA_FILE to the CA that signed it\n")
    code, _, err = await _brokerctl("--ca-file", str(tls.volume.key_file), "jobs", "list",
                                    env=env)
    assert (code, err) == (2, f"brokerctl: --ca-file {tls.volume.key_file}: not a CA bundle "
                              "(no certificate or crl found)\n")
    code, _, err = await _brokerctl("--ca-file", "/nonexistent/ca.crt", "jobs", "list",
                                    env=env)
    assert (code, err) == (2, "brokerctl: --ca-file /nonexistent/ca.crt: No such file or "
                              "directory\n")

