"""The pure decisions about the broker's own Vault token: what a capabilities answer
lacks, when to log in again or renew, when an expiring token is reported, and the token
file's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigError
from broker.vault.identity import (
    DAY_S,
    Need,
    expiring_soon,
    missing_capabilities,
    needs,
    read_token_file,
    upkeep_in,
)

WANTED = needs("broker-instance")
EVERYTHING = {n.path: list(n.capabilities) for n in WANTED}


def test_the_needed_paths_name_the_token_role_and_every_call_the_broker_makes() -> None:
    paths = {n.path: (n.capabilities, n.essential) for n in WANTED}
    assert paths == {
        "auth/token/create/broker-instance": (("update",), True),
        "auth/token/revoke-accessor": (("update",), True),
        "sys/leases/revoke": (("update",), True),
        "sys/leases/lookup": (("update",), True),
        "sys/leases/renew": (("update",), False),
        "sys/leases/lookup/*": (("list", "sudo"), False),
        "sys/leases": (("read", "sudo"), False),
    }


def test_a_token_with_every_capability_lacks_nothing() -> None:
    assert missing_capabilities(WANTED, EVERYTHING) == []


def test_root_has_everything_and_extra_capabilities_are_fine() -> None:
    answer = {n.path: ["root"] for n in WANTED}
    assert missing_capabilities(WANTED, answer) == []
    answer = {n.path: [*n.capabilities, "read", "create"] for n in WANTED}
    assert missing_capabilities(WANTED, answer) == []


@pytest.mark.parametrize("need", WANTED, ids=[n.path for n in WANTED])
def test_each_missing_capability_is_named_by_path_and_capability(need: Need) -> None:
    for dropped in need.capabilities:
        answer = dict(EVERYTHING)
        answer[need.path] = [c for c in need.capabilities if c != dropped]
        [gap] = missing_capabilities(WANTED, answer)
        assert (gap.need, gap.lacking) == (need, (dropped,))
        assert need.path in gap.line() and dropped in gap.line()


@pytest.mark.parametrize("have", [None, [], ["deny"], ["deny", "update", "list", "sudo"],
                                  ["deny", "root"], "update", 3])
def test_absent_denied_or_malformed_means_lacking_all(have: object) -> None:
    answer = dict(EVERYTHING)
    if have is None:
        del answer["sys/leases/revoke"]
    else:
        answer["sys/leases/revoke"] = have  # type: ignore[assignment]
    [gap] = missing_capabilities(WANTED, answer)
    assert gap.need.path == "sys/leases/revoke" and gap.lacking == ("update",)
    assert gap.need.essential


def test_an_empty_answer_lacks_everything() -> None:
    gaps = missing_capabilities(WANTED, {})
    assert [(g.need.path, g.lacking) for g in gaps] == [(n.path, n.capabilities)
                                                      for n in WANTED]


@pytest.mark.parametrize(("ttl", "login", "extendable", "expected"), [
    (3600, True, False, 2400.0),   # a login: again at 2/3 of its TTL
    (3600, True, True, 2400.0),
    (90, False, True, 60.0),       # a renewable static token: renewed at 2/3 of what is left
    (3600, False, False, None),    # a static token that cannot be extended: nothing to do
    (0, False, True, None),        # a token that does not expire (root, no TTL)
    (0, True, True, None),
    (-5, True, True, None),
])
def test_when_the_broker_logs_in_again_or_renews(ttl: int, login: bool, extendable: bool,
                                                 expected: float | None) -> None:
    assert upkeep_in(ttl, login=login, extendable=extendable) == expected


@pytest.mark.parametrize(("left", "creation_ttl", "soon"), [
    (DAY_S * 30, DAY_S * 32, False),
    (DAY_S - 1, DAY_S * 32, True),     # under a day
    (DAY_S + 1, DAY_S * 32, False),
    (1199, 3600, True),                # a short token: under a third of its TTL
    (1201, 3600, False),
    (DAY_S - 1, 0, True),              # TTL unknown: under a day
    (DAY_S * 2, 0, False),
    (0, 3600, True),
])
def test_when_an_expiring_token_is_reported(left: float, creation_ttl: int, soon: bool) -> None:
    assert expiring_soon(left, creation_ttl) is soon


def test_the_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("eyJ.a.b\n")
    assert read_token_file(f) == "eyJ.a.b"


def test_a_missing_or_empty_token_file_names_the_path_and_why(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as err:
        read_token_file(missing)
    assert str(err.value) == f"vault.auth.token_path {missing}: cannot read it (No such file " \
                             "or directory)"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError) as err:
        read_token_file(empty)
    assert str(err.value) == f"vault.auth.token_path {empty}: the file is empty"
    with pytest.raises(ConfigError) as err:
        read_token_file(tmp_path)
    assert "cannot read it (Is a directory)" in str(err.value)
