"""The checks every engine shares: which role parameters, options and request parameters a
role may have (at load time), and which a caller may send (per request)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.engines import ENGINES
from broker.engines.base import CallerCheck, Engine, Mode, read_caller_params, validate_role
from broker.engines.role import RoleSettings
from broker.errors import BadRequest


def text_param(max_bytes: int, what: str) -> CallerCheck:
    """A caller parameter that is a non-empty string of at most ``max_bytes`` (the real
    engines check CSRs and public keys; this stands for any such check)."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {what} as a non-empty string")
        if len(value.encode()) > max_bytes:
            raise ValueError(f"too long (at most {max_bytes} bytes)")
        return value

    return check


class _Sample(Engine):
    # No ``name`` in the class body: a test engine is never registered. ``modes`` mimics a
    # real engine with a default mode and one taking a caller parameter.
    modes = {
        "plain": Mode(templates=frozenset({"cn", "alt"}), required_templates=frozenset({"cn"}),
                      options=frozenset({"tenant", "extra"}),
                      required_options=frozenset({"tenant"})),
        "signed": Mode(templates=frozenset({"cn"}), required_templates=frozenset({"cn"}),
                       caller={"csr": text_param(64, "a CSR"), "hint": text_param(8, "a hint")},
                       required_caller=frozenset({"csr"})),
    }


SAMPLE = _Sample()
SAMPLE.name = "sample"  # type: ignore[misc]


def _role(**kw: Any) -> RoleSettings:
    # model_construct: bypass RoleSettings' own engine lookup; validate_role is under test.
    base = {"engine": "sample", "mode": None, "mount": "m", "vault_role": "r", "default_ttl": 60,
            "max_ttl": 600, "params": {"cn": "{workload}"}, "request_params": None,
            "options": {"tenant": "t"}, "max_leases_per_instance": 3,
            "on_limit": "revoke_oldest"}
    return RoleSettings.model_construct(**{**base, **kw})


@pytest.mark.parametrize(("kw", "message"), [
    ({"mode": "nope"}, "mode: engine sample has modes plain, signed; got 'nope'"),
    ({"params": {"cn": "x", "bogus": "y"}},
     "params: engine sample takes no bogus (allowed: alt, cn)"),
    ({"params": {}}, "params: engine sample needs cn"),
    ({"options": {}}, "options: engine sample needs tenant"),
    ({"options": {"tenant": "t", "zone": "z"}},
     "options: engine sample takes no zone (allowed: extra, tenant)"),
    ({"request_params": ("csr",)},
     "request_params: engine sample lets a caller send nothing; got csr"),
    ({"mode": "signed", "options": {}, "request_params": ("hint",)},
     "request_params: engine sample needs csr from the caller"),
    ({"mode": "signed", "options": {}, "request_params": ("csr", "path")},
     "request_params: engine sample lets a caller send csr, hint; got path"),
], ids=["unknown-mode", "unknown-template", "missing-template", "missing-option",
        "unknown-option", "caller-param-mode-without", "caller-param-required-left-out",
        "caller-param-unknown"])
def test_validate_role_names_what_is_wrong(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_role(SAMPLE, _role(**kw))
    assert str(err.value) == message


@pytest.mark.parametrize("kw", [
    {}, {"mode": "plain", "params": {"cn": "a", "alt": "b"}, "options": {"tenant": "t",
                                                                          "extra": 1}},
    {"mode": "signed", "options": {}}, {"mode": "signed", "options": {},
                                        "request_params": ("csr", "hint")},
], ids=["default-mode", "all-optional", "signed-default-params", "signed-with-optional"])
def test_validate_role_accepts_what_the_mode_takes(kw: dict[str, Any]) -> None:
    validate_role(SAMPLE, _role(**kw))


SIGNED = _role(mode="signed", options={})


@pytest.mark.parametrize(("role", "body", "code", "message"), [
    (_role(), {"csr": "x"}, "unknown_parameter",
     "role 'r1' does not take csr from a request (it takes: role, ttl)"),
    (SIGNED, {"csr": "x", "hint": "h"}, "unknown_parameter",
     "role 'r1' does not take hint from a request (it takes: csr, role, ttl)"),
    (SIGNED, {}, "missing_parameter", "this role needs csr in the request"),
    (SIGNED, {"csr": ""}, "invalid_parameter", "csr: expected a CSR as a non-empty string"),
    (SIGNED, {"csr": 5}, "invalid_parameter", "csr: expected a CSR as a non-empty string"),
    (SIGNED, {"csr": "x" * 65}, "invalid_parameter", "csr: too long (at most 64 bytes)"),
], ids=["no-caller-params", "optional-not-granted", "required-missing", "empty", "not-a-string",
        "too-long"])
def test_caller_parameters_are_refused_unless_the_role_takes_them(
        role: RoleSettings, body: dict[str, Any], code: str, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        read_caller_params(SAMPLE, "r1", role, body)
    assert (err.value.status, err.value.code, err.value.message) == (400, code, message)


def test_a_refusal_never_echoes_the_value() -> None:
    secret = "-----BEGIN SECRET-----" + "s" * 80
    with pytest.raises(BadRequest) as err:
        read_caller_params(SAMPLE, "r1", SIGNED, {"csr": secret})
    assert "SECRET" not in err.value.message


def test_accepted_caller_parameters_are_returned_checked() -> None:
    granted = _role(mode="signed", options={}, request_params=("csr", "hint"))
    assert read_caller_params(SAMPLE, "r1", granted, {"csr": "abc", "hint": "h"}) == {
        "csr": "abc", "hint": "h"}
    assert read_caller_params(SAMPLE, "r1", granted, {"csr": "abc"}) == {"csr": "abc"}


def test_every_registered_engine_has_a_name_a_kind_and_a_default_mode() -> None:
    assert ENGINES, "no engine was discovered"
    for name, engine in ENGINES.items():
        assert engine.name == name
        assert engine.kind and engine.modes
        assert next(iter(engine.modes)) in engine.modes
