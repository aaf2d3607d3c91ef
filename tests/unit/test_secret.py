"""Secret: never rendered, never pickled, revealed only on purpose."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from broker.secret import Secret

VALUE = "hunter2-very-secret-value"

RENDERINGS = [
    (lambda s: repr(s), "Secret('***')", "repr"),
    (lambda s: str(s), "***", "str"),
    (lambda s: format(s), "***", "format"),
    (lambda s: format(s, ">20"), "***", "format-spec"),
    (lambda s: f"{s}", "***", "fstring"),
    (lambda s: f"{s!s}", "***", "fstring-s"),
    (lambda s: f"{s!r}", "Secret('***')", "fstring-r"),
    (lambda s: f"{s!a}", "Secret('***')", "fstring-a"),
    (lambda s: f"{s:>40}", "***", "fstring-spec"),
    (lambda s: f"{s=}", "s=Secret('***')", "fstring-debug"),
    # the old-style paths are the point of these cases
    (lambda s: "%s" % s, "***", "percent-s"),  # noqa: UP031
    (lambda s: "%r" % (s,), "Secret('***')", "percent-r"),  # noqa: UP031
    (lambda s: "{}".format(s), "***", "str-format"),  # noqa: UP032
    (lambda s: "{0!r}".format(s), "Secret('***')", "str-format-r"),  # noqa: UP030,UP032
    (lambda s: ascii(s), "Secret('***')", "ascii"),
    (lambda s: repr([s]), "[Secret('***')]", "in-list"),
    (lambda s: str({"token": s}), "{'token': Secret('***')}", "in-dict"),
    (lambda s: str(ValueError(s)), "***", "exception-arg"),
    (lambda s: repr(ValueError(s)), "ValueError(Secret('***'))", "exception-repr"),
]


@pytest.mark.parametrize(("render", "expected"), [(r, e) for r, e, _ in RENDERINGS],
                         ids=[i for *_, i in RENDERINGS])
def test_secret_never_rendered(render: Any, expected: str) -> None:
    s = Secret(VALUE)
    out = render(s)
    assert out == expected
    assert VALUE not in out


def test_secret_reveal_and_semantics() -> None:
    s = Secret(VALUE)
    assert s.reveal() == VALUE
    assert s == Secret(VALUE)
    assert s != Secret("other")
    assert s != VALUE  # never equal to the bare string
    assert hash(s) == hash(Secret(VALUE))
    assert bool(s) is True
    assert bool(Secret("")) is False


@pytest.mark.parametrize("value", [b"bytes", 123, None], ids=["bytes", "int", "none"])
def test_secret_holds_only_str(value: Any) -> None:
    with pytest.raises(TypeError, match="Secret holds a str"):
        Secret(value)


def test_secret_has_no_instance_dict() -> None:
    with pytest.raises(TypeError):
        vars(Secret(VALUE))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1),
                         ids=lambda p: f"protocol-{p}")
def test_secret_not_pickled(protocol: int) -> None:
    with pytest.raises(TypeError, match="a Secret is not pickled"):
        pickle.dumps(Secret(VALUE), protocol=protocol)


def test_secret_inside_container_not_pickled() -> None:
    with pytest.raises(TypeError, match="a Secret is not pickled"):
        pickle.dumps({"token": Secret(VALUE)})
