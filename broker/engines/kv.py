"""KV: a static secret read with the instance's token, for workloads that still need one.

Mode ``v2`` (the default) reads ``<mount>/data/<path>`` of a versioned KV mount, mode
``v1`` reads ``<mount>/<path>``. ``<path>`` is the role's ``path`` template, e.g.
``apps/{workload}/config``: the identity picks the secret, never the request. Each
``/``-separated segment is validated and escaped on its own, at config load (with the
longest value a template field can take) and again at every request, so the path can
neither climb (``..``) nor be empty nor gain a level.

A KV read has no lease: the value outlives the instance, and rotating it is the
operator's job. It is recorded as ``delivered`` and nothing is revoked at termination;
the broker can only stop handing it out. The role's ``vault_role`` is not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest
from broker.errors import UpstreamRejected
from broker.settings import template_fields
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

_PATH = frozenset({"path"})
_LONGEST_VALUE = "x" * 63  # what policy.templates lets an identity value be, at most


def secret_path(mount: str, version: str, path: str) -> str:
    """``<mount>/data/<path>`` (v2) or ``<mount>/<path>`` (v1), every segment of ``path``
    validated and escaped on its own. Raises UpstreamRejected (vault_path_refused)."""
    segments = path.split("/")
    return vault_path(mount, *(["data"] if version == "v2" else []), *segments)


def _bad(what: str) -> UpstreamRejected:
    return UpstreamRejected(
        f"Vault's KV answer is not usable: {what}; check that the role's mode matches "
        "the mount's KV version and that the secret has a current version",
        code="vault_bad_response",
    )


class KvEngine(Engine):
    name = "kv"
    kind = "static_secret"
    modes = {
        "v2": Mode(templates=_PATH, required_templates=_PATH, leased=False),
        "v1": Mode(templates=_PATH, required_templates=_PATH, leased=False),
    }

    def _version(self, role: RoleSettings) -> str:
        return role.mode or next(iter(self.modes))

    def check_role(self, role: RoleSettings) -> None:
        template = role.params["path"]
        try:
            fields = template_fields(template)
        except ValueError as exc:
            raise ValueError(f"params.path: {exc}") from None
        sample = template.format(**dict.fromkeys(fields, _LONGEST_VALUE))
        try:
            secret_path(role.mount, self._version(role), sample)
        except UpstreamRejected:
            raise ValueError(
                "params.path: expected segments separated by single '/', each starting "
                "with a letter or digit and made of letters, digits, '_', '.', '@', ':', "
                "'-' (no '..', no leading, trailing or doubled '/')"
            ) from None

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        path = secret_path(role.mount, self._version(role), params["path"])
        return VaultRequest("GET", path, None, False)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        if self._version(role) == "v1":
            return {"values": dict(data)}
        values, metadata = data.get("data"), data.get("metadata")
        if not isinstance(values, dict):
            raise _bad("the secret has no data")
        if not isinstance(metadata, dict):
            raise _bad("the secret has no version metadata")
        version, created = metadata.get("version"), metadata.get("created_time")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _bad("the secret's version is not a positive integer")
        if not isinstance(created, str) or not created:
            raise _bad("the secret's created_time is missing")
        return {"values": values, "version": version, "created_time": created}
