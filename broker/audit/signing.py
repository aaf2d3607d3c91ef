"""The configured signer and the signature checks, built from the ``audit`` section.

Construction does no I/O (``broker.app.assemble``); ``start`` loads a file key (a key
that does not load stops start-up with a message naming the file). The transit signer
needs nothing at start: a transit key that is missing or refused shows as a logged,
retried signing failure, never as a broker that will not start.
"""

from __future__ import annotations

import asyncio

from broker.audit.checkpoint import Checkpoint
from broker.audit.settings import AuditSettings
from broker.audit.signers import (
    CheckpointSigner,
    FileSigner,
    Signatures,
    TransitKeys,
    TransitSigner,
    Verdict,
    load_private_key,
)
from broker.errors import UpstreamUnavailable


class _NotStarted:
    async def sign(self, message: bytes) -> tuple[str, str, str]:
        raise UpstreamUnavailable("the checkpoint signer is not started", code="signer_not_ready")


class CheckpointSigning:
    def __init__(self, settings: AuditSettings, transit: TransitKeys) -> None:
        self._settings = settings
        transit_key = settings.transit.key
        self.signatures = Signatures(transit=transit, transit_key=transit_key)
        self._signer: CheckpointSigner = (
            TransitSigner(transit, transit_key)
            if settings.checkpoint.signer == "transit"
            else _NotStarted()
        )

    @property
    def kind(self) -> str:
        return self._settings.checkpoint.signer

    async def start(self) -> None:
        if self._settings.file is None:
            return
        key = await asyncio.to_thread(load_private_key, self._settings.file.private_key)
        signer = FileSigner(key)
        self.signatures.trust_file_key(signer.public)
        if self._settings.checkpoint.signer == "file":
            self._signer = signer

    async def sign(self, message: bytes) -> tuple[str, str, str]:
        return await self._signer.sign(message)

    async def check(self, checkpoint: Checkpoint) -> Verdict:
        """Whether a trusted key signed ``checkpoint`` (None: cannot be told now)."""
        return await self.signatures.check_async(checkpoint)
