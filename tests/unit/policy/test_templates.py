"""Role parameter templates: rendering and refusal of unsafe identity values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from broker.errors import NotPermitted
from broker.identity.model import Identity
from broker.policy.templates import render_params, template_fields


def make_identity(**overrides: Any) -> Identity:
    fields: dict[str, Any] = {
        "issuer_name": "dev",
        "issuer": "https://issuer.example",
        "subject": "payments",
        "instance_id": "i-123",
        "workload": "payments",
        "issued_at": datetime(2024, 1, 1, tzinfo=UTC),
        "expires_at": datetime(2024, 1, 1, 1, tzinfo=UTC),
        "claims": {},
    }
    fields.update(overrides)
    return Identity(**fields)


CN = {"common_name": "{workload}.workload.internal"}

RENDER_CASES = [
    (CN, {}, {"common_name": "payments.workload.internal"}, "workload-cn"),
    (CN, {"workload": "a"}, {"common_name": "a.workload.internal"}, "single-char"),
    (CN, {"workload": "A-1_b"}, {"common_name": "A-1_b.workload.internal"}, "mixed-safe-chars"),
    (CN, {"workload": "123"}, {"common_name": "123.workload.internal"}, "digits"),
    (CN, {"workload": "a" * 63}, {"common_name": "a" * 63 + ".workload.internal"},
     "63-chars-max"),
    ({"common_name": "{instance_id}.node.internal"}, {},
     {"common_name": "i-123.node.internal"}, "instance-id"),
    ({"common_name": "{workload}.{issuer_name}.internal",
      "alt_names": "{instance_id}.{workload}.internal,{workload}.svc"}, {},
     {"common_name": "payments.dev.internal",
      "alt_names": "i-123.payments.internal,payments.svc"}, "several-params-and-fields"),
    ({"common_name": "static.example"}, {}, {"common_name": "static.example"}, "no-fields"),
    ({"common_name": "{{workload}}.x"}, {}, {"common_name": "{workload}.x"}, "escaped-braces"),
    ({}, {}, {}, "no-params"),
    # only referenced fields are checked: an unsafe instance_id is irrelevant here
    (CN, {"instance_id": "../../sys"}, {"common_name": "payments.workload.internal"},
     "unreferenced-unsafe-field-ignored"),
]


@pytest.mark.parametrize(("templates", "overrides", "expected"),
                         [(a, b, c) for a, b, c, _ in RENDER_CASES],
                         ids=[i for *_, i in RENDER_CASES])
def test_render_params(templates: dict[str, str], overrides: dict[str, Any],
                       expected: dict[str, str]) -> None:
    assert render_params(templates, make_identity(**overrides)) == expected


UNSAFE_VALUES = [
    ("a/b", "slash"),
    ("/", "slash-only"),
    ("..", "dotdot"),
    ("a..b", "inner-dotdot"),
    ("../../sys/raw", "path-traversal"),
    ("a.b", "dot"),
    (".", "dot-only"),
    ("a.", "trailing-dot"),
    ("a b", "space"),
    (" a", "leading-space"),
    ("a ", "trailing-space"),
    ("a\tb", "tab"),
    ("a\nb", "inner-newline"),
    ("\na", "leading-newline"),
    ("a\r", "trailing-cr"),
    ("a\u2028b", "unicode-line-separator"),
    ("a\x00b", "nul"),
    ("a\x00", "trailing-nul"),
    ("a\x1b[31m", "escape-control"),
    ("a\x7fb", "del-control"),
    ("caf\u00e9", "latin1-letter"),
    ("\u00fcnicode", "umlaut-first"),
    ("pay\u017fments", "long-s"),
    ("\uff41", "fullwidth-a"),
    ("\u0440ayments", "cyrillic-homoglyph"),
    ("\u0661\u0662", "arabic-indic-digits"),
    ("{workload}", "braces-field"),
    ("a{b", "open-brace"),
    ("a}b", "close-brace"),
    ("{0.__class__}", "format-attribute"),
    ("a%2fb", "percent-encoded-slash"),
    ("%2e%2e", "percent-encoded-dots"),
    ("-a", "leading-hyphen"),
    ("-", "hyphen-only"),
    ("a-", "trailing-hyphen"),
    ("_a", "leading-underscore"),
    ("a*", "glob-star"),
    ("a,b", "comma-list-injection"),
    ("a@b", "at-sign"),
    ("a:b", "colon"),
    ("a\\b", "backslash"),
    ("a" * 64, "64-chars"),
    ("a" * 1000, "1000-chars"),
    ("", "empty"),
]

# Regression guard: SAFE_VALUE once ended in '$' (used with .match()), so 'payments\n'
# passed and rendered as 'payments\n.workload.internal'.
UNSAFE_VALUE_PARAMS = [pytest.param(v, id=i) for v, i in UNSAFE_VALUES] + [
    pytest.param("payments\n", id="trailing-newline"),
    pytest.param("a" * 63 + "\n", id="63-chars-plus-newline"),
]


@pytest.mark.parametrize("value", UNSAFE_VALUE_PARAMS)
def test_unsafe_workload_refused(value: str) -> None:
    with pytest.raises(NotPermitted) as info:
        render_params(CN, make_identity(workload=value))
    exc = info.value
    assert exc.code == "template_value_refused"
    assert exc.status == 403
    assert exc.message == (
        "the identity's workload cannot be used in parameter 'common_name': "
        "it must be letters, digits, '-' or '_' (at most 63)")


@pytest.mark.parametrize("value", UNSAFE_VALUE_PARAMS)
def test_unsafe_instance_id_refused(value: str) -> None:
    templates = {"common_name": "{workload}.workload.internal",
                 "alt_names": "{instance_id}.node.internal"}
    with pytest.raises(NotPermitted) as info:
        render_params(templates, make_identity(instance_id=value))
    assert info.value.code == "template_value_refused"
    assert info.value.message == (
        "the identity's instance_id cannot be used in parameter 'alt_names': "
        "it must be letters, digits, '-' or '_' (at most 63)")


@pytest.mark.parametrize(
    "value", ["../etc", "a\x00b", "a b"], ids=["traversal", "nul", "space"])
def test_refusal_message_does_not_echo_value(value: str) -> None:
    with pytest.raises(NotPermitted) as info:
        render_params(CN, make_identity(workload=value))
    assert value not in str(info.value)


FIELD_CASES = [
    ("{workload}.workload.internal", {"workload"}, "one-field"),
    ("{workload}-{instance_id}-{workload}", {"workload", "instance_id"}, "repeated"),
    ("static", set(), "no-field"),
    ("{{escaped}}", set(), "escaped"),
    ("", set(), "empty"),
]


@pytest.mark.parametrize(("template", "expected"), [(t, e) for t, e, _ in FIELD_CASES],
                         ids=[i for *_, i in FIELD_CASES])
def test_template_fields(template: str, expected: set[str]) -> None:
    assert template_fields(template) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [("{workload!r}", "template field {workload} must be a plain name like {workload}"),
     ("{workload:>80}", "template field {workload} must be a plain name like {workload}"),
     ("{workload.__class__}",
      "template field {workload.__class__} must be a plain name like {workload}"),
     ("{workload[0]}", "template field {workload[0]} must be a plain name like {workload}"),
     ("{}", "template field {} must be a plain name like {workload}"),
     ("{0}", "template field {0} must be a plain name like {workload}"),
     ("{workload", "malformed template (unbalanced braces)"),
     ("workload}", "malformed template (unbalanced braces)")],
    ids=["conversion", "format-spec", "attribute", "index", "positional", "numbered",
         "unclosed", "stray-closing"],
)
def test_template_fields_refuses_non_plain_fields(template: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        template_fields(template)
    assert str(info.value) == message
