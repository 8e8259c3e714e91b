"""The pool's per-worker metrics files: written atomically, throttled, and read back by a reader
that survives whatever it finds in the directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from idla.agent import Agent
from idla.agent.pool_metrics import (
    METRICS_DIR_ENV,
    WORKER_ENV,
    PoolMetrics,
    read_job_metrics,
    write_metrics,
)
from idla.elastic.cursor import samples_before
from idla.errors import ConfigError
from idla.runtime.stats import WIDTH, Stat


def _stats(*samples: int) -> list[list[float]]:
    """A step's statistics rows with these local batches (other columns 0)."""
    rows = [[0.0] * WIDTH for _ in samples]
    for row, count in zip(rows, samples, strict=True):
        row[Stat.SAMPLES] = float(count)
    return rows


def _train(steps: int, batch: int = 8) -> Agent:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(4 * batch, 3), torch.randint(0, 2, (4 * batch,))]
    agent = Agent(model, optimizer, data, global_batch_size=batch)
    done = 0
    for epoch in range(steps):
        for x, y in agent.batches(epoch):
            agent.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            done += 1
            if done == steps:
                agent.close()
                return agent
    raise AssertionError("not enough data for the steps asked")


def test_no_writer_without_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)

    agent = _train(2)

    assert agent.pool_metrics is None


def test_an_agent_writes_its_file_as_it_trains(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path / "metrics"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(WORKER_ENV, "job-a/w7")

    agent = _train(3)

    (row,) = read_job_metrics(tmp_path / "metrics")
    assert row["member"] == 0 and row["world_size"] == 1 and row["device_kind"] == "cpu"
    assert row["worker"] == "job-a/w7"
    assert 1 <= row["job_step"] <= 3 and row["samples_done"] == 8 * row["job_step"]
    assert row["local_batch"] == 8 and row["global_batch"] == 8
    assert agent.pool_metrics is not None
    agent.pool_metrics.write(agent, "done")
    (row,) = read_job_metrics(tmp_path / "metrics")
    assert row["job_step"] == 3 and row["samples_done"] == 24 and row["status"] == "done"
    for key in ("compute_s", "comm_s", "wait_s", "samples_per_s", "job_samples_per_s"):
        assert row[key] is None or math.isfinite(row[key])
    assert row["compute_s"] is not None and row["compute_s"] > 0
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["member-0.json"]  # no temp


def test_an_elastic_generation_continues_the_job_counts(tmp_path: Path) -> None:
    agent = _train(2)
    writer = PoolMetrics(tmp_path, member=0)

    writer.start_at(member=5, step=40, samples=samples_before(1, 2, 100, 16))
    writer.after_step(agent, _stats(10, 6))
    writer.write(agent)

    (row,) = read_job_metrics(tmp_path)
    assert row["member"] == 5 and row["job_step"] == 40 + agent.step
    assert row["samples_done"] == 100 + 2 * 16 + 16
    assert (tmp_path / "member-5.json").is_file()


def test_writes_are_throttled(tmp_path: Path) -> None:
    agent = _train(1)
    writer = PoolMetrics(tmp_path, member=0, interval_s=3600.0)

    for _ in range(5):
        writer.after_step(agent, _stats(8))

    (row,) = read_job_metrics(tmp_path)
    assert row["job_step"] == agent.step + 1  # the first call's; the others were not due
    assert row["samples_done"] == 8


def test_samples_before_counts_a_short_last_batch() -> None:
    assert samples_before(0, 0, 100, 16) == 0
    assert samples_before(2, 3, 100, 16) == 248
    assert samples_before(0, 7, 100, 16) == 100  # the epoch's end


def test_the_reader_skips_what_it_cannot_use(tmp_path: Path) -> None:
    good = {"member": 1, "job_step": 7, "time": 1.5, "samples_done": 70}
    write_metrics(tmp_path / "member-1.json", good)
    (tmp_path / "member-2.json").write_text('{"member": 2, "job_st')  # partial
    (tmp_path / "member-3.json").write_text("[1, 2]")
    (tmp_path / "member-4.json").write_text(json.dumps({"member": "4", "job_step": 1,
                                                        "time": 0}))
    (tmp_path / "member-5.json").write_bytes(b"\xff\xfe")
    (tmp_path / "member-6.json").write_text(" " * 70_000 + json.dumps(good))  # too large
    (tmp_path / "member-7.json").mkdir()
    (tmp_path / ".member-8.json.12.tmp").write_text(json.dumps({**good, "member": 8}))

    assert read_job_metrics(tmp_path) == [good]
    assert read_job_metrics(tmp_path / "absent") == []


def test_an_unwritable_directory_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(ConfigError, match=METRICS_DIR_ENV):
        PoolMetrics(blocker / "metrics", member=0)
