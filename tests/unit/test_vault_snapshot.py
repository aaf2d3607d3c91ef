"""The harness' Vault snapshot: a refused request must mint nothing; what ended on its own
between two snapshots (an earlier test's token reaching its TTL) is not a change."""

from tests.harness.vault import VaultSnapshot


def snap(accessors=(), pki=(), db=()) -> VaultSnapshot:
    return VaultSnapshot(frozenset(accessors), frozenset(pki), frozenset(db))


def test_the_same_holdings_are_equal():
    assert snap({"a"}, {"p"}, {"d"}) == snap({"a"}, {"p"}, {"d"})


def test_anything_new_later_is_a_change_whichever_side_it_is_written():
    before = snap({"a"}, {"p"})
    for later in (snap({"a", "b"}, {"p"}), snap({"a"}, {"p", "q"}), snap({"a"}, {"p"}, {"d"})):
        assert later != before
        assert before != later
        assert (0, later) != (0, before)


def test_what_ended_on_its_own_is_not_a_change():
    before = snap({"a", "old"}, {"p", "expired"}, {"d"})
    after = snap({"a"}, {"p"}, set())
    assert after == before
    assert before == after


def test_ended_and_minted_at_once_is_a_change():
    before = snap({"a", "old"})
    assert snap({"a", "new"}) != before
    assert snap({"a", "new"}).minted_since(before) == {"accessors": {"new"}}
