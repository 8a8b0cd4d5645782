"""Unit tests of the shared-state election rules (``pccl.master.election.elect``), no sockets.

Each test states one rule of the election docstring as a user would observe it through the plans
the master sends: who is rejected and why, which revision the group reaches, and which entries
each peer fetches from whom. A property test then checks, over random vote sets, the invariant
everything else rests on: once every accepted peer applied its plan, all of them hold the same
content at the same revision, and every byte came from a peer that held it at that revision.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pccl.master.election import EntryVote, Plan, SyncVote, elect

from pccl.types import DType, SyncStrategy

EP, SEND, RECV = SyncStrategy.ENFORCE_POPULAR, SyncStrategy.SEND_ONLY, SyncStrategy.RECEIVE_ONLY


def h(tag: str) -> bytes:
    """A 16-byte stand-in for an XXH3-128 digest."""
    return tag.encode().ljust(16, b".")[:16]


def entry(tag: str, *, dtype: DType = DType.FLOAT32, shape=(4,), loose: bool = False):
    n = DType(dtype).itemsize
    for d in shape:
        n *= d
    return EntryVote(int(dtype), n, tuple(shape), h(tag), loose)


def vote(pid: int, rev: int, content: dict[str, str] | None = None, strategy=EP, **layout):
    """A vote whose entries ``{key: hash tag}`` default to ``{"a": "A", "b": "B"}``."""
    content = {"a": "A", "b": "B"} if content is None else content
    return SyncVote(
        pid, rev, strategy, {k: entry(t, **layout.get(k, {})) for k, t in content.items()}
    )


def run(*votes: SyncVote, next_revision: int | None = None) -> tuple[dict[int, Plan], int]:
    plans, target = elect({v.peer_id: v for v in votes}, next_revision)
    assert set(plans) == {v.peer_id for v in votes}, "every voter must get a plan"
    return plans, target


def ok_ids(plans: dict[int, Plan]) -> set[int]:
    return {p for p, plan in plans.items() if plan.ok}


# ---------------------------------------------------------------------------------- steady state


def test_identical_votes_all_accepted_nothing_fetched():
    plans, target = run(vote(1, 0), vote(2, 0), vote(3, 0))
    assert target == 0
    assert ok_ids(plans) == {1, 2, 3}
    assert all(p.fetch == {} and p.revision == 0 for p in plans.values())


# ---------------------------------------------------------------------------------- content


@pytest.mark.parametrize("order", [(3, 1, 2), (1, 2, 3), (2, 3, 1)])
def test_majority_content_wins_whatever_the_vote_order(order):
    # Peer 1 is the minority *and* the longest-standing peer: counts beat the tie-break.
    by_id = {
        1: vote(1, 5, {"a": "X", "b": "B"}),
        2: vote(2, 5),
        3: vote(3, 5),
    }
    plans, target = elect({i: by_id[i] for i in order}, 5)
    assert target == 5
    assert ok_ids(plans) == {1, 2, 3}
    assert plans[1].fetch == {"a": (h("A"), [2, 3])}
    assert plans[2].fetch == {} and plans[3].fetch == {}


@pytest.mark.parametrize("order", [(1, 2), (2, 1)])
def test_tie_goes_to_lowest_peer_id(order):
    by_id = {7: vote(7, 0, {"a": "X"}), 4: vote(4, 0, {"a": "Y"})}
    plans, _ = elect({[4, 7][i - 1]: by_id[[4, 7][i - 1]] for i in order}, None)
    assert plans[4].ok and plans[4].fetch == {}
    assert plans[7].ok and plans[7].fetch == {"a": (h("Y"), [4])}


def test_only_differing_entries_are_fetched_from_every_holder_of_that_entry():
    plans, _ = run(
        vote(1, 2, {"a": "A", "b": "B", "c": "C"}),
        vote(2, 2, {"a": "A", "b": "B", "c": "C"}),
        vote(3, 2, {"a": "A", "b": "B", "c": "C"}),
        # Holds the elected "a" but a stale "c": it is a source of "a" only.
        vote(4, 2, {"a": "A", "b": "B", "c": "old"}),
        vote(5, 2, {"a": "old", "b": "B", "c": "old"}),
    )
    assert plans[4].fetch == {"c": (h("C"), [1, 2, 3])}
    assert plans[5].fetch == {"a": (h("A"), [1, 2, 3, 4]), "c": (h("C"), [1, 2, 3])}


def test_source_lists_never_contain_the_fetcher_itself():
    plans, _ = run(vote(1, 0, {"a": "A"}), vote(2, 0, {"a": "A"}), vote(3, 0, {"a": "Z"}))
    for pid, plan in plans.items():
        for _, srcs in plan.fetch.values():
            assert pid not in srcs


def test_opt_out_entries_never_compete_nor_move():
    layout = {"loose": {"loose": True}}
    plans, _ = run(
        vote(1, 0, {"a": "A", "loose": "p1"}, **layout),
        vote(2, 0, {"a": "A", "loose": "p2"}, **layout),
        vote(3, 0, {"a": "Z", "loose": "p3"}, **layout),
    )
    assert ok_ids(plans) == {1, 2, 3}
    assert plans[3].fetch == {"a": (h("A"), [1, 2])}
    assert all("loose" not in p.fetch for p in plans.values())


def test_opt_out_flag_itself_is_part_of_the_layout():
    plans, _ = run(
        vote(1, 0, {"a": "A"}),
        vote(2, 0, {"a": "A"}),
        vote(3, 0, {"a": "A"}, a={"loose": True}),
    )
    assert ok_ids(plans) == {1, 2}
    assert "'a'" in plans[3].reason


# ---------------------------------------------------------------------------------- revisions


def test_first_sync_targets_highest_revision_and_drags_the_rest():
    # Resume from a checkpoint at 13: fresh peers at 0 adopt it.
    plans, target = run(
        vote(1, 0, {"a": "init"}), vote(2, 13, {"a": "ckpt"}), vote(3, 0, {"a": "init"})
    )
    assert target == 13
    assert ok_ids(plans) == {1, 2, 3}
    assert all(p.revision == 13 for p in plans.values())
    # The two fresh peers agree with each other but are outdated: they are not holders.
    assert plans[1].fetch == {"a": (h("ckpt"), [2])}
    assert plans[3].fetch == {"a": (h("ckpt"), [2])}


def test_increment_of_two_rejected_others_continue():
    plans, target = run(vote(1, 8), vote(2, 8), vote(3, 9), next_revision=8)
    assert target == 8
    assert ok_ids(plans) == {1, 2}
    assert "skips ahead" in plans[3].reason and "8" in plans[3].reason


def test_peer_that_never_bumps_is_dragged_without_transfer_when_content_matches():
    plans, target = run(vote(1, 8), vote(2, 7), vote(3, 8), next_revision=8)
    assert target == 8
    assert plans[2].ok and plans[2].revision == 8 and plans[2].fetch == {}


def test_outdated_peer_is_never_a_source_even_with_matching_hash():
    plans, _ = run(
        vote(1, 8, {"a": "A", "b": "B"}),
        vote(2, 7, {"a": "A", "b": "B"}),
        vote(3, 8, {"a": "A", "b": "new"}),
        vote(4, 8, {"a": "x", "b": "B"}),
        next_revision=8,
    )
    # Content tie at 8 between peers 1, 3 and 4 (one each): peer 1 (lowest id) wins.
    assert plans[4].fetch == {"a": (h("A"), [1, 3])}
    assert plans[3].fetch == {"b": (h("B"), [1, 4])}  # never peer 2 (at revision 7)


def test_rejected_peers_are_never_sources():
    plans, _ = run(
        vote(1, 4, {"a": "A"}),
        vote(2, 5, {"a": "B"}),  # skips ahead
        vote(3, 4, {"a": "B"}, a={"dtype": DType.INT32}),  # layout differs
        vote(4, 4, {"a": "B"}),
        vote(5, 4, {"a": "C"}),
        next_revision=4,
    )
    assert ok_ids(plans) == {1, 4, 5}
    srcs = {s for p in plans.values() for _, ids in p.fetch.values() for s in ids}
    assert srcs <= {1, 4, 5}


def test_up_to_date_peers_gone_highest_remaining_revision_becomes_target():
    plans, target = run(vote(1, 3, {"a": "old"}), vote(2, 2, {"a": "older"}), next_revision=5)
    assert target == 3
    assert ok_ids(plans) == {1, 2}
    assert plans[2].fetch == {"a": (h("old"), [1])}


@pytest.mark.parametrize("next_revision", [None, 6])
def test_no_plan_moves_a_revision_backwards(next_revision):
    # The only offering peer never bumped (5); the RECEIVE_ONLY peer did (6).
    plans, _ = run(
        vote(1, 5, strategy=SEND), vote(2, 6, strategy=RECV), next_revision=next_revision
    )
    for pid, rev in ((1, 5), (2, 6)):
        plan = plans[pid]
        assert not plan.ok or plan.revision >= rev, f"peer {pid}: {rev} -> {plan.revision}"


# ---------------------------------------------------------------------------------- layout


def _mismatch(**layout_of_3):
    return run(vote(1, 0), vote(2, 0), vote(3, 0, **layout_of_3))


def test_missing_key_rejected_naming_it():
    plans, _ = run(vote(1, 0), vote(2, 0), vote(3, 0, {"a": "A"}))
    assert ok_ids(plans) == {1, 2}
    assert "missing" in plans[3].reason and "'b'" in plans[3].reason


def test_unexpected_key_rejected_naming_it():
    plans, _ = run(vote(1, 0), vote(2, 0), vote(3, 0, {"a": "A", "b": "B", "extra": "E"}))
    assert ok_ids(plans) == {1, 2}
    assert "unexpected" in plans[3].reason and "'extra'" in plans[3].reason


def test_shape_mismatch_with_equal_size_rejected_naming_both_shapes():
    plans, _ = run(
        vote(1, 0, a={"shape": (4, 8)}),
        vote(2, 0, a={"shape": (4, 8)}),
        vote(3, 0, a={"shape": (8, 4)}),
    )
    assert ok_ids(plans) == {1, 2}
    r = plans[3].reason
    assert "'a'" in r and "(8, 4)" in r and "(4, 8)" in r


def test_dtype_mismatch_with_equal_size_is_rejected():
    plans, _ = _mismatch(a={"dtype": DType.INT32})  # same nbytes as float32
    assert ok_ids(plans) == {1, 2}
    assert "'a'" in plans[3].reason


def test_dtype_mismatch_reason_names_both_dtypes():
    plans, _ = _mismatch(a={"dtype": DType.INT32})
    r = plans[3].reason.lower()
    assert "int32" in r and "float32" in r, plans[3].reason


def test_layout_minority_lowest_id_does_not_override_majority_layout():
    # Peer 1 (lowest id) differs in layout from two peers that agree on layout and content.
    plans, _ = run(vote(1, 0, {"a": "A"}), vote(2, 0), vote(3, 0))
    assert ok_ids(plans) == {2, 3}
    assert "missing" in plans[1].reason


# ---------------------------------------------------------------------------------- strategies


def test_two_send_only_with_different_content_one_rejected():
    plans, _ = run(vote(1, 0, {"a": "X"}, SEND), vote(2, 0, {"a": "Y"}, SEND))
    assert ok_ids(plans) == {1}
    assert plans[1].fetch == {}
    assert "SEND_ONLY" in plans[2].reason


def test_send_only_holding_elected_content_is_accepted_and_fetches_nothing():
    plans, _ = run(
        vote(1, 0, strategy=SEND), vote(2, 0, strategy=SEND), vote(3, 0, {"a": "Z", "b": "B"}, RECV)
    )
    assert ok_ids(plans) == {1, 2, 3}
    assert plans[1].fetch == plans[2].fetch == {}
    assert plans[3].fetch == {"a": (h("A"), [1, 2])}


def test_receive_only_peers_never_compete():
    # Two RECEIVE_ONLY peers agree on X; the single SEND_ONLY peer's Y still wins.
    plans, _ = run(
        vote(1, 0, {"a": "X"}, RECV), vote(2, 0, {"a": "X"}, RECV), vote(3, 0, {"a": "Y"}, SEND)
    )
    assert ok_ids(plans) == {1, 2, 3}
    assert plans[1].fetch == plans[2].fetch == {"a": (h("Y"), [3])}


def test_all_receive_only_all_rejected():
    plans, _ = run(vote(1, 0, strategy=RECV), vote(2, 0, strategy=RECV))
    assert ok_ids(plans) == set()
    assert all("RECEIVE_ONLY" in p.reason for p in plans.values())


@pytest.mark.parametrize("other", [SEND, RECV])
def test_enforce_popular_mixed_with_other_strategies_rejects_the_others(other):
    plans, _ = run(
        vote(1, 0), vote(2, 0, {"a": "Z", "b": "B"}), vote(3, 0, {"a": "Q", "b": "B"}, other)
    )
    assert ok_ids(plans) == {1, 2}
    assert "ENFORCE_POPULAR" in plans[3].reason and other.name in plans[3].reason
    assert plans[2].fetch == {"a": (h("A"), [1])}


# ---------------------------------------------------------------------------------- property

KEYS = ["a", "b", "c"]


@st.composite
def vote_sets(draw):
    n = draw(st.integers(1, 6))
    next_revision = draw(st.none() | st.integers(1, 4))
    strategies = (
        [EP] * n
        if draw(st.booleans())
        else draw(st.lists(st.sampled_from([SEND, RECV]), min_size=n, max_size=n))
    )
    votes = {}
    for strat in strategies:
        pid = draw(st.integers(1, 50).filter(lambda p: p not in votes))
        keys = draw(st.sampled_from([KEYS, KEYS, KEYS, KEYS[:2]]))
        content = {k: draw(st.sampled_from(["p", "q", "r"])) for k in keys}
        rev = draw(st.integers(0, 5))
        votes[pid] = vote(pid, rev, content, strat)
    return votes, next_revision


@settings(max_examples=400, deadline=None)
@given(vote_sets())
def test_applying_every_accepted_plan_leaves_identical_content(case):
    votes, next_revision = case
    plans, target = elect(dict(votes), next_revision)
    assert set(plans) == set(votes)
    accepted = {p: plan for p, plan in plans.items() if plan.ok}
    for plan in plans.values():
        if not plan.ok:
            assert plan.reason and plan.fetch == {}
    if not accepted:
        return
    assert {plan.revision for plan in accepted.values()} == {target}
    if next_revision is not None:
        for pid in accepted:
            assert votes[pid].revision <= next_revision, "a skip-ahead vote was accepted"
    # Every source of an entry holds the elected hash of it at the target revision and is
    # itself accepted; nobody fetches from itself.
    final = {}
    for pid, plan in accepted.items():
        have = {k: e.hash for k, e in votes[pid].entries.items()}
        for key, (digest, srcs) in plan.fetch.items():
            assert srcs and pid not in srcs
            for s in srcs:
                assert s in accepted
                assert votes[s].revision == target
                assert votes[s].entries[key].hash == digest
            assert have[key] != digest, "fetching an entry already held"
            have[key] = digest
        if votes[pid].strategy == SEND:
            assert plan.fetch == {}, "a SEND_ONLY peer would be overwritten"
        final[pid] = have
    assert len({tuple(sorted(v.items())) for v in final.values()}) == 1, final
    # The elected content is the most popular among competing holders at the target.
    winner = next(iter(final.values()))
    holders = [
        v for p, v in votes.items() if v.revision == target and v.strategy != RECV and p in accepted
    ]
    counts: dict[tuple, int] = {}
    for v in holders:
        c = tuple(sorted((k, e.hash) for k, e in v.entries.items()))
        counts[c] = counts.get(c, 0) + 1
    if counts:
        assert counts.get(tuple(sorted(winner.items())), 0) == max(counts.values())
