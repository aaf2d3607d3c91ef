"""The OpenAPI document checked as a new user would check it: schemathesis (``--checks
all``, positive and negative data, its stateful phase following the document's links from
a credential to its renewal and release) against a real broker on loopback, with zero
failures: once with a workload's identity token, once for the workload's own termination
(its own instance: it ends the instance), once with the admin token.

Bounded twice: in examples per operation and by a hard timeout per run. The broker runs
in this process's event loop, so schemathesis runs as its CLI in a subprocess (its
requests are answered while the test awaits it). Tokens reach it through the environment,
never its command line; its output masks the Authorization header.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.slow

WEBHOOK = {"events": {"webhook": {"secrets": ["w" * 40]}}}
# Operations that take the admin token; the rest take a workload token or none.
ADMIN_PATHS = r"^/v1/(admin/|instances/\{)"
SELF_TERMINATE = "/v1/instances/self/terminate"
MAX_EXAMPLES = 8
TIMEOUT_S = 60.0  # a run; three runs: well under 3 minutes on a busy machine
# A schema-valid request these operations refuse with 400 for a reason the document states
# but JSON Schema cannot express: it depends on the broker's state or configuration (the
# parameters a role takes, a lease's renewability and max TTL, an opaque page cursor the
# broker did not give out, a job that has not failed, an issuer or role not configured, a
# selection that selects nothing).
STATE_DEPENDENT_400 = [
    ("POST", "/v1/credentials"),  # unknown_parameter, invalid_parameter: the role's
    ("POST", "/v1/leases/{lease_id}/renew"),  # lease_not_renewable, lease_at_max_ttl
    ("GET", "/v1/admin/instances"),  # after: not a cursor this broker gave out
    ("GET", "/v1/admin/jobs"),  # after: idem
    ("POST", "/v1/admin/jobs/{job_id}/retry"),  # job_not_failed
    ("POST", "/v1/admin/locks"),  # invalid_lock: no such role/issuer; claim on kind claim only
    ("POST", "/v1/admin/policy/preview"),  # invalid_issuer, invalid_claims
    ("POST", "/v1/admin/selection"),  # empty_selection: every selector empty
    ("POST", "/v1/admin/terminations"),  # empty_selection, reason_required
    # RFC 8693: a subject token schemathesis cannot mint is 400 invalid_request, an unknown
    # role 400 invalid_target
    ("POST", "/v1/token"),
]
# A role the workload is granted, so that credentials are issued and the stateful phase
# follows their links to renew and release (a generated role name is refused with 403).
GRANTED_ROLE = {"POST /v1/credentials": 'parameters = { "body.role" = "dev-db" }\n'}


def config() -> str:
    text = 'headers = { Authorization = "Bearer ${BROKER_SCHEMATHESIS_TOKEN}" }\n'
    # Enough stateful scenarios that the links from a credential reach both of its leads.
    text += "phases.stateful.generation.max-examples = 30\n"
    for method, path in STATE_DEPENDENT_400:
        text += (
            f'\n[[operations]]\ninclude-path = "{path}"\ninclude-method = "{method}"\n'
            + GRANTED_ROLE.get(f"{method} {path}", "")
            + "checks.positive_data_acceptance.expected-statuses = "
            '["2xx", "400", "401", "403", "404", "409"]\n'
        )
    return text


async def schemathesis(url: str, token: str, workdir: Path, *selection: str) -> str:
    """Run schemathesis on the served document; its output, asserted to have passed."""
    (workdir / "schemathesis.toml").write_text(config())
    # fmt: off
    argv = [
        "--no-color", "--config-file", str(workdir / "schemathesis.toml"),
        "run", f"{url}/openapi.json", "--checks", "all", "--mode", "all",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "14", "--workers", "1",
        "--request-timeout", "10", "--suppress-health-check", "all",
        "--report-dir", str(workdir / "report"), *selection,
    ]
    # fmt: on
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "schemathesis.cli", *argv],
        env={**os.environ, "BROKER_SCHEMATHESIS_TOKEN": token},
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"schemathesis did not finish within {TIMEOUT_S}s")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-12000:]
    return text


async def answered(url: str, method: str, route: str, status: str) -> float:
    """How many requests the broker answered so on ``route`` (its request counter)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    labels = (f'method="{method}"', f'route="{route}"', f'status="{status}"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("broker_http_requests_total{") and all(x in line for x in labels)
    )


async def test_workload_operations_hold_to_the_document(make_broker, vault_setup, tmp_path):
    if not vault_setup.database_configured:
        pytest.skip("the dev-db role needs the test PostgreSQL configured in Vault")
    b = await make_broker(overrides=WEBHOOK)
    workload = ["--exclude-path-regex", ADMIN_PATHS, "--exclude-path", SELF_TERMINATE]
    out = await schemathesis(b.url, b.token("i-schemathesis"), tmp_path, *workload)
    # The links from a credential reached its renewal and its release: the broker says so.
    renewed = await answered(b.url, "POST", "/v1/leases/{lease_id}/renew", "200")
    released = await answered(b.url, "DELETE", "/v1/leases/{lease_id}", "204")
    assert renewed > 0 and released > 0, out[-6000:]


async def test_a_workload_ending_itself_holds_to_the_document(make_broker, tmp_path):
    b = await make_broker()
    # No link leads to it: no stateful phase.
    only = ["--include-path", SELF_TERMINATE, "--phases", "examples,coverage,fuzzing"]
    await schemathesis(b.url, b.token("i-schemathesis-self"), tmp_path, *only)


async def test_admin_operations_hold_to_the_document(make_broker, tmp_path):
    b = await make_broker(overrides=WEBHOOK)
    await schemathesis(b.url, ADMIN_TOKEN, tmp_path, "--include-path-regex", ADMIN_PATHS)
