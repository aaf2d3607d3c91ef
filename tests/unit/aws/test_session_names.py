"""STS session names: an instance id maps one to one onto a name STS accepts, or is
refused. Pure: no AWS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.aws import session_name_for


@pytest.mark.parametrize(
    "instance,expected",
    [
        ("i-0123456789abcdef0", "i-0123456789abcdef0"),
        ("my-project:1234567890", "my-project=1234567890"),
        ("default/web-7d9c", "default,web-7d9c"),
        ("run_42.1@ci+x", "run_42.1@ci+x"),
        ("ab", "ab"),
        ("x" * 64, "x" * 64),
    ],
    ids=["ec2", "gcp-colon", "k8s-slash", "sts-punctuation", "shortest", "longest"],
)
def test_session_names_are_instance_ids_mapped_one_to_one(instance, expected):
    assert session_name_for(instance) == expected


@pytest.mark.parametrize(
    "instance",
    ["a", "x" * 65, "has=equals", "has,comma", "sp ace", "ünïcode", "new\nline", ""],
    ids=[
        "too-short",
        "too-long",
        "equals-is-reserved",
        "comma-is-reserved",
        "space",
        "unicode",
        "newline",
        "empty",
    ],
)
def test_instance_ids_without_an_unambiguous_session_name_are_refused(instance):
    with pytest.raises(ValueError):
        session_name_for(instance)


@given(
    st.text(alphabet="ab:/=,-", min_size=2, max_size=10),
    st.text(alphabet="ab:/=,-", min_size=2, max_size=10),
)
def test_two_instances_never_share_a_session_name(a, b):
    try:
        na, nb = session_name_for(a), session_name_for(b)
    except ValueError:
        return
    assert (na == nb) == (a == b)
