"""``broker agent`` end to end: a real agent process for a pod whose identity is a
Kubernetes-shaped projected token, against a real broker (real OpenBao, PostgreSQL).

What a pod's containers see is checked with the real clients: ``psql`` logs in with the
``pgpass`` file and with the ``json`` file, ``openssl verify`` accepts the ``pem``
certificate against its chain, ``ssh-keygen -L`` reads the SSH certificate made for the
agent's own key. Lifecycle: renewal moves the lease's expiry in the store; a role with a
short max TTL is issued afresh before it, the rotation command runs, and the old lease is
gone in Vault; restarts adopt instead of issuing; SIGTERM gives back per ``--on-exit``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness.agent import AgentProcess, Pod, kubernetes_broker, named_app, run_once
from tests.harness.databases import PostgresTarget, postgres_target
from tests.harness.pgauth import scram_password_matches
from tests.harness.pki import (
    Mount,
    mounted_pki,
    mounted_ssh_ca,
    pki_role,
    ssh_cert_info,
)
from tests.harness.proxy import FaultProxy
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually

SSH_ROLE = {"key_type": "ca", "allow_user_certificates": True, "allow_host_certificates": False,
            "allowed_users": "app", "allow_user_key_ids": True,
            "default_extensions": {"permit-pty": ""}, "allowed_extensions": "",
            "ttl": "10m", "max_ttl": "1h"}


@pytest.fixture(scope="module")
def database(vault: VaultProbe, pg) -> Iterator[PostgresTarget]:
    with postgres_target(vault, pg) as target:
        yield target


@pytest.fixture(scope="module")
def pki(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_pki(vault, {"issue": pki_role(),
                             "sign": pki_role(key_type="any", key_bits=0)}) as mount:
        yield mount


@pytest.fixture(scope="module")
def ssh(vault: VaultProbe) -> Iterator[Mount]:
    with mounted_ssh_ca(vault, {"user": SSH_ROLE}) as mount:
        yield mount


def _roles(database: PostgresTarget, pki: Mount, ssh: Mount) -> dict[str, dict[str, Any]]:
    cert = {"engine": "pki", "mount": pki.path, "default_ttl": "10m", "max_ttl": "1h",
            "params": {"common_name": "{instance_id}.workload.internal"}}
    # One pod holds up to four logins of agent-db at once here (the default limit, 3 per
    # instance and role, would revoke the oldest).
    db = {"max_leases_per_instance": 10}
    return {
        "agent-db": database.side.broker_role(**db),
        # Renewed every few seconds, at its max TTL after 12 s: issued afresh before it.
        "agent-db-short": database.side.broker_role(default_ttl="4s", max_ttl="12s", **db),
        # Short-lived but far from its max TTL: only renewal keeps it.
        "agent-db-brief": database.side.broker_role(default_ttl="4s", max_ttl="1h", **db),
        "agent-cert": {**cert, "mode": "issue", "vault_role": "issue"},
        "agent-cert-sign": {**cert, "mode": "sign", "vault_role": "sign"},
        "agent-ssh": {"engine": "ssh", "mount": ssh.path, "vault_role": "user",
                      "default_ttl": "10m", "max_ttl": "1h",
                      "params": {"valid_principals": "app",
                                 "key_id": "{issuer_name}:{instance_id}"}},
    }


@pytest.fixture
async def b(make_broker, database, pki, ssh):
    return await make_broker(**kubernetes_broker(
        _roles(database, pki, ssh), (database.side.policy, pki.policy, ssh.policy)))


@pytest.fixture
def pod(issuer, tmp_path: Path) -> Pod:
    return Pod(issuer, tmp_path)


@pytest.fixture(autouse=True)
async def no_agent_left():
    yield
    await AgentProcess.kill_all()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak so far
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leases(b, pod: Pod, state: str | None = "active") -> list[dict[str, Any]]:
    return [r for r in b.rows("leases")
            if r["instance_id"] == pod.uid and (state is None or r["state"] == state)]


def _psql(database: PostgresTarget, user: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-w", "-h", database.server.host, "-p", str(database.server.port), "-U", user,
         "-d", database.database, "-tAc", "SELECT current_user, count(*) FROM app.orders"],
        env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30)


def _pgpass(path: Path) -> tuple[str, str]:
    line = path.read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    host, port, db, user, password = line.rstrip("\n").split(":")  # nothing to unescape here
    assert (host, port, db) == ("*", "*", "*")
    return user, password


def _secrets_absent(text: str, *values: str) -> None:
    for value in values:
        assert value not in text


async def test_files_in_every_format_psql_and_openssl_use_them_and_sigterm_terminates(
        b, pod, database, vault, http):
    template = "postgresql://${username}@db/orders?password=${password}"
    agent = await AgentProcess.start(
        pod, b.url,
        ["db=agent-db,format=json,perms=0440", "pgpass=agent-db,format=pgpass",
         "env=agent-db,format=env,perms=0400", "url=agent-db,format=template",
         "tls=agent-cert,format=pem"],
        "--template", f"url={template}", "--on-exit", "terminate")
    start_to_ready = await agent.wait_ready()
    print(f"\nagent start -> ready (5 credentials): {start_to_ready:.2f}s")
    rss = _rss_kib(agent.proc.pid)
    print(f"agent resident memory (5 credentials): {rss / 1024:.1f} MiB")
    assert rss < 64 * 1024  # the injector's default memory limit

    d = pod.directory
    assert sorted(p.name for p in d.iterdir()) == [
        ".agent-state.json", "db", "env", "pgpass", "tls-ca.crt", "tls.crt", "tls.key", "url"]
    assert {p.name: _mode(p) for p in d.iterdir()} == {
        ".agent-state.json": 0o600, "db": 0o440, "env": 0o400, "pgpass": 0o400,
        "tls-ca.crt": 0o400, "tls.crt": 0o400, "tls.key": 0o400, "url": 0o400}
    status = await agent.status()
    assert status["ready"] is True
    assert {n: c["status"] for n, c in status["credentials"].items()} == dict.fromkeys(
        ("db", "env", "pgpass", "tls", "url"), "ready")

    # json: the response's data; psql logs in with it (PGPASSWORD), and it is the very
    # password PostgreSQL stores for the login.
    data = json.loads((d / "db").read_text())
    assert set(data) == {"username", "password"}
    done = _psql(database, data["username"], {"PGPASSWORD": data["password"]})
    assert (done.returncode, done.stdout.strip()) == (0, f"{data['username']}|2"), done.stderr
    assert scram_password_matches(database.server.admin_url, data["username"], data["password"])

    # pgpass: psql finds the password in PGPASSFILE alone.
    user, password = _pgpass(d / "pgpass")
    assert scram_password_matches(database.server.admin_url, user, password)
    done = _psql(database, user, {"PGPASSFILE": str(d / "pgpass")})
    assert (done.returncode, done.stdout.strip()) == (0, f"{user}|2"), done.stderr

    # env: a POSIX shell reads it back exactly.
    shown = subprocess.run(["sh", "-c", f'set -a; . "{d / "env"}"; printf "%s\\n%s" '
                            '"$USERNAME" "$PASSWORD"'], capture_output=True, text=True,
                           timeout=30, env={"PATH": os.environ["PATH"]})
    env_user, env_password = shown.stdout.split("\n")
    assert scram_password_matches(database.server.admin_url, env_user, env_password)

    # template: string.Template over data.
    url = (d / "url").read_text()
    assert url.startswith("postgresql://v-") and "${" not in url and "?password=" in url

    # pem: the certificate verifies against the chain file, and the key is its key.
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(d / "tls-ca.crt"),
                               str(d / "tls.crt")], capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified
    cert = x509.load_pem_x509_certificate((d / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "tls.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == f"CN={pod.uid}.workload.internal"

    # Five leases for the pod's instance, under its namespace/serviceaccount.
    leases = _leases(b, pod)
    assert len(leases) == 5 and {x["workload"] for x in leases} == {"shop/orders"}

    # The state file and the log hold lease ids, never a value or the token.
    state = (d / ".agent-state.json").read_text()
    held = json.loads(state)["credentials"]
    assert {c["lease"]["lease_id"] for c in held.values()} == {x["lease_id"] for x in leases}
    secrets = (data["password"], password, env_password, pod.token_file.read_text().strip(),
               key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode().splitlines()[1])
    _secrets_absent(state, *secrets)

    # SIGTERM (on-exit terminate): the instance ends, and its logins with it.
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)

    def login_refused() -> bool:
        return _psql(database, user, {"PGPASSFILE": str(d / "pgpass")}).returncode != 0

    await eventually(login_refused, "the pgpass login refused after SIGTERM", 60, 0.02)
    sigterm_to_refused = time.monotonic() - sent
    print(f"SIGTERM -> PostgreSQL login refused: {sigterm_to_refused:.2f}s")
    assert await asyncio.wait_for(agent.proc.wait(), 60) == 0
    _secrets_absent(agent.log_text(), *secrets)
    await eventually(lambda: not _leases(b, pod), "every lease of the pod revoked")
    assert not any(vault.lease_exists(x["vault_lease_id"]) for x in leases)
    assert not database.role_exists(data["username"])
    assert "instance terminated (on-exit terminate)" in agent.log_text()

    # The leases are marked revoked a moment before the job itself is marked done (its
    # own last step): wait for the job, not for the leases.
    async def shown() -> dict[str, Any]:
        async with http.get(f"{b.url}/v1/instances/{pod.uid}", headers=b.admin()) as resp:
            return await resp.json()

    async def ended() -> bool:
        now = await shown()
        return (now["state"], now["job"]["state"]) == ("terminated", "done")

    await eventually(ended, "the instance terminated and its job done")


async def test_once_writes_and_exits_zero_and_restarts_adopt_without_issuing(
        b, pod, database, vault):
    creds = ["db=agent-db,format=pgpass", "tls=agent-cert,format=pem"]
    started = time.monotonic()
    code, out = await run_once(pod, b.url, creds, "--on-exit", "keep")
    print(f"\nagent --once (2 credentials): {time.monotonic() - started:.2f}s")
    assert code == 0, out
    assert (pod.directory / "db").is_file() and (pod.directory / "tls.crt").is_file()
    first = {x["lease_id"]: x for x in _leases(b, pod)}
    assert len(first) == 2
    db_lease = next(x for x in first.values() if x["role"] == "agent-db")
    user, password = _pgpass(pod.directory / "db")

    # Twenty restarts (a crash loop, or init + sidecar): each adopts; the renewable
    # database lease is renewed (its expiry moves), nothing is issued again.
    for _ in range(20):
        code, out = await run_once(pod, b.url, creds, "--on-exit", "keep")
        assert code == 0, out
        assert "adopted: issued by an earlier run" in out
    assert {x["lease_id"] for x in _leases(b, pod, None)} == set(first)
    assert _pgpass(pod.directory / "db") == (user, password)
    renewed = next(x for x in _leases(b, pod) if x["lease_id"] == db_lease["lease_id"])
    assert renewed["expires_at"] > db_lease["expires_at"]

    # A changed spec is not adopted: issued afresh; the replaced lease waits out its grace
    # period in the state file.
    changed = ["db=agent-db,format=pgpass,perms=0440", "tls=agent-cert,format=pem"]
    code, out = await run_once(pod, b.url, changed, "--on-exit", "keep")
    assert code == 0 and "its settings changed since it was issued" in out, out
    assert _mode(pod.directory / "db") == 0o440
    state = json.loads((pod.directory / ".agent-state.json").read_text())
    assert [r["lease_id"] for r in state["retired"]] == [db_lease["lease_id"]]
    now = {x["lease_id"]: x for x in _leases(b, pod)}
    assert len(now) == 3 and set(first) < set(now)

    # The long-running agent adopts as well and is ready at once; on SIGTERM with on-exit
    # release it gives back every lease, the replaced one too (Vault confirms them gone).
    agent = await AgentProcess.start(pod, b.url, changed, "--on-exit", "release")
    print(f"agent start -> ready, adopting 2 credentials: {await agent.wait_ready():.2f}s")
    assert set(x["lease_id"] for x in _leases(b, pod, None)) == set(now)
    assert await agent.stop() == 0
    assert not _leases(b, pod)
    assert not any(vault.lease_exists(x["vault_lease_id"]) for x in now.values())
    assert not database.role_exists(user)
    state = json.loads((pod.directory / ".agent-state.json").read_text())
    assert (state["credentials"], state["retired"]) == ({}, [])
    _secrets_absent(agent.log_text() + out, password)


async def test_renewal_moves_expiry_and_reissue_before_max_ttl_runs_the_command(
        b, pod, database, vault, tmp_path: Path):
    marker, hups = tmp_path / "rotations", tmp_path / "hups"
    command = json.dumps(["sh", "-c", f'echo rotated >> "{marker}"'])
    # The app: a process with a name of its own (its /proc/PID/comm), reloading on SIGHUP.
    app_name = f"app{uuid.uuid4().hex[:8]}"
    app_proc = named_app(app_name, hups)
    try:
        await _rotate(b, pod, database, vault, marker, hups, app_name, command)
    finally:
        app_proc.kill()
        app_proc.wait()


async def _rotate(b, pod, database, vault, marker, hups, app_name, command) -> None:
    agent = await AgentProcess.start(
        pod, b.url, [f"db=agent-db-short,format=pgpass,signal=SIGHUP:{app_name},"
                     f"command={command}"], "--on-exit", "release")
    print(f"\nagent start -> ready (1 credential): {await agent.wait_ready():.2f}s")
    [first] = _leases(b, pod)
    first_user, _ = _pgpass(pod.directory / "db")

    # Renewed: the same lease's expiry moves forward in the store.
    def moved() -> bool:
        rows = [x for x in _leases(b, pod) if x["lease_id"] == first["lease_id"]]
        return bool(rows) and rows[0]["expires_at"] > first["expires_at"]

    await eventually(moved, "the first lease renewed (expiry moved)", 30, 0.2)
    assert not marker.exists()  # a renewal is not a rotation

    # Issued afresh before the 12 s max TTL: new login in the file, the command ran, the
    # old lease given back and gone in Vault.
    await eventually(lambda: marker.exists(), lambda: f"rotation\n{agent.log_text()[-3000:]}",
                     60, 0.2)
    assert marker.read_text() == "rotated\n"
    await eventually(hups.exists, "the app got SIGHUP")
    assert hups.read_text() == "hup\n"
    await eventually(lambda: '"processes": 1' in agent.log_text(), "the signal logged")
    user, password = _pgpass(pod.directory / "db")
    assert user != first_user
    assert scram_password_matches(database.server.admin_url, user, password)
    await eventually(lambda: not vault.lease_exists(first["vault_lease_id"]),
                     "the old lease gone in Vault", 30, 0.2)
    await eventually(lambda: not database.role_exists(first_user), "the old login dropped")
    # The broker revokes in Vault first and records the release after: wait for the record.
    def old_state() -> str:
        [old] = [x for x in _leases(b, pod, None) if x["lease_id"] == first["lease_id"]]
        return old["state"]

    await eventually(lambda: old_state() in ("revoked", "released"),
                     lambda: f"the old lease recorded gone, still {old_state()}")
    assert (await agent.status())["ready"] is True
    assert await agent.stop() == 0
    assert "rotation command ran" in agent.log_text()
    assert '"exit_code": 0' in agent.log_text()


async def test_keygen_sends_only_a_csr_or_a_public_key(b, pod, pki, ssh, tmp_path: Path):
    cn = f"{pod.uid}.workload.internal"
    code, out = await run_once(
        pod, b.url, [f"tls=agent-cert-sign,format=pem,keygen=ec-p256,cn={cn},perms=0440",
                     "login=agent-ssh,format=json,keygen=ed25519"], "--on-exit", "keep")
    assert code == 0, out
    d = pod.directory
    assert {p.name: _mode(p) for p in d.iterdir() if not p.name.startswith(".")} == {
        "tls.crt": 0o440, "tls.key": 0o440, "tls-ca.crt": 0o440,
        "login": 0o400, "login.key": 0o400, "login.key-cert.pub": 0o400}
    cert = x509.load_pem_x509_certificate((d / "tls.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "tls.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(d / "tls-ca.crt"),
                               str(d / "tls.crt")], capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified

    info = ssh_cert_info(d / "login.key-cert.pub")
    assert info.principals == ("app",) and info.key_id == f"dev:{pod.uid}"
    # The certificate is for the key the agent made (ssh-keygen reads the key file).
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(d / "login.key")],
                                 capture_output=True, text=True, timeout=30,
                                 check=True).stdout.split()[1]
    assert info.public_key == fingerprint

    # The private keys never reached the broker: not in its store, not in its answers.
    pem_body = "".join((d / "tls.key").read_text().splitlines()[1:-1])[:40]
    dumped = repr([b.rows(t) for t in ("leases", "audit_events")])
    assert pem_body not in dumped
    assert "PRIVATE KEY" not in dumped
    state = json.loads((d / ".agent-state.json").read_text())["credentials"]
    assert (state["tls"]["key_param"], state["login"]["key_param"]) == ("csr", "public_key")


async def test_refused_role_fails_readiness_and_once_with_the_brokers_code(b, pod):
    code, out = await run_once(pod, b.url, ["x=not-a-role"], "--on-exit", "keep")
    assert code == 1
    assert "role_not_permitted" in out and "--once: credential refused" in out
    assert not (pod.directory / "x").exists()

    # A credential that does not fit its format is given back at once, not kept unwritten.
    code, out = await run_once(pod, b.url, ["x=agent-db,format=pem"], "--on-exit", "keep")
    assert code == 1 and "format_mismatch" in out
    assert "needs the field 'certificate', which a database_login credential" in out
    [given] = _leases(b, pod, None)
    assert given["state"] == "released" and not (pod.directory / "x.crt").exists()

    agent = await AgentProcess.start(pod, b.url, ["db=agent-db", "x=not-a-role"],
                                     "--on-exit", "keep")

    async def refused() -> dict[str, Any] | None:
        answer = await agent.probe()
        if answer is None or answer[0] != 503:
            return None
        body = answer[1]
        return body if body["credentials"].get("x", {}).get("status") == "refused" else None

    body = await eventually(refused, lambda: agent.log_text()[-2000:])
    assert body["ready"] is False
    assert body["credentials"]["x"]["code"] == "role_not_permitted"
    await eventually(lambda: (pod.directory / "db").is_file(), "the permitted one written")
    assert (await agent.probe("/healthz")) == (200, {"status": "ok"})
    assert await agent.stop() == 0
    # on-exit keep: still active, for the next run to adopt
    [kept] = [x for x in _leases(b, pod) if x["lease_id"] != given["lease_id"]]
    assert kept["role"] == "agent-db" and "exiting; leases kept" in agent.log_text()


async def test_token_file_is_read_for_every_call(b, pod):
    """A token that expired in the file is refused at renewal (readiness fails with the
    broker's code); the kubelet's next token is picked up without a restart."""
    agent = await AgentProcess.start(pod, b.url, ["db=agent-db-short,format=pgpass"],
                                     "--on-exit", "release")
    await agent.wait_ready()
    pod.write_token(ttl=60, now=time.time() - 3600)  # expired an hour ago

    async def refused() -> str | None:
        status = await agent.status()
        return status["credentials"]["db"].get("code") if not status["ready"] else None

    assert await eventually(refused, lambda: agent.log_text()[-2000:]) == "token_expired"
    pod.write_token()
    await eventually(lambda: _ready(agent), lambda: agent.log_text()[-2000:], 60, 0.2)
    assert await agent.stop() == 0


async def _ready(agent: AgentProcess) -> bool:
    return (await agent.status())["ready"] is True


async def test_broker_unavailable_keeps_the_files_and_retries(b, pod):
    host, port = b.url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    try:
        agent = await AgentProcess.start(pod, proxy.url, ["db=agent-db-short,format=pgpass"],
                                         "--on-exit", "release")
        await agent.wait_ready()
        before = (pod.directory / "db").read_bytes()
        [lease] = _leases(b, pod)
        proxy.cut()

        async def retrying() -> bool:
            return (await agent.status())["credentials"]["db"]["status"] == "retrying"

        await eventually(retrying, lambda: agent.log_text()[-2000:])
        assert (await agent.status())["ready"] is True  # the files still work
        assert (pod.directory / "db").read_bytes() == before
        proxy.restore()

        def renewed_again() -> bool:
            rows = _leases(b, pod)
            return any(x["expires_at"] > lease["expires_at"] for x in rows)

        await eventually(renewed_again, lambda: agent.log_text()[-2000:])
        await eventually(lambda: _ready(agent), "ready again")
        assert "the broker is unavailable" in agent.log_text()
        assert await agent.stop() == 0
    finally:
        await proxy.stop()


async def test_a_lease_that_expired_during_an_outage_is_replaced_not_renewed(b, pod):
    """The broker is unreachable past the lease's expiry (4 s): once it is back, renewing
    the dead lease is pointless (Vault may not know it any more, which the broker answers
    with a 502 the agent would otherwise retry for ever): a new credential is issued."""
    host, port = b.url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    try:
        agent = await AgentProcess.start(pod, proxy.url, ["db=agent-db-brief,format=pgpass"],
                                         "--on-exit", "release")
        await agent.wait_ready()
        [lease] = _leases(b, pod)
        proxy.cut()
        at = lease["expires_at"]
        expiry = (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()
        await eventually(lambda: time.time() > expiry + 1, "the lease's expiry has passed")
        proxy.restore()

        def replaced() -> bool:
            return any(x["lease_id"] != lease["lease_id"] for x in _leases(b, pod))

        await eventually(replaced, lambda: agent.log_text()[-2000:])
        await eventually(lambda: _ready(agent), "ready again")
        assert "issuing a new credential" in agent.log_text()
        assert await agent.stop() == 0
    finally:
        await proxy.stop()


async def test_once_waits_out_an_unavailable_broker_and_stops_on_sigterm(b, pod):
    host, port = b.url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    proxy.cut()
    try:
        agent = await AgentProcess.start(pod, proxy.url, ["db=agent-db"], "--once",
                                         "--on-exit", "keep")
        await eventually(lambda: agent.log_text().count("the broker is unavailable") >= 2,
                         "two attempts logged")
        assert agent.proc.returncode is None  # still trying: an init container waits
        assert await agent.stop() == 1
        assert "--once: credential interrupted before it was written" in agent.log_text()
        assert not (pod.directory / "db").exists() and not _leases(b, pod, None)
    finally:
        await proxy.stop()

