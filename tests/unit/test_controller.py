"""RebalanceController in a closed loop with StepTimeFit, and its hysteresis rules."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from idla.errors import ConfigError, PlanError
from idla.plan.controller import ControllerConfig, RebalanceController
from idla.profile.perf_model import StepModel, StepTimeFit

GLOBAL_BATCH = 512
STEADY_FROM, SLOWDOWN_AT, STEPS = 20, 120, 140


@dataclass
class Simulation:
    """Four workers with true step times c + α + β·b; measurements carry ±10 % uniform noise."""

    seed: int
    per_sample_s: list[float] = field(default_factory=lambda: [1e-3, 1e-3, 2e-3, 4e-3])
    fixed_s: float = 5e-3
    comm_s: float = 20e-3
    noise: float = 0.10
    shares: list[int] = field(default_factory=lambda: [GLOBAL_BATCH // 4] * 4)
    spreads: list[float] = field(default_factory=list)

    def run(self, controller: RebalanceController) -> None:
        rng = random.Random(self.seed)
        fits = [StepTimeFit() for _ in self.shares]
        for step in range(STEPS):
            if step == SLOWDOWN_AT:
                self.per_sample_s[0] *= 2.0
            true_s = [
                self.comm_s + self.fixed_s + beta * b
                for beta, b in zip(self.per_sample_s, self.shares, strict=True)
            ]
            self.spreads.append((max(true_s) - min(true_s)) / max(true_s))
            for fit, beta, b in zip(fits, self.per_sample_s, self.shares, strict=True):
                compute_s = (self.fixed_s + beta * b) * (1.0 + rng.uniform(-self.noise, self.noise))
                comm_s = self.comm_s * (1.0 + rng.uniform(-self.noise, self.noise))
                fit.observe(b, compute_s, comm_s)
            models = [fit.model() for fit in fits]
            new = controller.decide(step, self.shares, models, GLOBAL_BATCH)
            if new is not None:
                assert sum(new) == GLOBAL_BATCH
                self.shares = new


@pytest.mark.parametrize("seed", range(5))
def test_closed_loop_is_calm_when_steady_and_recovers_from_a_slowdown(seed: int) -> None:
    # Prepare
    simulation = Simulation(seed)
    controller = RebalanceController()

    # Execute
    simulation.run(controller)

    # Assert (a): few re-plans over 100 steady steps
    steady_changes = [s for s in controller.changes if STEADY_FROM <= s < SLOWDOWN_AT]
    assert len(steady_changes) <= 2
    assert max(simulation.spreads[STEADY_FROM:SLOWDOWN_AT]) < 0.15
    # Assert (b): after worker 0 slows 2x, true step times are within 10 % again in 10 steps
    assert simulation.spreads[SLOWDOWN_AT] > 0.3
    assert min(simulation.spreads[SLOWDOWN_AT : SLOWDOWN_AT + 10]) < 0.10


def test_gain_below_min_gain_never_replans() -> None:
    # Prepare: the best plan, [104, 96], is predicted only 3.7 % faster than [100, 100]
    models = [StepModel(0.0, 1.00e-3), StepModel(0.0, 1.08e-3)]
    controller = RebalanceController(ControllerConfig(min_gain=0.05, patience_steps=1))

    # Execute
    decisions = [controller.decide(step, [100, 100], models, 200) for step in range(50)]

    # Assert
    assert decisions == [None] * 50
    assert controller.changes == []


def test_replans_after_patience_steps_of_gain() -> None:
    # Prepare
    models = [StepModel(0.0, 1.0e-3), StepModel(0.0, 1.5e-3)]
    controller = RebalanceController(ControllerConfig(patience_steps=2))

    # Execute
    first = controller.decide(7, [100, 100], models, 200)
    second = controller.decide(8, [100, 100], models, 200)

    # Assert
    assert first is None
    assert second == [120, 80]
    assert controller.changes == [8]


def test_a_small_gain_resets_the_patience() -> None:
    # Prepare
    big = [StepModel(0.0, 1.0e-3), StepModel(0.0, 1.5e-3)]
    small = [StepModel(0.0, 1.0e-3), StepModel(0.0, 1.02e-3)]
    controller = RebalanceController(ControllerConfig(patience_steps=2))

    # Execute
    decisions = [
        controller.decide(step, [100, 100], models, 200)
        for step, models in enumerate([big, small, big])
    ]

    # Assert
    assert decisions == [None, None, None]


def test_waits_for_every_model_and_the_warmup() -> None:
    # Prepare
    models = [StepModel(0.0, 1.0e-3), StepModel(0.0, 3.0e-3)]
    controller = RebalanceController(ControllerConfig(warmup_steps=3, patience_steps=1))

    # Execute
    missing = controller.decide(0, [100, 100], [models[0], None], 200)
    decisions = [controller.decide(step, [100, 100], models, 200) for step in range(1, 4)]

    # Assert
    assert missing is None
    assert decisions == [None, None, [150, 50]]


def test_short_batch_forces_a_plan() -> None:
    # Prepare
    models = [StepModel(0.0, 1.0e-3), StepModel(0.0, 3.0e-3)]
    controller = RebalanceController(ControllerConfig(warmup_steps=5))

    # Execute
    planned = controller.decide(3, [100, 100], models, 40)
    unmeasured = controller.decide(4, [100, 100], [None, None], 41)

    # Assert
    assert planned == [30, 10]
    assert unmeasured == [21, 20]
    assert controller.changes == [3, 4]
    assert controller.forced == [3, 4]


def test_mismatched_lengths_raise() -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match="current has 3 shares"):
        RebalanceController().decide(0, [1, 1, 1], [None, None], 3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_gain": -0.1}, "controller.min_gain"),
        ({"min_gain": float("nan")}, "controller.min_gain"),
        ({"patience_steps": 0}, "controller.patience_steps"),
        ({"warmup_steps": -1}, "controller.warmup_steps"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], name: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=name):
        ControllerConfig(**kwargs)
