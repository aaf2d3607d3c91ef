"""Asking the broker, at admission time, whether the pod's service account would be
granted the roles its annotations request (``POST /v1/admin/policy/preview``).

The answer becomes AdmissionResponse warnings (or, with ``strict: true``, a refusal); a
broker that cannot answer in time costs a warning, never the pod. The injector's admin
token is read from its file for each call (it may be rotated) and travels only in the
Authorization header.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from broker.injector.model import (
    Preview,
    PreviewAnswer,
    PreviewQuery,
    PreviewUnavailable,
    RoleVerdict,
)
from broker.secret import Secret

PATH = "/v1/admin/policy/preview"
# A refusal's code as the broker's error codes are spelled (role_not_permitted, role_locked):
# anything else is not passed on to the pod's creator.
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def parse_answer(query: PreviewQuery, status: int, body: object) -> Preview:
    """The broker's HTTP answer as a ``Preview``. Pure. Anything but a well-formed 200 is
    ``PreviewUnavailable`` naming the status and the broker's error code (never more of
    the body, which is the broker's to word). Of each verdict only the role, whether it is
    granted and the code are kept: the reason stays with the broker."""
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        said = f" {code}" if isinstance(code, str) and code.isidentifier() else ""
        return PreviewUnavailable(f"the broker answered {status}{said}")
    roles = body.get("roles") if isinstance(body, dict) else None
    if not isinstance(roles, list):
        return PreviewUnavailable("the broker's answer has no roles list")
    verdicts = []
    for item in roles:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("role"), str)
            or not isinstance(item.get("granted"), bool)
        ):
            return PreviewUnavailable("the broker's answer is not understood")
        code = item.get("code")
        verdicts.append(
            RoleVerdict(
                role=item["role"],
                granted=item["granted"],
                code=code if isinstance(code, str) and _CODE.match(code) else None,
            )
        )
    return PreviewAnswer(workload=query.workload, verdicts=tuple(verdicts))


class PreviewClient:
    """One preview call per admitted pod, bounded by ``timeout_s``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        broker_url: str,
        token_file: Path,
        timeout_s: float,
        ca_file: Path | None = None,
    ) -> None:
        self._session = session
        self._url = broker_url.rstrip("/") + PATH
        self._token_file = token_file
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_file))

    def _token(self) -> Secret | None:
        try:
            token = self._token_file.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return Secret(token) if token else None

    async def ask(self, query: PreviewQuery) -> Preview:
        token = self._token()
        if token is None:
            return PreviewUnavailable(f"the admin token file {self._token_file} cannot be read")
        headers = {"Authorization": f"Bearer {token.reveal()}"}
        try:
            async with self._session.post(
                self._url,
                json=query.body(),
                headers=headers,
                timeout=self._timeout,
                ssl=self._ssl,
            ) as resp:
                body: Any = None
                if resp.content_type == "application/json":
                    body = await resp.json()
                return parse_answer(query, resp.status, body)
        except TimeoutError:
            return PreviewUnavailable(f"no answer within {self._timeout_s:g}s")
        except (aiohttp.ClientError, ValueError, asyncio.IncompleteReadError) as exc:
            return PreviewUnavailable(f"the broker is unreachable ({type(exc).__name__})")
