"""The agent's memory across runs: one JSON file (default ``DIR/.agent-state.json``) on the
pod's in-memory volume, shared by the init run and the long-running agent and kept
through restarts of either. It holds, per credential, what was issued (lease id, times,
whether it renews) and which files hold it, plus leases waiting to be given back;
never a credential value, a key or a token.

A state file that cannot be read is not fatal: the agent starts afresh (and says so);
the broker's per-instance lease limit bounds what that can cost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from broker.agent.files import write_atomic

VERSION = 1
STATE_PERMS = 0o600
DEFAULT_NAME = ".agent-state.json"
MAX_STATE_BYTES = 1024 * 1024
LEASE_ID = re.compile(r"^l-[0-9a-f]{32}\Z")  # the broker's lease ids; nothing else reaches a URL


@dataclass(frozen=True)
class Lease:
    lease_id: str
    leased: bool  # False: nothing to renew or give back (an SSH certificate, a kv secret)
    renewable: bool
    issued_at: datetime
    expires_at: datetime
    # When ``expires_at`` was learned (the issue or the last renewal): the next refresh
    # is due two thirds of the way from here to the expiry.
    seen_at: datetime
    max_expires_at: datetime | None = None  # known once a renewal has said it
    near_max: bool = False  # the broker said so, or a renewal no longer extends it


@dataclass(frozen=True)
class Entry:
    role: str
    digest: str  # CredentialSpec.digest(): a changed spec is issued afresh, not adopted
    files: tuple[str, ...]  # the files written for this lease, relative to the directory
    lease: Lease
    key_param: str | None = None  # keygen: which request parameter the role took


@dataclass(frozen=True)
class Retired:
    """A lease replaced by a newer one, to be given back at ``release_at`` (after the
    workload had time to switch)."""

    lease_id: str
    release_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class AgentState:
    credentials: Mapping[str, Entry] = field(default_factory=dict)
    retired: tuple[Retired, ...] = ()

    def with_entry(self, name: str, entry: Entry | None) -> AgentState:
        credentials = dict(self.credentials)
        if entry is None:
            credentials.pop(name, None)
        else:
            credentials[name] = entry
        return replace(self, credentials=credentials)

    def with_retired(self, retired: tuple[Retired, ...]) -> AgentState:
        return replace(self, retired=retired)


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("expected a time")
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise ValueError("expected a time with its zone")
    return dt


def _lease_id(value: Any) -> str:
    if not isinstance(value, str) or not LEASE_ID.match(value):
        raise ValueError("expected a lease id")
    return value


def _lease(d: Mapping[str, Any]) -> Lease:
    return Lease(
        lease_id=_lease_id(d["lease_id"]),
        leased=bool(d["leased"]),
        renewable=bool(d["renewable"]),
        issued_at=_time(d["issued_at"]),
        expires_at=_time(d["expires_at"]),
        seen_at=_time(d["seen_at"]),
        max_expires_at=_time(d["max_expires_at"]) if d.get("max_expires_at") else None,
        near_max=bool(d.get("near_max", False)),
    )


def decode(raw: bytes) -> AgentState:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"expected a version {VERSION} state document")
    credentials = {
        str(name): Entry(
            role=str(e["role"]),
            digest=str(e["digest"]),
            files=tuple(str(f) for f in e["files"]),
            lease=_lease(e["lease"]),
            key_param=str(e["key_param"]) if e.get("key_param") else None,
        )
        for name, e in doc.get("credentials", {}).items()
    }
    retired = tuple(
        Retired(_lease_id(r["lease_id"]), _time(r["release_at"]), _time(r["expires_at"]))
        for r in doc.get("retired", [])
    )
    return AgentState(credentials, retired)


def encode(state: AgentState) -> bytes:
    def plain(obj: Any) -> Any:
        return obj.isoformat() if isinstance(obj, datetime) else obj

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [walk(v) for v in obj]
        return plain(obj)

    doc = {
        "version": VERSION,
        "credentials": {n: walk(asdict(e)) for n, e in sorted(state.credentials.items())},
        "retired": [walk(asdict(r)) for r in state.retired],
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def load(path: Path) -> tuple[AgentState, str | None]:
    """The state at ``path`` and, if it could not be used, why (then the state is empty)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return AgentState(), None
    except OSError as exc:
        return AgentState(), f"cannot read it ({exc.strerror})"
    if len(raw) > MAX_STATE_BYTES:
        return AgentState(), "it is too large"
    try:
        return decode(raw), None
    except (ValueError, KeyError, TypeError, AttributeError):
        return AgentState(), "it is not a state document this agent wrote"


def save(path: Path, state: AgentState) -> None:
    write_atomic(path.parent, path.name, encode(state), STATE_PERMS)
