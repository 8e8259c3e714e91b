"""Settings of the federated strategy, validated where they are built.

Every invalid value raises ``ConfigError`` naming the field, whatever its type (a property test
in ``tests/unit/test_fl_strategy.py`` feeds arbitrary values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from idla.errors import ConfigError
from idla.plan.selection import ClientProfile

AGGREGATORS = ("fedavg", "median", "trimmed", "krum", "multikrum", "trust", "cclip", "trustclip")
SERVER_OPTIMIZERS = ("none", "adam", "yogi")
SELECTIONS = ("uniform", "deadline")
_DEFAULT_SERVER_LR = {"none": 1.0, "adam": 0.1, "yogi": 0.01}  # Flower's FedAdam / FedYogi eta


@dataclass(kw_only=True)
class StrategyConfig:
    """Settings of a federated strategy; invalid values raise ConfigError naming the field."""

    aggregator: str = "fedavg"
    """fedavg | median | trimmed | krum | multikrum | trust | cclip (centered clipping) |
    trustclip (centered clipping of the non-outliers, weighted by trust); see
    ``idla.fl.combine``."""
    server_optimizer: str = "none"
    """none | adam | yogi (FedAdam / FedYogi, Reddi et al. 2021)."""
    server_lr: float | None = None
    """Server step size; None: 1.0 for none (plain replace), 0.1 adam, 0.01 yogi."""
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    """Adaptivity τ added to √v."""
    proximal_mu: float = 0.0
    """FedProx μ sent to the clients (≥ 0)."""
    local_epochs: int = 1
    selection: str = "uniform"
    """uniform | deadline."""
    clients_per_round: int = 10
    deadline_s: float | None = None
    """Round deadline in seconds; later updates are dropped. Required by selection=deadline."""
    late_weight: float = 0.05
    """Selection size factor of a client predicted to miss the deadline, in (0, 1]."""
    fairness: float = 1.0
    """Exponent γ ≥ 0 of the boost toward under-represented clients."""
    reweight: bool = True
    """Weight updates by 1 / inclusion probability (unbiased) under deadline selection."""
    trim_fraction: float = 0.2
    """Share of the clients cut at each end by the trimmed mean, in [0, 0.5)."""
    num_malicious: int = 0
    """f for Krum; 0 derives the largest f Krum tolerates, ⌊(K − 3) / 2⌋."""
    multikrum_selected: int = 0
    """m for multi-Krum; 0 derives K − f."""
    clip_iterations: int = 3
    """L, the centered-clipping iterations of cclip and trustclip (their radius comes from the
    round: the median distance of the updates to their coordinate median)."""
    trust_decay: float = 0.5
    trust_recovery: float = 0.1
    trust_outlier_distance: float = 3.0
    trust_min_cosine: float = 0.0
    trust_floor: float = 0.0
    trust_exclude_outliers: bool = True
    """The trust aggregator gives this round's outliers weight 0 (not just their lower trust);
    trustclip always leaves them out."""
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("aggregator", self.aggregator, AGGREGATORS)
        _choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _choice("selection", self.selection, SELECTIONS)
        if self.server_lr is None:
            self.server_lr = _DEFAULT_SERVER_LR[self.server_optimizer]
        _number("server_lr", self.server_lr, low=0.0, low_open=True)
        self.server_lr = float(self.server_lr)  # an integer learning rate is a float from here
        _number("server_beta1", self.server_beta1, low=0.0, high=1.0, high_open=True)
        _number("server_beta2", self.server_beta2, low=0.0, high=1.0, high_open=True)
        _number("server_tau", self.server_tau, low=0.0, low_open=True)
        _number("proximal_mu", self.proximal_mu, low=0.0)
        _integer("local_epochs", self.local_epochs, low=1)
        _integer("clients_per_round", self.clients_per_round, low=1)
        if self.deadline_s is not None:
            _number("deadline_s", self.deadline_s, low=0.0, low_open=True)
        elif self.selection == "deadline":
            raise ConfigError("deadline_s is required when selection is 'deadline'")
        _number("late_weight", self.late_weight, low=0.0, high=1.0, low_open=True)
        _number("fairness", self.fairness, low=0.0, high=100.0)
        _flag("reweight", self.reweight)
        _number("trim_fraction", self.trim_fraction, low=0.0, high=0.5, high_open=True)
        _integer("num_malicious", self.num_malicious, low=0)
        _integer("multikrum_selected", self.multikrum_selected, low=0)
        _integer("clip_iterations", self.clip_iterations, low=1)
        _number("trust_decay", self.trust_decay, low=0.0, high=1.0)
        _number("trust_recovery", self.trust_recovery, low=0.0, high=1.0)
        _number("trust_outlier_distance", self.trust_outlier_distance, low=0.0, low_open=True)
        _number("trust_min_cosine", self.trust_min_cosine, low=-1.0, high=1.0)
        _number("trust_floor", self.trust_floor, low=0.0, high=1.0)
        _flag("trust_exclude_outliers", self.trust_exclude_outliers)
        _integer("seed", self.seed, low=0)


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _integer(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}")


def check_profile(profile: ClientProfile) -> None:
    """Raise ConfigError, naming the client and field, for an impossible profile."""
    name = f"client {profile.client_id!r}"
    if isinstance(profile.client_id, bool) or not isinstance(profile.client_id, int):
        raise ConfigError(f"{name}: client_id must be an integer")
    _integer(f"{name} num_samples", profile.num_samples, low=0)
    _number(f"{name} samples_per_s", profile.samples_per_s, low=0.0, low_open=True)
    _number(f"{name} link_bytes_per_s", profile.link_bytes_per_s, low=0.0, low_open=True)
    _number(f"{name} availability", profile.availability, low=0.0, high=1.0, low_open=True)
