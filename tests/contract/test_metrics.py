"""The metric families GET /metrics exposes, their types, help, sample names and label
names (not values), after traffic that touches issuance, refusal, renewal, release,
termination and a reconcile pass."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.contract.golden import assert_golden
from tests.harness.api import bearer, issue, release, terminate

# Findings depend on what other tests left in the shared OpenBao (orphans under the dev
# roles' paths): whether samples exist is not this broker's doing, their labels are.
SHARED_VAULT_DEPENDENT = {"broker_reconcile_findings": ["finding"]}


def exposed(texts: list[str]) -> dict[str, Any]:
    """Per family: type, help and, per sample name, the label names seen in any scrape."""
    families: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name, {"type": family.type,
                                                      "help": family.documentation,
                                                      "samples": {}})
            for sample in family.samples:
                entry["samples"].setdefault(sample.name, set()).update(sample.labels)
    for name, entry in list(families.items()):
        samples = {k: sorted(v) for k, v in sorted(entry["samples"].items())}
        # The text format shows a counter's ``_created`` samples as a family of their own.
        owner = name.removesuffix("_created")
        if owner in SHARED_VAULT_DEPENDENT:
            labels = SHARED_VAULT_DEPENDENT[owner]
            assert all(v == labels for v in samples.values()), (name, samples)
            if owner != name:
                del families[name]
                continue
            entry["samples"] = f"labels {labels} when present (depends on the shared OpenBao)"
        else:
            entry["samples"] = samples
    return families


async def scrape(http: Any, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return await resp.text()


async def test_metric_names_and_labels_are_unchanged(broker, http):
    status, _ = await issue(http, broker, "i-metrics", "dev-cert")
    assert status == 201
    status, db = await issue(http, broker, "i-metrics", "dev-db")
    assert status == 201
    async with http.post(f"{broker.url}/v1/leases/{db['lease_id']}/renew",
                         headers=bearer(broker.token("i-metrics"))) as resp:
        assert resp.status == 200
    status, _ = await issue(http, broker, "i-metrics", "no-such-role")
    assert status == 403
    with_live_leases = await scrape(http, broker.url)
    await release(http, broker, "i-metrics", db["lease_id"])
    await terminate(http, broker, "i-metrics")
    async with http.post(f"{broker.url}/v1/admin/reconcile", headers=broker.admin()) as resp:
        assert resp.status == 200
    after = await scrape(http, broker.url)
    assert_golden("metrics.json", exposed([with_live_leases, after]))
