"""Whose state a re-formed group adopts, and the data cursor as arithmetic."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idla.elastic.adoption import Claim, NoCredibleStateError, choose_source
from idla.elastic.cursor import CommitLog, advance_cursor

SPE = 12  # steps per epoch


def claim(member: int, step: int, *, started: int | None = None, finite: bool = True) -> Claim:
    return Claim(member, step, step if started is None else started, finite)


def test_the_most_advanced_credible_claim_is_adopted() -> None:
    claims = [claim(0, 40), claim(1, 41, started=42), claim(3, 41)]

    adoption = choose_source(claims, [0, 1, 3], sources={0, 1, 3}, step_limit=45)

    assert adoption.source == 1 and adoption.step == 41  # the lowest rank among equals
    assert adoption.lost_steps == 1 and adoption.refused == ()


def test_a_newcomer_never_supplies_state_whatever_it_claims() -> None:
    claims = [claim(0, 40), claim(1, 40), claim(5, 1000)]

    adoption = choose_source(claims, [0, 1, 5], sources={0, 1}, step_limit=None)

    assert adoption.source == 0 and adoption.step == 40
    assert adoption.refused == ("member 5: a newcomer, which brings no state (it claims 1000 "
                                "steps)",)


def test_an_honest_newcomer_is_not_reported() -> None:
    adoption = choose_source([claim(0, 7), claim(3, 0)], [0, 3], sources={0}, step_limit=10)

    assert adoption.source == 0 and adoption.refused == ()


def test_a_non_finite_state_is_never_adopted() -> None:
    claims = [claim(0, 41, finite=False), claim(1, 40)]

    adoption = choose_source(claims, [0, 1], sources={0, 1}, step_limit=45)

    assert adoption.source == 1 and adoption.step == 40
    assert "not finite" in adoption.refused[0]


def test_a_claim_beyond_the_stores_record_is_refused() -> None:
    claims = [claim(0, 40), claim(1, 1000)]

    adoption = choose_source(claims, [0, 1], sources={0, 1}, step_limit=45)

    assert adoption.source == 0 and adoption.step == 40
    assert "more than the 45" in adoption.refused[0]


@pytest.mark.parametrize("bad", [
    None,  # not signed with the job secret
    Claim(2, 41, 41, True),  # names another member
    Claim(1, 41, 43, True),  # started two steps ahead
    Claim(1, 41, 40, True),  # started before its last commit
    Claim(1, -1, -1, True),
])
def test_inconsistent_or_unsigned_claims_are_refused(bad: Claim | None) -> None:
    adoption = choose_source([claim(0, 40), bad], [0, 1], sources={0, 1}, step_limit=45)

    assert adoption.source == 0 and len(adoption.refused) == 1


def test_no_credible_claim_is_an_error_naming_why() -> None:
    with pytest.raises(NoCredibleStateError, match="member 0: its parameters"):
        choose_source([claim(0, 3, finite=False), claim(4, 0)], [0, 4], sources={0},
                      step_limit=5)


def test_claims_round_trip_and_malformed_ones_are_none() -> None:
    original = claim(3, 25, started=26)

    assert Claim.from_json(original.as_json()) == original
    assert Claim.from_json({**original.as_json(), "step": "25"}) is None
    assert Claim.from_json({**original.as_json(), "finite": 1}) is None
    assert Claim.from_json([1, 2]) is None


@given(st.integers(0, 50), st.integers(0, 11), st.integers(0, 200), st.integers(1, 13))
def test_the_cursor_advances_as_steps_one_at_a_time(
        epoch: int, batch: int, steps: int, steps_per_epoch: int) -> None:
    batch = batch % steps_per_epoch
    expected = (epoch, batch)
    for _ in range(steps):
        expected = ((expected[0] + 1, 0) if expected[1] + 1 >= steps_per_epoch
                    else (expected[0], expected[1] + 1))

    assert advance_cursor(epoch, batch, steps, steps_per_epoch) == expected


def test_adopting_a_claim_of_three_million_steps_costs_no_more_than_one() -> None:
    log = CommitLog()
    log.extend(0, 5)
    start = time.perf_counter()

    adoption = choose_source([claim(0, 3_000_000), claim(1, 5)], [0, 1], sources={0, 1},
                             step_limit=None)
    log.extend(5, adoption.step - 5)
    cursor = advance_cursor(0, 5, adoption.step - 5, SPE)
    elapsed_s = time.perf_counter() - start

    assert elapsed_s < 0.05
    assert cursor == divmod(3_000_000, SPE) and len(log) == 3_000_000 and len(log.runs) == 1


def test_the_commit_log_keeps_runs_and_forgets_refused_steps() -> None:
    log = CommitLog()
    for index in (0, 1, 2, 5, 6):
        log.extend(index)

    assert log.runs == [(0, 3), (5, 2)]
    assert log.cursors(4) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]
    log.truncate(4)
    assert log.runs == [(0, 3), (5, 1)] and len(log) == 4
    log.truncate(0)
    assert log.runs == [] and len(log) == 0


def test_a_cursor_before_the_start_is_an_error() -> None:
    with pytest.raises(ValueError, match="before"):
        advance_cursor(0, 1, -2, SPE)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        advance_cursor(0, 0, 1, 0)
