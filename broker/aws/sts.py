"""AWS STS's query API for ``AssumeRoleWithWebIdentity``: the form the broker sends and
the XML it gets back. Pure; ``broker.aws.client`` does the HTTP.

The call is unsigned (the OIDC token is the proof), so no SDK is needed for it. The
answer is parsed defensively: bounded in size, no DTD (so no entity expansion, external or
recursive), namespace-agnostic, every field checked. Nothing of an answer that does not
fit is echoed: it may carry the credential.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # noqa: S405 — bounded input, DTDs refused before parsing
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.aws import StsSession, WebIdentityRequest
from broker.errors import UpstreamRejected
from broker.secret import Secret

API_VERSION = "2011-06-15"
MAX_ANSWER_BYTES = 64 * 1024
_ACCESS_KEY_ID = re.compile(r"^[A-Za-z0-9_]{16,128}\Z")  # STS: [\w]*, 16 to 128
_ERROR_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9.]{0,63}\Z")
_ROLE_ID = re.compile(r"^[A-Za-z0-9]{4,128}:[A-Za-z0-9_+=,.@-]{2,64}\Z")
# STS errors that a retry may cure; any other refusal is the configuration's or the
# token's fault and is reported as such.
RETRYABLE = frozenset(
    {
        "IDPCommunicationError",
        "Throttling",
        "ThrottlingException",
        "ServiceUnavailable",
        "InternalFailure",
        "RequestTimeout",
    }
)


def web_identity_form(request: WebIdentityRequest) -> dict[str, str]:
    form = {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": API_VERSION,
        "RoleArn": request.role_arn,
        "RoleSessionName": request.session_name,
        "WebIdentityToken": request.token.reveal(),
        "DurationSeconds": str(request.duration_s),
    }
    if request.policy is not None:
        form["Policy"] = request.policy
    for i, arn in enumerate(request.policy_arns, start=1):
        form[f"PolicyArns.member.{i}.arn"] = arn
    return form


def _bad(what: str) -> UpstreamRejected:
    return UpstreamRejected(f"AWS STS's answer is not usable: {what}", code="aws_sts_bad_response")


def _parse(body: bytes) -> ET.Element:
    if len(body) > MAX_ANSWER_BYTES:
        raise _bad("it is too large")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise _bad("it carries a DTD")
    try:
        return ET.fromstring(body)  # noqa: S314 — see _parse's checks above
    except ET.ParseError:
        raise _bad("it is not XML") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(node: ET.Element | None, name: str) -> ET.Element | None:
    if node is None:
        return None
    for child in node:
        if _local(child.tag) == name:
            return child
    return None


def _path(root: ET.Element, *names: str) -> ET.Element | None:
    node: ET.Element | None = root
    for name in names:
        node = _child(node, name)
    return node


def _text(root: ET.Element, *names: str) -> str:
    node = _path(root, *names)
    value = (node.text or "").strip() if node is not None else ""
    if not value:
        raise _bad(f"{names[-1]} is missing")
    return value


def parse_expiration(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad("Expiration is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise _bad("Expiration has no time zone")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00
        raise _bad("Expiration is out of range") from None


def parse_session(body: bytes) -> StsSession:
    """An ``AssumeRoleWithWebIdentityResponse`` → the session it carries."""
    root = _parse(body)
    if _local(root.tag) != "AssumeRoleWithWebIdentityResponse":
        raise _bad("it is not an AssumeRoleWithWebIdentity response")
    result = ("AssumeRoleWithWebIdentityResult",)
    key_id = _text(root, *result, "Credentials", "AccessKeyId")
    if not _ACCESS_KEY_ID.match(key_id):
        raise _bad("AccessKeyId is malformed")
    role_id = _text(root, *result, "AssumedRoleUser", "AssumedRoleId")
    if not _ROLE_ID.match(role_id):
        raise _bad("AssumedRoleId is malformed")
    return StsSession(
        access_key_id=key_id,
        secret_access_key=Secret(_text(root, *result, "Credentials", "SecretAccessKey")),
        session_token=Secret(_text(root, *result, "Credentials", "SessionToken")),
        expiration=parse_expiration(_text(root, *result, "Credentials", "Expiration")),
        assumed_role_id=role_id,
        arn=_text(root, *result, "AssumedRoleUser", "Arn"),
    )


@dataclass(frozen=True)
class StsError:
    code: str  # STS's error code, or "unknown" when the answer names none we can trust

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


def parse_error(body: bytes) -> StsError:
    """An ``ErrorResponse`` → its code only: STS's messages are not repeated, so that
    nothing of a request (a token claim) can reach a log line through them."""
    try:
        root = _parse(body)
    except UpstreamRejected:
        return StsError("unknown")
    node = _path(root, "Error", "Code")
    code = (node.text or "").strip() if node is not None else ""
    return StsError(code if _ERROR_CODE.match(code) else "unknown")
