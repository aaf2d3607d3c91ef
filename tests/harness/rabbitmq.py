"""RabbitMQ for the rabbitmq engine's tests: the management API that Vault drives, and a
small client of that API to create and inspect vhosts and users.

Vault's rabbitmq secrets engine creates and deletes users through the management API
(port 15672), which a stock RabbitMQ ships disabled. When the node answers on AMQP but not
on 15672, and ``rabbitmq-plugins`` can talk to the node (root or the rabbitmq user), the
plugin is enabled online, bound to loopback, and the API is waited for; otherwise the test
is skipped loudly (or fails in CI) with what was missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tests.harness.services import listening, require_service, service_missing
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually_sync

HOST = "127.0.0.1"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
# Where the Debian and RPM packages put the CLIs; /usr/sbin is not on every user's PATH.
_CLI_DIRS = ("/usr/sbin", "/usr/lib/rabbitmq/bin", "/usr/local/sbin")
_CLI_TIMEOUT_S = 60.0
# Only if the operator configured no listener: an online-enabled plugin would otherwise
# listen on every interface. Kept in the node's memory, never written to its config.
_LOOPBACK_LISTENER = (
    "case application:get_env(rabbitmq_management, tcp_config) of "
    "undefined -> application:set_env(rabbitmq_management, tcp_config, "
    f'[{{ip, "{HOST}"}}, {{port, {MANAGEMENT_PORT}}}], [{{persistent, true}}]), set; '
    "_ -> kept end."
)


def _cli(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _CLI_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _run(cmd: Sequence[str]) -> tuple[bool, str]:
    """Run a RabbitMQ CLI, bounded; (succeeded, last line of its output)."""
    try:
        done = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_CLI_TIMEOUT_S,
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        return False, f"{os.path.basename(cmd[0])} did not finish in {_CLI_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return False, str(exc)
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return done.returncode == 0, lines[-1] if lines else f"exit status {done.returncode}"


def _api_answers(base_url: str) -> bool:
    """The API is up once it answers HTTP at all (401 without credentials)."""
    try:
        with urllib.request.urlopen(f"{base_url}/api/overview", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def ensure_management(timeout: float = 60.0) -> str:
    """The management API's base URL, enabling the plugin first when it is off."""
    require_service("rabbitmq", HOST, AMQP_PORT)
    base_url = f"http://{HOST}:{MANAGEMENT_PORT}"
    if listening(HOST, MANAGEMENT_PORT):
        return base_url
    plugins, ctl = _cli("rabbitmq-plugins"), _cli("rabbitmqctl")
    if plugins is None or ctl is None:
        service_missing(
            "rabbitmq management API",
            f"nothing listens on {HOST}:{MANAGEMENT_PORT} and rabbitmq-plugins is not "
            "installed here to enable it",
        )
    assert plugins is not None and ctl is not None  # service_missing does not return
    may, why = _run([plugins, "list", "--enabled", "--minimal"])
    if not may:
        service_missing(
            "rabbitmq management API",
            f"nothing listens on {HOST}:{MANAGEMENT_PORT} and rabbitmq-plugins may not be "
            f"used here ({why}); run `rabbitmq-plugins enable rabbitmq_management` as root",
        )
    ok, why = _run([ctl, "eval", _LOOPBACK_LISTENER])
    if ok:
        ok, why = _run([plugins, "enable", "rabbitmq_management"])
    if not ok:
        service_missing(
            "rabbitmq management API",
            f"`rabbitmq-plugins enable rabbitmq_management` failed: {why}",
        )
    try:
        eventually_sync(lambda: _api_answers(base_url), f"{base_url} answers", timeout, 0.5)
    except AssertionError:
        service_missing(
            "rabbitmq management API",
            f"the plugin is enabled but {base_url} did not answer within {timeout:.0f} s",
        )
    return base_url


