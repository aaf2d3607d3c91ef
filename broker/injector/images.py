"""Images named by tag rather than by digest, for the injector's ``image_digests``
option: a team that runs only immutable, pinned workloads enforces it where credentials
are handed out. Pure.

A reference is pinned when it ends in ``@sha256:<64 hex>`` (or ``@sha512:<128 hex>``), the
digest the kubelet pulls whatever tag precedes it; anything else (a tag, or no tag, which
means ``latest``) can name different bytes tomorrow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

ImageDigests = Literal["off", "warn", "refuse"]
_DIGEST = re.compile(r"@(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")


def by_digest(image: object) -> bool:
    """Whether ``image`` is a reference pinned to a digest."""
    return isinstance(image, str) and _DIGEST.search(image) is not None


def tagged(containers: Iterable[Mapping[str, Any]]) -> list[str]:
    """One finding per container whose image is not pinned to a digest, naming it."""
    return [
        f"container {c.get('name')!r}: image {c.get('image')!r} is named by tag, not by "
        "digest: use NAME@sha256:DIGEST"
        for c in containers
        if not by_digest(c.get("image"))
    ]


def digest_effect(
    mode: ImageDigests, containers: Iterable[Mapping[str, Any]]
) -> tuple[list[str], str | None]:
    """Warnings, or (with ``refuse``) a refusal's message, for ``containers``."""
    findings = [] if mode == "off" else tagged(containers)
    if not findings:
        return [], None
    why = "image_digests in the injector's configuration: only images pinned by digest"
    if mode == "refuse":
        return [], f"{'; '.join(findings)} ({why} are admitted)"
    return [f"{f} ({why} are expected)" for f in findings], None
