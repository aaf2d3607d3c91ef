"""Is an instance still alive? Asked of the instance's source before a renewal.

A check answers ``True`` (alive), ``False`` (confirmed gone: the pod no longer exists or
has another uid, the EC2 instance is shutting down or terminated) or ``None`` (could not
tell: the source is unreachable or refused). Only ``False`` terminates the instance; a
``None`` renews as if no check were configured, and is counted, so that an outage of the
Kubernetes API does not stop every workload's renewals.

One module per check (``kubernetes``, ``ec2``) over its provider's client
(``broker.kubernetes``, ``broker.aws``); ``sightings`` records that an instance was seen.
"""

from __future__ import annotations

from typing import Protocol

from broker.identity.model import Identity


class LivenessCheck(Protocol):
    async def alive(self, identity: Identity) -> bool | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


__all__ = ["LivenessCheck"]
