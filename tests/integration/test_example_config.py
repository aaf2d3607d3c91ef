"""The configuration reference in deploy/ is a real, loadable configuration."""

from __future__ import annotations

from pathlib import Path

from broker.config import load_settings_file
from broker.vault.settings import AppRoleAuth

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "broker.example.yaml"


def test_the_documented_example_config_loads():
    env = {"BROKER_DB_PASSWORD": "pw", "BROKER_APPROLE_SECRET_ID": "sid",
           "BROKER_WEBHOOK_SECRET": "w" * 40, "BROKER_AUDIT_HASH_KEY": "a" * 40}
    s = load_settings_file(EXAMPLE, env=env)
    assert s.store.url == "postgresql://broker:pw@db.internal:5432/broker"
    assert isinstance(s.vault.auth, AppRoleAuth)
    assert s.vault.auth.secret_id.get_secret_value() == "sid"
    assert s.identity.issuers[0].instance_claim == ("kubernetes.io", "pod", "uid")
    kinds = {i.name: (i.kind, i.key_source) for i in s.identity.issuers}
    assert kinds == {"k8s-prod": ("kubernetes", "jwks_uri"), "ci": ("github_actions", "discovery"),
                     "spire": ("spiffe", "spiffe_bundle"), "gce": ("gcp", "discovery"),
                     "batch": ("generic", "file")}
    assert s.roles["workload-cert"].params == {"common_name": "{workload}.svc.internal"}
    assert s.policy.rules[0].max_ttl == 1800
    assert "sid" not in repr(s)
    assert "w" * 40 not in repr(s)
    assert s.audit.hash_key is not None and "a" * 40 not in repr(s)
    assert s.identity.issuers[0].liveness.check == "kubernetes"
    assert s.identity.issuers[0].liveness.unseen_grace == 86400
    assert s.kubernetes is not None and s.kubernetes.watch and s.kubernetes.issuer == "k8s-prod"
    assert s.events.sqs is not None and s.events.sqs.issuer == "batch"
    assert s.reconcile.revoke_orphans is False
    assert (s.audit.checkpoint.signer, s.audit.transit.key) == ("transit", "broker-audit")
    assert s.audit.checkpoint.file == Path("/var/lib/broker/audit-checkpoints.jsonl")
