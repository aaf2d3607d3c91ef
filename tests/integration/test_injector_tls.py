"""The webhook over real TLS on loopback, with a throwaway CA (``trustme``): it serves the
certificate in its files, and when they are rotated the way the kubelet rotates a secret
volume (a new timestamped directory, then one atomic swap of the ``..data`` symlink), new
handshakes get the new certificate without a restart; a pair that does not load leaves
the old one serving. Metrics count what it answered. Then ``broker injector`` itself, as
a process, with a configuration file."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from broker.injector.server import InjectorServer
from broker.injector.settings import InjectorSettings
from tests.harness.tls import SecretVolume, der, served, trusting
from tests.harness.wait import eventually
from tests.unit.injector.podkit import P, apply, check_injected, container, pod, review


@dataclass
class Running:
    url: str
    server: InjectorServer
    client_ssl: ssl.SSLContext
    volume: SecretVolume
    ca: trustme.CA

    async def served(self) -> bytes:
        """The certificate a new handshake gets."""
        return await served(self.url, self.client_ssl)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path)
    volume.put(ca.issue_cert("127.0.0.1", "injector.broker-system.svc"))
    config = InjectorSettings(
        listen="127.0.0.1:0", broker_url="https://broker.broker-system.svc:8300",
        tls={"cert_file": str(tmp_path / "tls.crt"), "key_file": str(tmp_path / "tls.key"),
             "reload_s": 0.1})
    server = InjectorServer(config)
    url = await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    try:
        yield Running(url, server, trusting(ca), volume, ca)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_mutate_over_tls_and_metrics(running: Running) -> None:
    obj = pod({"containers": [container("app")]}, {P + "credential-db": "app-db"})
    connector = aiohttp.TCPConnector(ssl=running.client_ssl)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"{running.url}/mutate", json=review(obj, uid="tls-1")) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["response"]["uid"] == "tls-1" and body["response"]["allowed"] is True
        check_injected(obj, apply(obj, json.loads(base64.b64decode(body["response"]["patch"]))))
        async with http.get(f"{running.url}/metrics") as resp:
            text = await resp.text()
        async with http.get(f"{running.url}/healthz") as resp:
            assert await resp.json() == {"status": "ok"}
    assert 'broker_injector_injections_total{namespace="shop"} 1.0' in text
    assert 'broker_injector_admission_requests_total{namespace="shop"} 1.0' in text
    assert "broker_injector_tls_certificate_expiry_timestamp_seconds " in text
    # a client that does not trust the CA is refused at the handshake
    async with aiohttp.ClientSession() as untrusting:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await untrusting.get(f"{running.url}/healthz")


async def test_rotated_files_are_served_to_new_handshakes(running: Running) -> None:
    first = await running.served()
    second = running.ca.issue_cert("127.0.0.1", "injector.broker-system.svc")
    running.volume.put(second)

    async def serving_second() -> bool:
        return await running.served() == der(second)

    await eventually(serving_second, "the rotated certificate is served")
    assert first != der(second)
    assert running.server.tls is not None and running.server.tls.reloads == 1

    # a pair that does not load (a key from another rotation) keeps the last good one
    stray = running.ca.issue_cert("127.0.0.1")
    running.volume.write(running.ca.issue_cert("127.0.0.1").cert_chain_pems[0].bytes(),
                         stray.private_key_pem.bytes())
    await eventually(lambda: running.server.tls is not None and running.server.tls.failures == 1,
                     "the mismatched pair is tried")
    assert await running.served() == der(second)

    # and the next good pair is picked up
    third = running.ca.issue_cert("127.0.0.1", "injector.broker-system.svc")
    running.volume.put(third)

    async def serving_third() -> bool:
        return await running.served() == der(third)

    await eventually(serving_third, "the next good certificate is served")
    metrics = running.server.metrics.render().decode()
    assert 'broker_injector_tls_reloads{outcome="loaded"} 2.0' in metrics
    assert 'broker_injector_tls_reloads{outcome="failed"} 1.0' in metrics


async def test_a_connection_opened_before_the_rotation_keeps_working(running: Running) -> None:
    connector = aiohttp.TCPConnector(ssl=running.client_ssl, limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{running.url}/healthz") as resp:
            assert resp.status == 200
        new = running.ca.issue_cert("127.0.0.1")
        running.volume.put(new)

        async def rotated() -> bool:
            return await running.served() == der(new)

        await eventually(rotated, "the new certificate is served")
        async with http.get(f"{running.url}/healthz") as resp:  # the kept-alive connection
            assert resp.status == 200


def test_a_certificate_that_cannot_be_loaded_stops_start_up(tmp_path: Path) -> None:
    from broker.errors import ConfigError

    config = InjectorSettings(listen="127.0.0.1:0", tls={
        "cert_file": str(tmp_path / "none.crt"), "key_file": str(tmp_path / "none.key")})
    with pytest.raises(ConfigError, match="tls: cannot load .*none.crt and .*none.key"):
        InjectorServer(config)


# -- the command ------------------------------------------------------------------------

async def _stderr_until(proc: asyncio.subprocess.Process, msg: str) -> dict[str, Any]:
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, "the injector exited before it was listening"
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == msg:
            return record


async def test_broker_injector_serves_its_config_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    config = tmp_path / "injector.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0",
        "tls": {"cert_file": str(tmp_path / "tls.crt"), "key_file": str(tmp_path / "tls.key")},
        "agent": {"image": "registry.example/broker:${BROKER_VERSION}"},
    }))
    env = {**os.environ, "BROKER_VERSION": "1.2.3"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.main", "injector", "--config", str(config),
        "--broker-url", "https://broker.test.svc:8300", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        url = (await _stderr_until(proc, "injector listening"))["url"]
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        obj = pod({"containers": [container("app")]}, {P + "credential-db": "app-db"})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as http:
            async with http.post(f"{url}/mutate", json=review(obj)) as resp:
                body = await resp.json()
        ops = json.loads(base64.b64decode(body["response"]["patch"]))
        agent = next(op["value"] for op in ops if op["path"] == "/spec/initContainers")[0]
        assert agent["image"] == "registry.example/broker:1.2.3"
        assert agent["args"][1:3] == ["--broker-url", "https://broker.test.svc:8300"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("args", "says"), [
    (["--listen", "0.0.0.0:0", "--insecure-http"],
     "broker: --insecure-http: only on a loopback address (tests, development); listen is "
     "0.0.0.0:0\n"),
    (["--broker-url", "http://broker.svc:8300", "--insecure-http", "--listen", "127.0.0.1:0"],
     "broker: defaults: invalid configuration\n  broker_url: expected https:// (plain http is "
     "allowed only to a loopback address)\n"),
], ids=["insecure-off-loopback", "plain-http-broker"])
async def test_broker_injector_refuses_what_it_must(args: list[str], says: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli.main", "injector", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (2, says)
