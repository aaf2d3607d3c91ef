"""``broker agent`` against a broker that serves TLS (``server.tls``, a throwaway CA), the way
an injected pod runs it: the CA comes as ``--ca-pem`` (what the injector passes), the
credential is written, and SIGTERM ends the instance over the same connection. An agent
given another CA is never ready and says why in one log line, without a traceback; so
does an agent that speaks TLS to a broker that does not. Last, the whole chain: the
injector reads the CA file and the agent runs with exactly the arguments it emits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from broker.injector.containers import AGENT
from broker.injector.model import Patch
from broker.injector.mutate import mutate
from broker.injector.server import InjectorServer
from broker.injector.settings import InjectorSettings
from tests.harness.agent import AgentProcess, Pod, kubernetes_broker
from tests.harness.api import wait_job
from tests.harness.tls import SecretVolume, trusting
from tests.harness.wait import eventually
from tests.unit.injector import podkit

NAMES = ("127.0.0.1", "ephemeral-broker.ephemeral-broker.svc")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def b(make_broker, ca: trustme.CA, tmp_path: Path):
    volume = SecretVolume(tmp_path / "broker-tls")
    volume.put(ca.issue_cert(*NAMES), ca)
    args = kubernetes_broker({})
    args["overrides"]["server"] = {"host": "127.0.0.1", "port": 0, "tls": {
        "cert_file": str(volume.cert_file), "key_file": str(volume.key_file)}}
    return await make_broker(**args)


@pytest.fixture
def pod(issuer, tmp_path: Path) -> Pod:
    return Pod(issuer, tmp_path)


@pytest.fixture(autouse=True)
async def no_agent_left():
    yield
    await AgentProcess.kill_all()


def _log_records(agent: AgentProcess) -> list[dict[str, Any]]:
    records = []
    for line in agent.log_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


async def test_an_agent_with_the_ca_as_pem_is_served_over_tls(b, pod: Pod,
                                                               ca: trustme.CA) -> None:
    assert b.url.startswith("https://")
    agent = await AgentProcess.start(pod, b.url, ["db=dev-db,format=json,perms=0400"],
                                     "--ca-pem", ca.cert_pem.bytes().decode(),
                                     "--on-exit", "terminate")
    print(f"\nagent start -> ready over TLS: {await agent.wait_ready():.2f}s")
    data = json.loads((pod.directory / "db").read_text())
    assert set(data) == {"username", "password"}
    [lease] = [r for r in b.rows("leases") if r["instance_id"] == pod.uid]
    assert lease["state"] == "active" and lease["workload"] == "shop/orders"
    assert await agent.stop() == 0
    assert "instance terminated (on-exit terminate)" in agent.log_text()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting(ca))) as http:
        shown = await wait_job(http, b, pod.uid)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done"), shown
    assert [r["state"] for r in b.rows("leases") if r["instance_id"] == pod.uid] == ["revoked"]
    assert data["password"] not in agent.log_text()
    assert ca.cert_pem.bytes().decode().splitlines()[1] not in agent.log_text()


async def _not_ready_because(agent: AgentProcess, code: str) -> dict[str, Any] | None:
    answer = await agent.probe()
    if answer is None or answer[0] != 503:
        return None
    return answer[1] if answer[1]["credentials"]["db"].get("code") == code else None


async def test_an_agent_given_another_ca_is_not_ready_and_says_why(b, pod: Pod) -> None:
    other = trustme.CA()
    agent = await AgentProcess.start(pod, b.url, ["db=dev-db,format=json"],
                                     "--ca-pem", other.cert_pem.bytes().decode(),
                                     "--on-exit", "release")
    body = await eventually(lambda: _not_ready_because(agent, "broker_certificate_untrusted"),
                            lambda: agent.log_text()[-2000:])
    assert body["ready"] is False and body["credentials"]["db"]["status"] == "pending"
    reasons = {r.get("reason") for r in _log_records(agent) if r.get("level") == "warning"}
    assert ("the broker's TLS certificate is not trusted (unable to get local issuer "
            "certificate): is --ca-pem or --ca-file the CA that signed it?") in reasons
    assert "Traceback" not in agent.log_text()
    assert not (pod.directory / "db").exists()
    assert [r for r in b.rows("leases") if r["instance_id"] == pod.uid] == []
    assert await agent.stop() == 0


async def test_an_agent_that_speaks_tls_to_a_plain_http_port_says_so(make_broker, pod: Pod,
                                                                      ca: trustme.CA) -> None:
    plain = await make_broker(**kubernetes_broker({}))
    url = "https://" + plain.url.removeprefix("http://")
    agent = await AgentProcess.start(pod, url, ["db=dev-db,format=json"],
                                     "--ca-pem", ca.cert_pem.bytes().decode(),
                                     "--on-exit", "release")
    await eventually(lambda: _not_ready_because(agent, "broker_tls_failed"),
                     lambda: agent.log_text()[-2000:])
    reasons = {r.get("reason") for r in _log_records(agent) if r.get("level") == "warning"}
    assert any(str(r).startswith("the TLS handshake with the broker failed (") for r in reasons)
    assert "Traceback" not in agent.log_text()
    assert await agent.stop() == 0


async def test_the_command_line_the_injector_emits_reaches_a_tls_broker(
        b, pod: Pod, tmp_path: Path) -> None:
    """The chain: the injector reads the CA from agent.ca_file (here the broker's own
    secret volume's ca.crt), the agent runs with exactly the arguments it emits (only the
    pod's paths and the probe address are the test's), and gets its credential."""
    config = InjectorSettings(listen="127.0.0.1:0", broker_url=b.url, agent={
        "ca_file": str(tmp_path / "broker-tls" / "ca.crt")})
    obj = podkit.pod({"containers": [podkit.container("app")]},
                     {podkit.P + "credential-db": "dev-db", podkit.P + "format-db": "json"})
    server = InjectorServer(config, insecure_http=True)  # reads agent.ca_file; not started
    assert server.ca is not None
    patch = mutate(obj, "shop", config, ca_pem=server.ca.current())
    assert isinstance(patch, Patch)
    after = podkit.apply(obj, list(patch.ops))
    (agent,) = [c for c in after["spec"]["initContainers"] if c["name"] == AGENT]
    args = agent["args"]
    # The pod's paths are the harness's (the same order: --broker-url, --token-file, --dir).
    assert args[:7] == ["agent", "--broker-url", b.url, "--token-file",
                        "/var/run/secrets/ephemeral-broker/token", "--dir",
                        "/var/run/ephemeral-broker"]
    rest = args[7:]
    at = rest.index("--ready-listen")
    del rest[at:at + 2]  # AgentProcess listens on a loopback port of its own
    assert rest[rest.index("--ca-pem") + 1] == server.ca.current()
    process = await AgentProcess.start(pod, b.url, [], *rest)
    await process.wait_ready()
    assert set(json.loads((pod.directory / "db").read_text())) == {"username", "password"}
    assert await process.stop() == 0
