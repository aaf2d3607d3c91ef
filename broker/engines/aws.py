"""AWS: access keys from HashiCorp Vault's AWS secrets engine, or an STS session the broker
gets itself with an OIDC token from OpenBao's identity engine.

Modes:

- ``iam_user``: ``GET <mount>/creds/<role>``. Vault creates an IAM user and key under a
  lease; revoking the lease deletes the user. No session token; the expiry is the
  lease's (Vault's ``aws/config/lease`` sets it: the path takes no TTL).
- ``assumed_role``: ``POST <mount>/sts/<role>`` with ``ttl``, the role's ``role_arn`` option
  and ``role_session_name`` templated from the identity (e.g. ``{instance_id}``).
- ``federation_token``: ``POST <mount>/sts/<role>`` with ``ttl``.
- ``web_identity``: ``GET identity/oidc/token/<vault_role>`` with the instance token (which
  needs an identity entity: ``vault.entity_alias``), then STS
  ``AssumeRoleWithWebIdentity`` on the ``role_arn`` option, session name = the instance id,
  an optional session policy narrowing the role. Works with OpenBao, which has no AWS
  engine; no AWS key exists anywhere but in the answer.

Every mode answers the JSON an AWS SDK's ``credential_process`` reads, as the response's
``data`` itself (``{"Version": 1, "AccessKeyId", "SecretAccessKey", "SessionToken",
"Expiration"}``), so ``credential_process = sh -c "curl … | jq .data"`` needs no
translation and all modes have one shape. Vault's own field names differ by version
(``session_token`` now, ``security_token`` before 1.13): both are read.

An STS session cannot be revoked (Vault's revoke of an STS lease is a no-op). So STS
modes are pinned to STS's minimum of 15 minutes, a lease limit refuses rather than
"revokes" the oldest, a release is refused, and termination denies the instance's
sessions in IAM (``web_identity``, and ``assumed_role`` with ``deny_on_revoke``): see
``broker.aws.iam_policy`` and deploy/engines/aws.md.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from broker.aws import (
    ROLE_ARN,
    SESSION_NAME,
    STS_MIN_DURATION_S,
    SessionRef,
    StsSession,
    WebIdentityRequest,
    iso_seconds,
    session_name_for,
)
from broker.engines.base import Engine, Mode, VaultRequest, text_ref
from broker.engines.oidc import identity_token, identity_token_request
from broker.errors import BadRequest, UpstreamRejected
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

STS_MODES = frozenset({"assumed_role", "federation_token", "web_identity"})
SESSION_POLICY_MAX_CHARS = 2048  # STS's limit for an inline session policy
_POLICY_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(?:\d{12}|aws):policy/[\x21-\x7e]{1,1024}\Z")
_STS_LITERAL = re.compile(r"^[A-Za-z0-9_+=,.@-]*\Z")


def credential_process(
    access_key_id: str, secret_access_key: str, session_token: str | None, expiration: datetime
) -> dict[str, Any]:
    return {
        "Version": 1,
        "AccessKeyId": access_key_id,
        "SecretAccessKey": secret_access_key,
        "SessionToken": session_token,
        "Expiration": iso_seconds(expiration),
    }


def _bad(what: str) -> UpstreamRejected:
    return UpstreamRejected(
        f"Vault's AWS answer is not usable: {what}; check the AWS secrets engine and the "
        "Vault role's credential_type",
        code="vault_bad_response",
    )


def _text(data: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise _bad(f"{key} is not a string")
            return value
    return None


def _literal_text(template: str) -> str:
    return "".join(lit for lit, *_ in string.Formatter().parse(template))


def _check_session_policy(value: Any) -> None:
    if not isinstance(value, Mapping) or "Statement" not in value or "Version" not in value:
        raise ValueError(
            "options.session_policy: expected an IAM policy (a mapping with Version and Statement)"
        )
    if len(json.dumps(value, separators=(",", ":"))) > SESSION_POLICY_MAX_CHARS:
        raise ValueError(
            f"options.session_policy: longer than STS's {SESSION_POLICY_MAX_CHARS} characters"
        )


class AwsEngine(Engine):
    name = "aws"
    kind = "aws_credentials"
    modes = {
        "iam_user": Mode(),
        "assumed_role": Mode(
            templates=frozenset({"role_session_name"}),
            options=frozenset({"role_arn", "deny_on_revoke"}),
        ),
        "federation_token": Mode(),
        "web_identity": Mode(
            options=frozenset({"role_arn", "session_policy", "policy_arns"}),
            required_options=frozenset({"role_arn"}),
        ),
    }

    def _mode_name(self, role: RoleSettings) -> str:
        return role.mode or next(iter(self.modes))

    # -- load time -------------------------------------------------------------------

    def requires(self, role: RoleSettings) -> frozenset[str]:
        mode = self._mode_name(role)
        if mode == "web_identity":
            return frozenset({"aws", "entity"})
        if mode == "assumed_role" and role.options.get("deny_on_revoke"):
            return frozenset({"aws"})
        return frozenset()

    def revocable(self, role: RoleSettings) -> bool:
        # Revoking the Vault lease of an STS session does nothing at AWS.
        return self._mode_name(role) not in STS_MODES

    def check_role(self, role: RoleSettings) -> None:
        mode = self._mode_name(role)
        arn = role.options.get("role_arn")
        if arn is not None and (not isinstance(arn, str) or not ROLE_ARN.match(arn)):
            raise ValueError("options.role_arn: expected an IAM role ARN")
        if mode in STS_MODES:
            if not role.default_ttl == role.max_ttl == STS_MIN_DURATION_S:
                raise ValueError(
                    "an STS session cannot be revoked, so it lives as short as STS allows: "
                    "set default_ttl and max_ttl to 15m"
                )
            if role.on_limit != "refuse":
                raise ValueError(
                    "on_limit: an STS session cannot be revoked to make room; set refuse"
                )
        template = role.params.get("role_session_name")
        if template is not None and not _STS_LITERAL.match(_literal_text(template)):
            raise ValueError(
                "params.role_session_name: only letters, digits and _ + = , . @ - may "
                "surround the template fields (an STS session name)"
            )
        if mode == "assumed_role":
            deny = role.options.get("deny_on_revoke", False)
            if not isinstance(deny, bool):
                raise ValueError("options.deny_on_revoke: expected true or false")
            if deny and (arn is None or "{instance_id}" not in (template or "")):
                raise ValueError(
                    "options.deny_on_revoke needs options.role_arn and a "
                    "params.role_session_name holding {instance_id}: the deny names one "
                    "instance's sessions on one role"
                )
        if mode == "web_identity":
            if role.mount != "identity":
                raise ValueError(
                    "mount: web_identity reads OIDC tokens from Vault's identity engine; "
                    "set mount: identity and vault_role to the OIDC role"
                )
            if "session_policy" in role.options:
                _check_session_policy(role.options["session_policy"])
            arns = role.options.get("policy_arns", [])
            if (
                not isinstance(arns, list | tuple)
                or len(arns) > 10
                or not all(isinstance(a, str) and _POLICY_ARN.match(a) for a in arns)
            ):
                raise ValueError("options.policy_arns: expected at most 10 IAM policy ARNs")

    # -- per request -----------------------------------------------------------------

    def check_caller(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any]
    ) -> None:
        name = params.get("role_session_name")
        if name is not None and not SESSION_NAME.match(name):
            raise ValueError(
                "the role_session_name this identity renders is not an STS session name "
                "(2 to 64 characters)"
            )

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        mode = self._mode_name(role)
        if mode == "iam_user":
            path = vault_path(role.mount, "creds", role.vault_role)
            return VaultRequest("GET", path, None, False)  # the path takes no TTL
        if ttl < STS_MIN_DURATION_S:
            raise BadRequest(
                "this role issues AWS STS sessions of 15 minutes, STS's minimum; ask for "
                "ttl 15m or leave ttl out",
                code="ttl_below_minimum",
            )
        if mode == "web_identity":
            # The token is only exchanged: the session's duration is set at STS.
            return replace(identity_token_request(role), ttl_applied=True)
        body: dict[str, Any] = {"ttl": f"{STS_MIN_DURATION_S}s"}
        if mode == "assumed_role":
            if "role_arn" in role.options:
                body["role_arn"] = role.options["role_arn"]
            if "role_session_name" in params:
                body["role_session_name"] = params["role_session_name"]
        return VaultRequest("POST", vault_path(role.mount, "sts", role.vault_role), body, True)

    def session_ref(
        self, role: RoleSettings, params: Mapping[str, str], instance_id: str
    ) -> SessionRef | None:
        """The STS sessions termination must deny for a lease of this role, known before
        anything is issued; None if termination has nothing to do at AWS. Raises
        ValueError if the instance id cannot name a session."""
        mode = self._mode_name(role)
        if mode == "web_identity":
            return SessionRef(role.options["role_arn"], session_name_for(instance_id))
        if mode == "assumed_role" and role.options.get("deny_on_revoke"):
            return SessionRef(role.options["role_arn"], params["role_session_name"])
        return None

    def exchange(
        self, role: RoleSettings, instance_id: str, data: Mapping[str, Any], ttl: int
    ) -> WebIdentityRequest | None:
        """What to ask STS for with Vault's answer, or None when Vault's answer is the
        credential."""
        if self._mode_name(role) != "web_identity":
            return None
        token = identity_token(data)
        policy = role.options.get("session_policy")
        return WebIdentityRequest(
            role_arn=role.options["role_arn"],
            session_name=session_name_for(instance_id),
            token=token,
            duration_s=STS_MIN_DURATION_S,
            policy=json.dumps(policy, separators=(",", ":")) if policy is not None else None,
            policy_arns=tuple(role.options.get("policy_arns", ())),
        )

    # -- answers ---------------------------------------------------------------------

    def shape_session(self, role: RoleSettings, session: StsSession) -> dict[str, Any]:
        return credential_process(
            session.access_key_id,
            session.secret_access_key.reveal(),
            session.session_token.reveal(),
            session.expiration,
        )

    def shape_expiring(
        self, role: RoleSettings, data: Mapping[str, Any], expires_at: datetime
    ) -> dict[str, Any]:
        """Vault's answer, with the expiry of its lease (Vault's AWS answers carry none)."""
        access_key = _text(data, "access_key")
        secret_key = _text(data, "secret_key")
        if access_key is None or secret_key is None:
            raise _bad("access_key or secret_key is missing")
        token = _text(data, "session_token", "security_token")
        sts = self._mode_name(role) in STS_MODES
        if sts and token is None:
            raise _bad("an STS credential came without a session token")
        if not sts and token is not None:
            raise _bad("an iam_user credential came with a session token")
        return credential_process(access_key, secret_key, token, expires_at)

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        # An access key id names the key in IAM and CloudTrail; its secret key is not named.
        return text_ref(data, access_key_id="access_key")

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(
            "AWS credentials carry their expiry: the broker calls shape_expiring"
        )
