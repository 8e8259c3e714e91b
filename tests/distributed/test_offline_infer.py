"""Offline inference on real worker processes: same outputs as one process, in order, each
input once; dynamic chunking balances throttled workers; a killed worker loses nothing."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from idla.demo import DigitsCNN
from idla.emulate.cgroup import cgroups_available
from idla.errors import ConfigError
from idla.serve.model_io import save_model
from idla.serve.offline import ChunkPlan, equal_ranges, infer_offline, weighted_guided_chunk

BATCH = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, DigitsCNN(hidden=64), "digits_cnn", {"hidden": 64}, (1, 8, 8))
    return directory


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _single_process(model_dir: Path, inputs: np.ndarray) -> np.ndarray:
    """The reference: one process, one thread, the same batches in order."""
    from idla.serve.model_io import load_model

    model, _ = load_model(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(inputs[i:i + BATCH])).numpy()
                                   for i in range(0, len(inputs), BATCH)])
    finally:
        torch.set_num_threads(threads)


def _assert_each_input_once(chunks: list[tuple[int, int, int]], n: int) -> None:
    covered = sorted((start, stop) for _, start, stop in chunks)
    assert covered[0][0] == 0 and covered[-1][1] == n
    for (_, stop), (start, _) in itertools.pairwise(covered):
        assert stop == start, "ranges overlap or leave a gap"


def _simulate(plan: ChunkPlan, batches_per_s: list[float]) -> tuple[list[float], list[int]]:
    """Run ``plan`` against workers of fixed speed in simulated time: each worker's finish
    time, and how often each input was scored."""
    free_at = [0.0] * len(batches_per_s)
    active = set(range(len(batches_per_s)))
    seen = [0] * plan.n
    while active:
        worker = min(active, key=free_at.__getitem__)  # the next one to ask for work
        task = plan.next_for(worker)
        if task is None:
            active.discard(worker)
            continue
        start, stop = task
        seconds = (stop - start) / (plan.batch_size * batches_per_s[worker]) + 1e-4
        free_at[worker] += seconds
        plan.done(worker, stop - start, seconds)
        for index in range(start, stop):
            seen[index] += 1
    return free_at, seen


def test_weighted_guided_chunk_follows_the_rate_share_and_bounds() -> None:
    assert weighted_guided_chunk(1000, 4.0, 8.0, k=2.0) == 250
    assert weighted_guided_chunk(1000, 1.0, 8.0, k=2.0) == 63
    assert weighted_guided_chunk(1000, 4.0, 8.0, k=2.0, max_chunk=100) == 100
    assert weighted_guided_chunk(3, 1.0, 100.0, min_chunk=8) == 3  # never past the end
    assert weighted_guided_chunk(0, 1.0, 1.0) == 0
    assert weighted_guided_chunk(50, float("nan"), 1.0, min_chunk=2) == 2


@pytest.mark.parametrize(("n", "workers"), [(10, 3), (7, 7), (1000, 6), (5, 8)])
def test_equal_ranges_partition(n: int, workers: int) -> None:
    ranges = equal_ranges(n, workers)

    assert len(ranges) == workers and ranges[0][0] == 0 and ranges[-1][1] == n
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_dynamic_plan_finishes_heterogeneous_workers_together() -> None:
    speeds = [8.0, 4.0, 2.0]  # batches/s
    n, batch = 64 * 1000, 64
    ideal_s = n / batch / sum(speeds)

    dyn_finish, dyn_seen = _simulate(ChunkPlan(n=n, workers=3, batch_size=batch), speeds)
    eq_finish, eq_seen = _simulate(ChunkPlan(n=n, workers=3, chunking="equal",
                                             batch_size=batch), speeds)

    assert dyn_seen == [1] * n and eq_seen == [1] * n
    assert max(dyn_finish) <= 1.05 * ideal_s
    assert max(dyn_finish) - min(dyn_finish) <= 0.05 * ideal_s
    assert max(eq_finish) >= 1.5 * ideal_s  # the slowest worker holds the equal split up


def test_dynamic_plan_probes_every_worker_then_grows_at_most_2x() -> None:
    plan = ChunkPlan(n=64 * 1000, workers=2, batch_size=64)
    plan.done(1, 64, 0.001)  # a probe that ran inside one CFS period: a wildly fast rate

    assert plan.next_for(1) == (0, 64)  # worker 0 has no rate yet: probes only
    plan.done(0, 64, 0.01)
    first = plan.next_for(1)
    second = plan.next_for(1)

    assert first is not None and second is not None
    assert (first[1] - first[0], second[1] - second[0]) == (128, 256)


def test_lost_ranges_go_to_the_others() -> None:
    plan = ChunkPlan(n=1000, workers=2, chunking="equal", batch_size=10)
    first = plan.next_for(1)
    assert first is not None

    plan.lost(1, [first])
    handed: list[tuple[int, int]] = []
    while (task := plan.next_for(0)) is not None:
        handed.append(task)

    assert sum(stop - start for start, stop in handed) == 1000
    assert first in handed


def test_dynamic_output_is_identical_to_one_process_in_order(model_dir: Path) -> None:
    inputs = _inputs(3000)
    progress: list[int] = []

    result = infer_offline(model_dir, inputs, workers=2, batch_size=BATCH,
                           on_progress=lambda done, total: progress.append(done))

    assert np.array_equal(result.outputs, _single_process(model_dir, inputs))
    _assert_each_input_once(result.chunks, len(inputs))
    assert sum(result.samples_per_worker) == len(inputs)
    assert progress == sorted(progress) and progress[-1] == len(inputs)
    assert result.failed_workers == [] and result.outputs.dtype == np.float32


def test_equal_split_gives_the_same_outputs(model_dir: Path) -> None:
    inputs = _inputs(1000, seed=1)

    result = infer_offline(model_dir, inputs, workers=2, chunking="equal", batch_size=BATCH)

    assert np.array_equal(result.outputs, _single_process(model_dir, inputs))
    assert abs(result.samples_per_worker[0] - result.samples_per_worker[1]) <= BATCH
    _assert_each_input_once(result.chunks, len(inputs))


def test_a_killed_worker_loses_no_input(model_dir: Path) -> None:
    inputs = _inputs(6000, seed=2)
    killed: list[int] = []

    def kill_one(done: int, total: int) -> None:
        if not killed:
            victim = mp.active_children()[0]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    result = infer_offline(model_dir, inputs, workers=2, batch_size=BATCH, on_progress=kill_one)

    assert len(result.failed_workers) == 1
    assert np.array_equal(result.outputs, _single_process(model_dir, inputs))
    _assert_each_input_once(result.chunks, len(inputs))
    assert sum(result.samples_per_worker) == len(inputs)


def test_bad_inputs_are_refused_before_any_worker_starts(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"the model wants \(N, 1, 8, 8\)"):
        infer_offline(model_dir, _inputs(10).reshape(10, 64))
    bad = _inputs(10)
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        infer_offline(model_dir, bad)
    with pytest.raises(ConfigError, match="--workers"):
        infer_offline(model_dir, _inputs(10), workers=0)
    with pytest.raises(ConfigError, match="chunking"):
        infer_offline(model_dir, _inputs(10), chunking="random")


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    yield
    assert mp.active_children() == []


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_throttled_workers_get_shares_by_speed_and_finish_together(
    model_dir: Path, no_leftover_children: None,
) -> None:
    inputs = _inputs(24_000, seed=3)

    result = infer_offline(model_dir, inputs, workers=2, speeds=[1.0, 0.25], base_cores=0.5,
                           batch_size=BATCH)

    fast, slow = result.samples_per_worker
    assert fast > 2 * slow, result.summary()  # 4× the CPU quota; at least 2× the work
    assert abs(result.finish_s_per_worker[0] - result.finish_s_per_worker[1]) < (
        0.25 * result.wall_s), result.summary()
    assert np.array_equal(result.outputs, _single_process(model_dir, inputs))
