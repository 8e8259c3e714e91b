"""The agent's bounded step history: everything up to its cap, the latest steps beyond it."""

from __future__ import annotations

from idla.agent.history import SERIES, StepHistory


def record(history: StepHistory, steps: range) -> None:
    """Steps as the agent records them: the step, then its rate when the next one starts."""
    for step in steps:
        if step != steps.start:
            history.record_rate(100.0 + step - 1)
        history.record_step(step, [step, 1], loss=1.0 / (step + 1), compute_s=[0.1, 0.2],
                            topology="ring of 2")


def test_a_run_within_the_cap_keeps_every_step() -> None:
    history = StepHistory(max_steps=10)

    record(history, range(5))
    history.record_rate(104.0)  # at close
    kept = history.as_dict()

    assert list(kept) == list(SERIES)
    assert kept["step"] == [0, 1, 2, 3, 4]
    assert kept["shares"] == [[s, 1] for s in range(5)]
    assert kept["samples_per_s"] == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert kept["topology"] == ["ring of 2"] * 5
    assert history.first_step == 0


def test_a_longer_run_keeps_the_last_steps_aligned() -> None:
    history = StepHistory(max_steps=4)

    record(history, range(10))
    mid_run = history.as_dict()
    history.record_rate(109.0)
    closed = history.as_dict()

    assert mid_run["step"] == [6, 7, 8, 9]
    assert mid_run["samples_per_s"] == [106.0, 107.0, 108.0]  # step 9's rate is not known yet
    assert closed["samples_per_s"] == [106.0, 107.0, 108.0, 109.0]
    assert closed["loss"] == [1.0 / 7, 1.0 / 8, 1.0 / 9, 1.0 / 10]
    assert history.first_step == 6
    assert history.series["loss"][-1] == 1.0 / 10


def test_an_empty_history_has_no_first_step() -> None:
    history = StepHistory(max_steps=3)

    assert history.first_step is None
    assert history.as_dict() == {key: [] for key in SERIES}
