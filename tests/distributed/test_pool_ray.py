"""The pool's Ray backend on a local Ray: devices from the node's resources, workers as actors
that run a real elastic job over gloo, a graceful stop that makes a worker leave, and a kill."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idla
from idla.agent.pool_metrics import METRICS_DIR_ENV, read_job_metrics
from idla.errors import ConfigError, IdlaError
from idla.pool.backend import WorkerLaunch
from idla.runtime.launch import free_port
from tests.distributed.leave_worker import SAMPLES, check_every_sample_once_per_epoch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'idla[flower]')")
from idla.pool.ray_backend import (  # noqa: E402 (after the skip: this module imports ray)
    LOST_EXIT_CODE,
    RayBackend,
    RayConfig,
    RayWorker,
    check_reachable,
    node_devices,
)

WORKER = Path(__file__).with_name("leave_worker.py")
EPOCHS = 3


def test_a_node_gives_one_device_per_gpu_and_per_cpu_slot() -> None:
    node = {"NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7", "Alive": True,
            "Resources": {"CPU": 9.0, "GPU": 2.0, "memory": 40e9,
                          "accelerator_type:A100": 1.0}}

    devices = node_devices(node, RayConfig(cpus_per_worker=2, cpus_per_gpu_worker=1))

    assert [d.kind for d in devices] == ["a100", "a100", "cpu", "cpu", "cpu"]  # (9 - 2) // 2
    assert len({d.device_id for d in devices}) == 5
    assert {d.node for d in devices} == {node["NodeID"]}
    assert all(d.memory_bytes == 8_000_000_000 for d in devices)
    assert node_devices({**node, "Alive": False}, RayConfig()) == []


@pytest.fixture(scope="module")
def backend() -> Iterator[RayBackend]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    pool = RayBackend()
    try:
        yield pool
    finally:
        pool.close()
        ray.shutdown()


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_workers_run_as_actors_and_a_graceful_stop_makes_one_leave(
        backend: RayBackend, tmp_path: Path) -> None:
    devices = backend.devices()
    assert [d.kind for d in devices] == ["cpu", "cpu"]
    metrics = tmp_path / "metrics"
    env = {"PYTHONPATH": str(Path(idla.__file__).parents[1]), "GLOO_SOCKET_IFNAME": "lo",
           "IDLA_DEVICE": "cpu", "IDLA_RENDEZVOUS": f"file:{tmp_path / 'rendezvous'}",
           "IDLA_JOB_SECRET": "the-job-secret-0123456789", "WORLD_SIZE": "2",
           "LEAVE_EPOCHS": str(EPOCHS), "LEAVE_PACE_S": "0.1", METRICS_DIR_ENV: str(metrics)}
    handles = [backend.start(WorkerLaunch(
        job_id="j", member=rank, device=devices[rank],
        argv=[sys.executable, str(WORKER), str(tmp_path / f"w{rank}.json")],
        env={**env, "RANK": str(rank)}, log_path=str(tmp_path / f"w{rank}.log")))
        for rank in range(2)]

    assert [h.node_id for h in handles] == [d.node for d in devices[:2]]

    def member_1_has_trained() -> bool:
        rows = read_job_metrics(metrics)
        return any(r["member"] == 1 and r["job_step"] >= 1 for r in rows)

    _wait(member_1_has_trained, 120, "member 1's metrics")
    backend.stop(handles[1], graceful=True)
    _wait(lambda: all(h.poll() is not None for h in handles), 120, "the workers to end")

    logs = [(tmp_path / f"w{rank}.log").read_text()[-2000:] for rank in range(2)]
    assert [h.poll() for h in handles] == [0, 0], logs
    stayer, leaver = (json.loads((tmp_path / f"w{r}.json").read_text()) for r in range(2))
    assert leaver["left"] and not stayer["left"] and leaver["step"] < stayer["step"]
    assert stayer["step"] == EPOCHS * 10 and stayer["world_size"] == 1
    (event,) = stayer["events"]
    assert event["left_members"] == [1] and event["steps_lost"] == 0
    check_every_sample_once_per_epoch([stayer, leaver], EPOCHS)
    assert sum(r["samples_done"] for r in read_job_metrics(metrics)
               if r["member"] == 0) == EPOCHS * SAMPLES


def test_a_hard_stop_kills_the_worker(backend: RayBackend) -> None:
    (device, *_) = backend.devices()
    handle = backend.start(WorkerLaunch(job_id="k", member=0, device=device,
                                        argv=[sys.executable, "-c", "import time; time.sleep(60)"]))
    assert isinstance(handle, RayWorker) and handle.poll() is None

    backend.stop(handle, graceful=False)

    _wait(lambda: handle.poll() is not None, 30, "the killed worker")
    assert handle.poll() == LOST_EXIT_CODE  # -SIGKILL, as Popen reports it


def test_an_unreachable_cluster_is_one_clear_error() -> None:
    port = free_port()  # nothing listens there

    with pytest.raises(IdlaError, match="cannot reach the Ray cluster"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2.0)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_reachable("no-port-here")
