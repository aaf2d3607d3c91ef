"""Database URLs and schema migrations (Alembic, scripts in ``schema/`` beside this module,
shipped in the package so that an installed broker, in an image say, can migrate)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.exc import SQLAlchemyError

from broker.leases.reach import unreachable

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "schema"


def async_url(url: str) -> str:
    """The serving path uses asyncpg: psycopg's async mode spent most of the broker's CPU
    registering and unregistering socket readers per query (profiled under bench/)."""
    if url.startswith("sqlite:"):
        return url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def sync_url(url: str) -> str:
    if url.startswith("sqlite+aiosqlite:"):
        return url.replace("sqlite+aiosqlite:", "sqlite:", 1)
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def alembic_config(url: str) -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = sync_url(url)
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


PROBE_TIMEOUT_S = 10


def probe(url: str) -> None:
    """Connect once: a store that cannot be reached stops here with one line that names
    it and says whether retrying can help (``ConfigError`` or ``StartupFailure``); the
    driver's traceback goes to the debug log."""
    args = {} if url.startswith("sqlite") else {"connect_timeout": PROBE_TIMEOUT_S}
    engine = create_engine(sync_url(url), poolclass=pool.NullPool, connect_args=args)
    try:
        with engine.connect():
            pass
    except (SQLAlchemyError, OSError) as exc:
        log.debug("the lease store cannot be reached", exc_info=True)
        raise unreachable(url, exc, PROBE_TIMEOUT_S) from None
    finally:
        engine.dispose()


def migrate(url: str) -> None:
    """Bring the store to the newest schema. Safe to run from several replicas at once:
    ``migrations/env.py`` takes an advisory lock on PostgreSQL."""
    probe(url)
    command.upgrade(alembic_config(url), "head")
