"""The ``store`` section: the database the leases are recorded in."""

from __future__ import annotations

from pydantic import Field, field_validator

from broker.leases.reach import scheme_problem
from broker.settings import Frozen


class StoreSettings(Frozen):
    # A PostgreSQL URL may hold the password: never in a repr (a traceback, a debug line).
    url: str = Field("sqlite:///broker.db", repr=False)
    pool_size: int = Field(20, ge=1, le=200)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)
    # PostgreSQL: the common case of issuance's steps, of a termination and of a
    # revocation job's end in one round trip each (server-side functions, on a second
    # pool of up to ``pool_size`` connections). Off: every step on the general path, a
    # transaction of several statements (the same answers, slower).
    one_round_trip: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        problem = scheme_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v
