"""Review finding 8c on real OpenBao: checkpoints signed by the transit key, then Vault
out of reach (a fault proxy cut in front of it) while a verifier that never read the
key's versions checks them. The report must say the signatures could not be checked,
not that the chain was tampered with; once Vault is back they check out."""

from __future__ import annotations

from broker.audit.service import AuditVerification
from broker.audit.signers import REFRESH_S, Signatures
from broker.audit.verify import SIGNATURE_UNCHECKED
from broker.cli.ctl import EXIT_OK, EXIT_UNAVAILABLE
from broker.cli.ctl_audit import verify_verdict
from broker.clock import SystemClock
from broker.vault.client import VaultClient
from broker.vault.transit import Transit
from tests.harness.proxy import FaultProxy
from tests.harness.wait import eventually


async def test_vault_out_of_reach_is_unchecked_not_tampered(make_broker, bao):
    b = await make_broker(overrides={"audit": {"checkpoint": {
        "every": "1s", "every_events": 100000, "signer": "transit"}}})
    ledgers = b.broker.components.ledgers
    for i in range(3):
        await ledgers.reconcile.record_audit("reconciler", "test.event", n=i)
    [cp, *_] = await eventually(ledgers.audit.checkpoints, "a transit-signed checkpoint")
    assert cp.signer == "transit"

    proxy = FaultProxy("127.0.0.1", bao.port)
    await proxy.start()
    vault = VaultClient(b.settings.vault.model_copy(update={"addr": proxy.url}), SystemClock())
    try:
        await vault.start()
        now = [0.0]
        sigs = Signatures(transit=Transit(vault, "transit"), transit_key="broker-audit",
                          monotonic=lambda: now[0])
        verification = AuditVerification(ledgers.chain, check_signature=sigs.check_async)
        proxy.cut()
        report = await verification.verify()
        assert not report.ok and not report.tampered
        assert {f.kind for f in report.findings} == {SIGNATURE_UNCHECKED}
        doc = report.to_dict()
        assert "Vault unreachable" in doc["findings"][0]["message"]
        assert verify_verdict(doc) == EXIT_UNAVAILABLE
        proxy.restore()
        now[0] += REFRESH_S + 1
        again = await verification.verify()
        assert again.ok and again.signatures_checked and verify_verdict(again.to_dict()) == EXIT_OK
    finally:
        await vault.close()
        await proxy.stop()
