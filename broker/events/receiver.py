"""The signed event webhook's receiver: the signature (``webhook``), the replay record and
one ``Terminate`` per instance, in that order."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

from broker.clock import Clock
from broker.errors import BadRequest, EventUnauthorized, NotPermitted
from broker.events import Terminate, webhook
from broker.events.settings import WebhookSettings
from broker.leases import JobView

# The webhook's accepted signatures share the replay record with token ids; '@' keeps the
# namespace apart from every issuer name.
WEBHOOK_REPLAY_NAMESPACE = "@event-webhook"


class ReplayGuard(Protocol):
    """The shared replay record, where the webhook remembers the signatures it accepted."""

    async def is_used(self, namespace: str, key: str) -> bool: ...

    async def use_once(self, namespace: str, key: str, *, keep_until: datetime) -> bool: ...


class WebhookReceiver:
    def __init__(
        self,
        settings: WebhookSettings,
        *,
        replay: ReplayGuard,
        terminate: Terminate,
        clock: Clock,
        issuer_names: frozenset[str],
    ) -> None:
        self._settings = settings
        self._replay = replay
        self._terminate = terminate
        self._clock = clock
        self._issuer_names = issuer_names

    async def receive(
        self, body: bytes, *, timestamp: str | None, signature: str | None
    ) -> list[tuple[str, JobView | str]]:
        """Each instance gets its durable job before the answer; the signature is
        remembered only once every job is recorded, so a sender that saw a 503 can send
        the same request again. An instance refused is answered with its error code."""
        settings = self._settings
        digest, ts = webhook.verify(
            [s.get_secret_value().encode() for s in settings.secrets],
            timestamp=timestamp,
            signature=signature,
            body=body,
            now=self._clock.now().timestamp(),
            window_s=settings.window_s,
        )
        event = webhook.parse(body, max_instances=settings.max_instances)
        if event.issuer is not None and event.issuer not in self._issuer_names:
            raise BadRequest(
                "'issuer' must be the name of a configured issuer", code="invalid_issuer"
            )
        if await self._replay.is_used(WEBHOOK_REPLAY_NAMESPACE, digest):
            raise EventUnauthorized(
                "this signed request was already accepted", code="event_replayed"
            )
        results: list[tuple[str, JobView | str]] = []
        for instance_id in event.instance_ids:
            try:
                job = await self._terminate(
                    instance_id, actor="events:webhook", issuer=event.issuer, reason=event.reason
                )
            except NotPermitted as exc:
                results.append((instance_id, exc.code))
                continue
            results.append((instance_id, job))
        keep_until = datetime.fromtimestamp(ts + settings.window_s, UTC)
        if not await self._replay.use_once(WEBHOOK_REPLAY_NAMESPACE, digest, keep_until=keep_until):
            raise EventUnauthorized(
                "this signed request was already accepted", code="event_replayed"
            )
        return results
