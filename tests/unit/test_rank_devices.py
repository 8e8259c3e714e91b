"""Each rank's device choice, and the job-wide backend decided from every rank's report."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from idla.errors import ConfigError
from idla.runtime.devices import (
    DeviceReport,
    agree_on_reports,
    choose_device,
    data_backend,
    describe_fleet,
)


def _gpu(host: str, index: int, uuid: str) -> DeviceReport:
    return DeviceReport(host=host, device=f"cuda:{index}", gpu_id=uuid, nccl=True)


CPU = DeviceReport(host="b", device="cpu", gpu_id="", nccl=True)


@pytest.mark.parametrize(("local_rank", "gpus", "env", "expected"), [
    (0, 0, {}, "cpu"),
    (1, 2, {}, "cuda:1"),
    (1, 1, {}, "cpu"),  # --nproc-per-node 2 on a one-GPU box: one GPU rank, one CPU rank
    (3, 1, {"CUDA_VISIBLE_DEVICES": "5"}, "cuda:0"),  # a GPU per task (Slurm)
    (3, 1, {"CUDA_VISIBLE_DEVICES": ""}, "cpu"),
    (0, 2, {"IDLA_DEVICE": "cpu"}, "cpu"),
    (1, 2, {"IDLA_DEVICE": "cuda"}, "cuda:1"),
    (1, 2, {"IDLA_DEVICE": "cuda:0"}, "cuda:0"),
])
def test_each_rank_chooses_its_own_device(
    local_rank: int, gpus: int, env: dict[str, str], expected: str
) -> None:
    assert str(choose_device(local_rank, gpus, env)) == expected


@pytest.mark.parametrize(("value", "gpus", "message"), [
    ("cuda:0", 0, "CUDA is not available"),
    ("cuda:2", 2, "this host has 2 GPU"),
    ("tpu", 1, "expected cpu, cuda or cuda:N"),
    ("cuda:x", 1, "expected cpu, cuda or cuda:N"),
])
def test_a_device_the_host_lacks_is_a_clear_error(value: str, gpus: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        choose_device(0, gpus, {"IDLA_DEVICE": value})


@pytest.mark.parametrize(("reports", "backend"), [
    ([_gpu("a", 0, "u0"), _gpu("a", 1, "u1")], "nccl"),
    ([_gpu("a", 0, "u0"), _gpu("b", 0, "u0")], "nccl"),  # same index on two hosts
    ([_gpu("a", 0, "u0"), CPU], "gloo"),  # a mixed fleet
    ([_gpu("a", 0, "u0"), _gpu("a", 0, "u0")], "gloo"),  # two ranks on one GPU
    ([_gpu("a", 0, "u0"), DeviceReport("a", "cuda:1", "u1", nccl=False)], "gloo"),
    ([CPU, CPU], "gloo"),
])
def test_nccl_only_when_every_rank_has_a_gpu_of_its_own(
    reports: list[DeviceReport], backend: str
) -> None:
    assert data_backend(reports) == backend


def test_a_report_survives_json_and_a_malformed_one_is_refused() -> None:
    report = _gpu("a", 1, "GPU-1234")
    assert DeviceReport.from_json(report.to_json()) == report
    with pytest.raises(ConfigError, match="malformed device report"):
        DeviceReport.from_json('{"host": "a"}')
    assert describe_fleet([report, CPU]) == "0:cuda:1 1:cpu"


def _store(port: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, 3, is_master, timedelta(seconds=10),
                         wait_for_workers=False)


def test_ranks_reporting_different_devices_agree_on_one_backend_through_the_store() -> None:
    """Three ranks (threads, each with its own client of one real TCPStore) report a GPU, a
    GPU and a CPU: every one of them reads the same reports and picks gloo."""
    master = dist.TCPStore("127.0.0.1", 0, 3, True, timedelta(seconds=10),
                           wait_for_workers=False)
    mine = [_gpu("a", 0, "u0"), _gpu("a", 1, "u1"), CPU]
    seen: dict[int, list[DeviceReport]] = {}

    def rank(r: int) -> None:
        store = master if r == 0 else _store(master.port, is_master=False)
        seen[r] = agree_on_reports(store, r, 3, mine[r], timeout_s=10.0)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [seen[r] for r in range(3)] == [mine] * 3
    assert {data_backend(seen[r]) for r in range(3)} == {"gloo"}
    assert data_backend(mine[:2]) == "nccl"


def test_a_rank_that_never_reports_is_a_clear_error() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=5), wait_for_workers=False)
    with pytest.raises(ConfigError, match=r"not every rank reported its device within 0\.5 s"):
        agree_on_reports(store, 0, 2, CPU, timeout_s=0.5)


def test_a_control_plane_tensor_must_live_on_the_cpu() -> None:
    from idla.runtime.group import Group

    group = Group()  # one rank: no peers, but the device rule holds
    with pytest.raises(ValueError, match="control-plane tensor must be on the CPU"):
        group.control_all_gather(torch.empty(1, device="meta"))
    assert group.device == choose_device(0, torch.cuda.device_count())


def test_a_cpu_rank_checkpoints_an_empty_cuda_generator_state_of_the_common_shape() -> None:
    from idla.agent.resume import CUDA_RNG_BYTES, cuda_rng_state, set_cuda_rng_state

    saved = cuda_rng_state(torch.device("cpu"))
    assert saved.shape == (CUDA_RNG_BYTES,) and int(saved.sum()) == 0
    set_cuda_rng_state(saved, torch.device("cpu"))  # nothing to restore, and no error
    foreign = saved.clone()
    foreign[0] = 16  # saved on a GPU rank, restored on a CPU one: the CPU has no such state
    set_cuda_rng_state(foreign, torch.device("cpu"))
