"""``assemble`` builds every component from dev-like settings and does no I/O: no socket is
opened and the lease database is not touched."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from broker.app import assemble
from broker.config import load_settings
from broker.dev.environment import dev_settings_dict
from broker.events.sqs import SqsTerminationSource


def settings(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    data = dev_settings_dict(
        vault_addr="http://127.0.0.1:1", broker_token="s.not-a-real-token",
        issuer="http://127.0.0.1:2", jwks_uri="http://127.0.0.1:2/jwks.json",
        store_url=f"sqlite:///{tmp_path / 'broker.db'}", admin_token_sha256="0" * 64,
        with_database=False, port=0)
    data.update(extra)
    return load_settings(data, source="test")


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Network sockets are refused; the event loop's own socket pair is let through."""
    real = socket.socket

    def guarded(family: int = -1, *args: object, **kw: object) -> socket.socket:
        if kw.get("fileno") is None and family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError("assemble opened a socket")
        return real(family, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", guarded)


async def test_every_component_is_built_and_nothing_is_opened(
        tmp_path: Path, no_sockets: None) -> None:
    parts = assemble(settings(tmp_path), worker_id="w-1")
    try:
        assert not (tmp_path / "broker.db").exists()  # the database was not connected
        assert parts.aws is None and parts.kubernetes is None
        assert parts.sources == () and dict(parts.liveness) == {}
        assert parts.worker.worker_id == "w-1"
        assert parts.server.url is None  # bound only when the broker starts
        assert [t.name for t in parts.ticks.all()] == [
            "revocation", "reconcile", "sightings", "maintenance", "audit-checkpoint", "refusals"]
        assert parts.ticks.revocation.at_start
        assert not any(t.at_start for t in parts.ticks.all()[1:])
        assert (parts.ticks.sightings.every_s, parts.ticks.maintenance.every_s) == (10.0, 30.0)
        assert parts.ticks.checkpoint.every_s == 1.0  # looks; audit.checkpoint says when
        assert parts.signing.kind == "transit"  # the default signer
    finally:
        await parts.http.close()


async def test_the_ledgers_share_one_database(tmp_path: Path) -> None:
    parts = assemble(settings(tmp_path))
    try:
        ledgers = vars(parts.ledgers)
        databases = {id(getattr(v, "_db", parts.ledgers.database))
                     for k, v in ledgers.items() if k != "database"}
        assert databases == {id(parts.ledgers.database)}
    finally:
        await parts.http.close()


async def test_a_configured_sqs_queue_is_a_termination_source_calling_the_terminator(
        tmp_path: Path, no_sockets: None) -> None:
    queue = "https://sqs.eu-west-1.amazonaws.com/123456789012/ec2-events"
    s = settings(tmp_path, aws={"region": "eu-west-1"},
                 events={"sqs": {"queue_url": queue}})
    parts = assemble(s)
    try:
        (source,) = parts.sources
        assert isinstance(source, SqsTerminationSource)
        assert parts.aws is not None
    finally:
        await parts.http.close()


async def test_serve_and_dev_end_leases_with_the_direct_checks(tmp_path: Path) -> None:
    from broker.engines.checks import DirectChecks
    parts = assemble(settings(tmp_path), checks="direct")
    try:
        checks = parts.ender._checks
        assert isinstance(checks, DirectChecks)
        assert checks._by_role["dev-cert"].name == "crl"  # the PKI role: its mount's CRL
        assert parts.direct_checks is checks  # closed when the broker stops
    finally:
        await parts.http.close()
    parts = assemble(settings(tmp_path))
    try:
        assert parts.ender._checks is None  # by default none: a test's own choice
    finally:
        await parts.http.close()
