"""The replay record's SQL: keys used once (token ids, webhook signatures), each kept
until its own expiry under a namespace."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.leases import models as m
from broker.leases.sql.common import INSERT_SEEN, SEEN_TOKENS


async def is_used(conn: AsyncConnection, namespace: str, key: str) -> bool:
    row = (
        await conn.execute(
            select(m.SeenToken.jti).where(
                m.SeenToken.issuer_name == namespace, m.SeenToken.jti == key
            )
        )
    ).first()
    return row is not None


async def remember(conn: AsyncConnection, namespace: str, key: str, keep_until: datetime) -> None:
    """Raises ``IntegrityError`` if ``key`` is remembered already."""
    await conn.execute(
        INSERT_SEEN, {"issuer_name": namespace, "jti": key, "expires_at": keep_until}
    )


async def forget_expired(conn: AsyncConnection, before: datetime) -> int:
    res = await conn.execute(SEEN_TOKENS.delete().where(m.SeenToken.expires_at < before))
    return int(res.rowcount or 0)
