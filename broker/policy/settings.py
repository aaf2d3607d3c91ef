"""The ``policy`` section: rules that say which roles an identity may ask for."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.durations import parse_duration
from broker.identity.settings import ClaimPath, claim_path
from broker.settings import Frozen


class ClaimMatch(Frozen):
    """One condition of a rule. ``claim`` is a path into the verified claims; ``identity``
    names a mapped identity field (``instance_id``, ``workload``, ``subject``). Exactly one
    of ``exact``, ``glob``, ``regex``, ``one_of`` says how to compare."""

    claim: ClaimPath | None = None
    identity: Literal["instance_id", "workload", "subject"] | None = None
    exact: str | None = None
    glob: str | None = None
    regex: str | None = None
    one_of: tuple[str, ...] | None = None

    @field_validator("claim", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return None if v is None else claim_path(v)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return v

    @model_validator(mode="after")
    def _one_each(self) -> ClaimMatch:
        if (self.claim is None) == (self.identity is None):
            raise ValueError("set exactly one of 'claim' or 'identity'")
        ops = [x for x in (self.exact, self.glob, self.regex, self.one_of) if x is not None]
        if len(ops) != 1:
            raise ValueError("set exactly one of 'exact', 'glob', 'regex', 'one_of'")
        return self


class Rule(Frozen):
    name: str
    issuer: str | None = None
    match: tuple[ClaimMatch, ...] = ()
    allow: tuple[str, ...] = Field(min_length=1)
    max_ttl: Annotated[int, Field(ge=1)] | None = None

    _ttl = field_validator("max_ttl", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class PolicySettings(Frozen):
    rules: tuple[Rule, ...] = ()