class ManagementApi:
    """The management HTTP API as one user. Answers are (status, JSON or None)."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self.base_url = base_url
        self.user = user
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def __repr__(self) -> str:  # never the password
        return f"ManagementApi({self.base_url!r}, user={self.user!r})"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.base_url}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def whoami(self) -> tuple[int, Any]:
        return self.call("GET", "whoami")

    def user_info(self, name: str) -> dict[str, Any] | None:
        status, body = self.call("GET", f"users/{quote(name, safe='')}")
        if status == 404:
            return None
        assert status == 200, (status, body)
        return body

    def users(self) -> list[str]:
        status, body = self.call("GET", "users")
        assert status == 200, (status, body)
        return [u["name"] for u in body]

    def put_user(self, name: str, password: str, tags: str = "") -> None:
        status, body = self.call(
            "PUT", f"users/{quote(name, safe='')}", {"password": password, "tags": tags}
        )
        assert status in (201, 204), (status, body)

    def delete_user(self, name: str) -> None:
        status, body = self.call("DELETE", f"users/{quote(name, safe='')}")
        assert status in (204, 404), (status, body)

    def permissions_of(self, name: str) -> list[dict[str, Any]]:
        status, body = self.call("GET", f"users/{quote(name, safe='')}/permissions")
        assert status == 200, (status, body)
        return body

    def put_vhost(self, name: str) -> None:
        status, body = self.call("PUT", f"vhosts/{quote(name, safe='')}", {})
        assert status in (201, 204), (status, body)

    def delete_vhost(self, name: str) -> None:
        status, body = self.call("DELETE", f"vhosts/{quote(name, safe='')}")
        assert status in (204, 404), (status, body)


# What the Vault role grants in its one vhost: queues named app.*, and publishing through
# the default exchange to them.
PERMISSIONS = {"configure": r"^app\.", "write": r"^(amq\.default|app\..*)$", "read": r"^app\."}


@dataclass(frozen=True)
class Rabbit:
    admin: ManagementApi  # a dedicated administrator, as Vault uses it
    mount: str
    vault_role: str
    policy: str
    granted_vhost: str
    refused_vhost: str
    user_prefix: str

    def broker_role(self) -> dict:
        return {
            "engine": "rabbitmq",
            "mount": self.mount,
            "vault_role": self.vault_role,
            "default_ttl": "10m",
            "max_ttl": "1h",
        }


def _ok(answer: tuple[int, object]) -> None:
    status, body = answer
    assert status in (200, 204), (status, body)


@contextmanager
def mounted_rabbitmq(vault: VaultProbe) -> Iterator[Rabbit]:
    """A Vault rabbitmq mount on its own administrator user and two fresh vhosts; all of
    it, and every user Vault created, is gone at teardown."""
    base_url = ensure_management()
    guest = ManagementApi(base_url, "guest", "guest")
    status, who = guest.whoami()
    if status != 200 or "administrator" not in (who or {}).get("tags", []):
        service_missing(
            "rabbitmq management API",
            f"the bootstrap login guest/guest is refused or not an administrator "
            f"at {base_url} (HTTP {status}); the fixture creates its own admin "
            "user with it",
        )
    tag = secrets.token_hex(4)
    prefix = f"bt-{tag}-"
    admin_name, admin_password = f"{prefix}vault-admin", secrets.token_urlsafe(24)
    rabbit = Rabbit(
        admin=ManagementApi(base_url, admin_name, admin_password),
        mount=f"rabbitmq-{tag}",
        vault_role="app",
        policy=f"broker-instance-mq-{tag}",
        granted_vhost=f"{prefix}granted",
        refused_vhost=f"{prefix}refused",
        user_prefix=f"{prefix}app-",
    )
    with contextlib.ExitStack() as cleanup:
        guest.put_user(admin_name, admin_password, tags="administrator")
        cleanup.callback(guest.delete_user, admin_name)
        for vhost in (rabbit.granted_vhost, rabbit.refused_vhost):
            rabbit.admin.put_vhost(vhost)
            cleanup.callback(rabbit.admin.delete_vhost, vhost)

        _ok(vault.call("POST", f"sys/mounts/{rabbit.mount}", {"type": "rabbitmq"}))
        cleanup.callback(vault.call, "DELETE", f"sys/mounts/{rabbit.mount}")
        # Registered after the mount, so they run before it is disabled: revoke what Vault
        # still holds, then delete any user a failed run left behind.
        cleanup.callback(_delete_users, rabbit.admin, prefix, keep=admin_name)
        cleanup.callback(
            vault.call, "PUT", f"sys/leases/revoke-prefix/{rabbit.mount}/creds", {"sync": True}
        )
        _ok(
            vault.call(
                "POST",
                f"{rabbit.mount}/config/connection",
                {
                    "connection_uri": base_url,
                    "username": admin_name,
                    "password": admin_password,
                    "verify_connection": True,
                    "username_template": f"{prefix}{{{{ .RoleName }}}}-{{{{ random 20 }}}}",
                },
            )
        )
        _ok(vault.call("POST", f"{rabbit.mount}/config/lease", {"ttl": "10m", "max_ttl": "1h"}))
        _ok(
            vault.call(
                "POST",
                f"{rabbit.mount}/roles/{rabbit.vault_role}",
                {"vhosts": json.dumps({rabbit.granted_vhost: PERMISSIONS})},
            )
        )
        creds = f"{rabbit.mount}/creds/{rabbit.vault_role}"
        policy = f'path "{creds}" {{ capabilities = ["read"] }}'
        _ok(vault.call("PUT", f"sys/policies/acl/{rabbit.policy}", {"policy": policy}))
        cleanup.callback(vault.call, "DELETE", f"sys/policies/acl/{rabbit.policy}")
        yield rabbit


def _delete_users(admin: ManagementApi, prefix: str, keep: str) -> None:
    for name in admin.users():
        if name.startswith(prefix) and name != keep:
            admin.delete_user(name)
