"""One GPU rank beside two CPU ranks (the case idla is for), launched by idla's own launcher:
the fleet and its planes, state transfer across devices, exact statistics for a bf16 model at
uneven shares, training with consistent replicas and speed-proportional shares, and a re-plan
when the GPU rank is slowed."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from tests.gpu import fleet_workers
from tests.gpu.fleet_workers import median_per_rank

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICES = ["cuda:0", "cpu", "cpu"]
BF16_SHARES = [257, 1, 1]  # 257 and 259 are not bf16 numbers (8 significant bits)
TRAIN_STEPS = 40
SLOW_STEPS = 20
SLEEP_S_PER_SAMPLE = 0.002  # several times a CPU rank's time per sample of the demo CNN


@pytest.fixture(scope="module")
def fleet() -> dict[str, list[Any]]:
    """Every case in one launch of three workers (each start of torch and CUDA costs seconds)."""
    return fleet_workers.launch_on_devices(DEVICES, {
        "planes": (fleet_workers.fleet_case, ()),
        "state": (fleet_workers.broadcast_state_case, ()),
        "bf16": (fleet_workers.bf16_shares_case, (BF16_SHARES,)),
        "train": (fleet_workers.mixed_training_case, (TRAIN_STEPS,)),
        "slowed": (fleet_workers.slowed_gpu_case, (SLOW_STEPS, SLEEP_S_PER_SAMPLE)),
    })


def _results(fleet: dict[str, list[Any]], case: str) -> list[dict[str, Any]]:
    results = fleet[case]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return results


def test_the_fleet_runs_gloo_with_the_gpu_rank_staged(fleet: dict[str, list[Any]]) -> None:
    # Execute
    planes = _results(fleet, "planes")

    # Assert: one backend for all, each rank on its own device
    assert {r["fleet"] for r in planes} == {"gloo: 0:cuda:0 1:cpu 2:cpu"}
    assert [r["device"] for r in planes] == DEVICES
    # every data-plane operation gives the right values, on the rank's own device
    for rank, r in enumerate(planes):
        assert r["sum_ok"] and r["sum_device"] == DEVICES[rank], r
        assert r["gathered"] == [0, 10, 20] and r["gathered_devices"] == [DEVICES[rank]], r
        assert r["broadcast"] == 100.0 and r["received"] == float((rank - 1) % 3), r
        assert r["control"] == [0, 1, 2], r
    # the GPU rank's data-plane tensors cross pinned host buffers; the CPU ranks' do not
    assert planes[0]["staged_ops"] >= 4 and planes[1]["staged_ops"] == planes[2]["staged_ops"] == 0
    assert planes[0]["refuses_device_tensor"] is True  # the control plane takes CPU tensors only


def test_model_and_adam_state_move_between_gpu_and_cpu_ranks(
        fleet: dict[str, list[Any]]) -> None:
    # Execute
    state = _results(fleet, "state")

    # Assert: after each broadcast every rank holds the source's exact bytes...
    for src in (0, 1):
        assert all(r[f"from_{src}"]["same_as_src"] for r in state), (src, state)
    # ...where its own optimizer keeps them: the moments on the parameter's device, the step
    # count where this torch's Adam puts it (the CPU, unless fused or capturable)
    for rank, r in enumerate(state):
        kind = DEVICES[rank].split(":")[0]
        for src in (0, 1):
            assert r[f"from_{src}"]["param_device"].split(":")[0] == kind
            assert r[f"from_{src}"]["state_devices"] == {
                "exp_avg": kind, "exp_avg_sq": kind, "step": r["own_step_device"]}, r
    # the same state and batch give the same step, up to the GPU's and CPU's rounding
    assert max(r["max_difference_after_a_step"] for r in state) < 1e-4


def test_bf16_statistics_are_exact_at_uneven_shares(fleet: dict[str, list[Any]]) -> None:
    # Execute
    bf16 = _results(fleet, "bf16")

    # Assert: float64 on the CPU, whatever the model's dtype and device
    for rank, r in enumerate(bf16):
        assert r["device"] == DEVICES[rank]
        assert r["dtypes"] == ["torch.float64"] and r["matrix_devices"] == ["cpu"], r
        assert all(samples == [float(s) for s in BF16_SHARES] for samples in r["samples"]), r
        # this rank's loss sum is its bf16 mean loss × its share, exactly in float64
        assert r["loss_sums"] == [loss * BF16_SHARES[rank] for loss in r["local_losses"]], r


def test_mixed_training_keeps_replicas_close_and_balances_the_ranks(
        fleet: dict[str, list[Any]]) -> None:
    # Execute
    train = _results(fleet, "train")
    rank0 = train[0]

    # Assert: it trains; the replicas stay within rounding of each other (and the agent's own
    # checks, every 10 steps and at close, in tolerance mode, passed: no case error)
    assert rank0["fleet"] == "gloo: 0:cuda:0 1:cpu 2:cpu"
    assert {r["replica_check"] for r in train} == {"tolerance"}
    assert rank0["staged_ops"] >= TRAIN_STEPS and train[1]["staged_ops"] == 0
    assert sum(rank0["loss"][-5:]) < 0.5 * sum(rank0["loss"][:5]), rank0["loss"]
    assert max(r["max_difference"] for r in train) < 1e-4, [r["max_difference"] for r in train]
    # the GPU carries the most, and the planned steps are balanced: every rank with samples
    # finishes in about the same time, i.e. its share is proportional to its measured speed
    last = rank0["shares"][-10:]
    final = last[-1]
    assert sum(final) in (512, 1437 % 512) and final[0] >= max(final[1:]), last
    compute = median_per_rank(rank0["compute_s"][-10:])
    busy = [c for c, s in zip(compute, median_per_rank(last), strict=True) if s > 0]
    assert max(busy) < 3.0 * min(busy), (compute, last)


def test_the_planner_moves_samples_off_a_slowed_gpu(fleet: dict[str, list[Any]]) -> None:
    # Execute
    slowed = _results(fleet, "slowed")[0]
    split = slowed["split_step"]
    shares, compute = slowed["shares"], slowed["compute_s"]

    # Assert: the GPU rank's measured time per sample rose...
    def gpu_s_per_sample(steps: range) -> float:
        return statistics.median(compute[i][0] / shares[i][0] for i in steps if shares[i][0])

    assert gpu_s_per_sample(range(split, len(shares))) > 3 * gpu_s_per_sample(
        range(split - 5, split)), (shares, compute)
    # ...and the planner moved its samples to the CPU ranks, below each of theirs
    before = median_per_rank(shares[split - 5:split])
    after = median_per_rank(shares[-5:])
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[0] <= min(after[1:]), (before, after)
