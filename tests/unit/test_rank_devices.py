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
    settle_shared_gpus,
)


def _gpu(host: str, index: int, uuid: str) -> DeviceReport:
    return DeviceReport(host=host, device=f"cuda:{index}", gpu_id=uuid, nccl=True)


CPU = DeviceReport(host="b", device="cpu", gpu_id="", nccl=True)


@pytest.mark.parametrize(("local_rank", "gpus", "env", "expected"), [
    (0, 0, {}, "cpu"),
    (1, 2, {}, "cuda:1"),
    (1, 1, {}, "cuda:0"),  # proposed; settled below when rank 0 proposes it too
    (3, 2, {}, "cuda:1"),
    (0, 2, {"IDLA_DEVICE": "cpu"}, "cpu"),
    (1, 2, {"IDLA_DEVICE": "cuda"}, "cuda:1"),
    (1, 2, {"IDLA_DEVICE": "cuda:0"}, "cuda:0"),
])
def test_each_rank_proposes_a_device(
    local_rank: int, gpus: int, env: dict[str, str], expected: str
) -> None:
    assert str(choose_device(local_rank, gpus, env)) == expected


def _on(host: str, index: int, uuid: str, pinned: bool = False) -> DeviceReport:
    return DeviceReport(host=host, device=f"cuda:{index}", gpu_id=uuid, nccl=True, pinned=pinned)


def test_a_gpu_proposed_by_several_ranks_of_a_host_goes_to_the_lowest() -> None:
    """--nproc-per-node 3 on a one-GPU box: rank 0 keeps it, ranks 1 and 2 take the CPU; one
    GPU per Slurm task (each sees its own as cuda:0, different UUIDs): every rank keeps its
    own; IDLA_DEVICE keeps a rank where it was put."""
    one_box = settle_shared_gpus([_on("a", 0, "u0")] * 3)
    assert [r.device for r in one_box] == ["cuda:0", "cpu", "cpu"]
    assert data_backend(one_box) == "gloo"
    per_task = settle_shared_gpus([_on("a", 0, "u0"), _on("a", 0, "u1"), _on("b", 0, "u0")])
    assert [r.device for r in per_task] == ["cuda:0"] * 3
    assert data_backend(per_task) == "nccl"
    pinned = settle_shared_gpus([_on("a", 0, "u0"), _on("a", 0, "u0", pinned=True)])
    assert [r.device for r in pinned] == ["cuda:0", "cuda:0"]
    assert data_backend(pinned) == "gloo"


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
