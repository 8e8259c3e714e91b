"""Colluders in the simulation: ALIE at 30% on very non-IID clients drags the coordinate median
far below what trust-weighted centered clipping keeps (real worker processes, fixed seed)."""

from __future__ import annotations

from idla.demo import load_digits_tensors
from idla.fl.pool import ClientPool
from idla.fl.simulate import SimulationConfig, make_population, pool_settings, run_simulation


def test_trustclip_beats_the_coordinate_median_under_alie_at_30_percent() -> None:
    # 10 clients, 3 colluding, Dirichlet α = 0.1, 10 rounds, seed 0. Measured (2 cores, loaded):
    # round 10 accuracy 83.6% with trustclip, 70.6% with the median, 80.8% with FedAvg.
    settings = dict(clients=10, clients_per_round=10, rounds=10, alpha=0.1, seed=0,
                    malicious_fraction=0.3, attack="alie", processes=2)
    _, train_labels, _, _ = load_digits_tensors()
    base = SimulationConfig(**settings)
    population = make_population(base, train_labels.numpy())
    accuracy = {}
    with ClientPool(base.processes, pool_settings(base, population)) as pool:
        for aggregator in ("trustclip", "median"):
            config = SimulationConfig(**settings, aggregator=aggregator)
            report = run_simulation(config, pool, population)
            assert len(report["malicious_clients"]) == 3
            accuracy[aggregator] = report["final_accuracy"]

    # A 13 pp gap measured; 5 pp leaves room for numerical drift across torch builds.
    assert accuracy["trustclip"] >= accuracy["median"] + 0.05, accuracy
    assert accuracy["trustclip"] >= 0.75, accuracy
