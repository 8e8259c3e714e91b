"""`idla bench fl`'s verdict on the defences, from hand-made scenario rows."""

from __future__ import annotations

from idla.bench.fl import FlBenchConfig, defence_gaps


def test_defence_gaps_take_each_aggregators_worst_attack_per_group() -> None:
    config = FlBenchConfig(clients=10, clients_per_round=10, flower=False,
                           attacks=("signflip", "alie", "ipm"),
                           aggregators=("median", "trustclip"))
    accuracy = {"clean": 0.95,
                "signflip_median": 0.85, "alie_median": 0.94, "ipm_median": 0.80,
                "signflip_trustclip": 0.90, "alie_trustclip": 0.945, "ipm_trustclip": 0.93}
    scenarios = {name: {"final_accuracy": value} for name, value in accuracy.items()}

    gaps = defence_gaps(scenarios, config)

    assert abs(gaps["median"]["worst_colluding_gap_pp"] + 15.0) < 1e-9
    assert gaps["median"]["colluding_within_3pp"] is False
    assert abs(gaps["trustclip"]["worst_colluding_gap_pp"] + 2.0) < 1e-9
    assert gaps["trustclip"]["colluding_within_3pp"] is True
    assert abs(gaps["trustclip"]["worst_lone_gap_pp"] + 5.0) < 1e-9
