"""NCCL on the one GPU there is: a world of one, the only NCCL group one GPU allows.

idla creates no process group for one worker, so these tests open NCCL themselves, as a user's
script that calls ``init_process_group("nccl")`` before building the agent does. They check
what idla's planes rest on (NCCL takes CUDA tensors; a gloo group beside it takes the CPU
ones), that nothing idla does at world size 1 hands a CPU tensor to that NCCL group (agent,
checkpoints, state transfer), and that `StepClock` times an exchange on the GPU's clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from idla import Agent, AgentConfig
from idla.agent.resume import restore_agent, save_agent
from idla.demo import MLP, DigitsCNN, load_digits_split
from idla.elastic.state_transfer import broadcast_module_, broadcast_optimizer_
from idla.profile.clock import StepClock
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.collectives import all_gather_json
from idla.runtime.devices import DeviceReport, data_backend, local_report
from idla.runtime.group import Group

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA0 = torch.device("cuda", 0)


@pytest.fixture()
def nccl_world1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A user's NCCL process group of one rank on cuda:0, for the test's duration (with
    NCCL's default waits: a blocking wait would make the host wait for the GPU)."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    torch.cuda.set_device(CUDA0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _adam_after_a_step(device: torch.device, seed: int = 0) -> tuple[MLP, torch.optim.Adam]:
    """An MLP (matmuls only: the same bits every time on one GPU, where cuDNN's convolutions
    may not be) and its Adam optimizer after one step."""
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=128).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 1, 8, 8, device=device)
    F.cross_entropy(model(x), torch.randint(0, 10, (32,), device=device)).backward()
    optimizer.step()
    return model, optimizer


def test_nccl_reduces_a_cuda_tensor_and_a_gloo_group_beside_it_the_cpu_ones(
        nccl_world1: None) -> None:
    # Prepare
    data = torch.arange(1 << 20, dtype=torch.float32, device=CUDA0)
    expected = data.clone()
    control = dist.new_group(backend="gloo")  # what Group makes for its control plane
    stats = torch.arange(9, dtype=torch.float64)

    # Execute
    dist.all_reduce(data, async_op=True).wait()
    dist.all_reduce(stats, group=control)
    rows = all_gather_json({"step": 7}, group=control)

    # Assert
    assert dist.get_backend() == "nccl"
    assert torch.equal(data, expected)
    assert torch.equal(stats, torch.arange(9, dtype=torch.float64)) and rows == [{"step": 7}]


def test_an_agent_trains_checkpoints_and_resumes_beside_a_users_nccl_group(
        nccl_world1: None, tmp_path: Path) -> None:
    # Prepare
    train_set, _ = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    agent = Agent(model, optimizer, train_set, config=AgentConfig(global_batch_size=256),
                  group=Group(device=CUDA0))

    # Execute
    for x, y in agent.batches(0):
        agent.backward(F.cross_entropy(model(x), y))
        optimizer.step()
    agent.check_replicas()
    path = save_agent(tmp_path / "ckpt", agent, epoch=1)
    steps = agent.step
    agent.close()
    fresh_model = DigitsCNN()
    fresh = Agent(fresh_model, torch.optim.Adam(fresh_model.parameters(), lr=3e-3), train_set,
                  config=AgentConfig(global_batch_size=256), group=Group(device=CUDA0))
    where = restore_agent(fresh, load_checkpoint(path))
    fresh.close()

    # Assert: the user's group is still NCCL and idla's work on the GPU is done
    assert dist.is_initialized() and dist.get_backend() == "nccl"
    assert agent.report()["backend"] == "none" and steps == 6
    assert where == (1, 0) and fresh.step == steps
    assert all(torch.equal(p, q) for p, q in
               zip(model.parameters(), fresh.model.parameters(), strict=True))


def test_state_transfer_beside_a_users_nccl_group(nccl_world1: None) -> None:
    """`broadcast_optimizer_` gathers the optimizer's JSON skeleton on the group's control
    plane; a one-rank idla group has none, and the user's NCCL group must not take its place
    (its CPU tensors would meet NCCL). Read from the code: ``all_gather_json(group=None)``
    falls back to the default group whenever one is initialized, so expect this to fail until
    a one-rank `Group` short-circuits its control collectives there too."""
    # Prepare
    model, optimizer = _adam_after_a_step(CUDA0)
    group = Group(device=CUDA0)

    # Execute
    broadcast_module_(model, 0, group)
    broadcast_optimizer_(optimizer, 0, group)

    # Assert
    exp_avg = optimizer.state[next(iter(model.parameters()))]["exp_avg"]
    assert exp_avg.device == CUDA0


def test_state_transfer_keeps_adam_state_on_cuda_and_the_next_step_exact() -> None:
    # Prepare: two identical models and optimizers; one goes through the transfer
    model, optimizer = _adam_after_a_step(CUDA0)
    twin, twin_optimizer = _adam_after_a_step(CUDA0)
    group = Group(device=CUDA0)

    # Execute
    broadcast_module_(model, 0, group)
    broadcast_optimizer_(optimizer, 0, group)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5)).to(CUDA0)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        F.cross_entropy(m(x), torch.zeros(32, dtype=torch.int64, device=CUDA0)).backward()
        opt.step()

    # Assert: every state tensor where the untouched twin keeps it (the moments on the GPU,
    # the step count on the CPU unless Adam is fused), the next step bit-identical
    state = optimizer.state[next(iter(model.parameters()))]
    twin_state = twin_optimizer.state[next(iter(twin.parameters()))]
    assert state["exp_avg"].device == CUDA0 and state["exp_avg_sq"].device == CUDA0
    assert state["step"].device == twin_state["step"].device
    assert all(torch.equal(p, q) for p, q in
               zip(model.parameters(), twin.parameters(), strict=True))


def test_step_clock_times_the_exchange_on_the_gpus_clock(nccl_world1: None) -> None:
    """Between `compute_end` and `exchange_end` the GPU runs a known amount of work and an NCCL
    all-reduce; the host only launches them. `exchange_s` must report the GPU's time, not the
    host's."""
    # Prepare: the known work, timed alone; NCCL's communicator made before the clock runs
    a = torch.randn(8192, 8192, device=CUDA0)
    buffer = torch.ones(1 << 24, device=CUDA0)
    dist.all_reduce(buffer)

    def work() -> None:
        for _ in range(4):
            torch.mm(a, a)
        dist.all_reduce(buffer, async_op=True).wait()  # orders the streams; the host goes on

    work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    reference = time.perf_counter() - start
    clock = StepClock(CUDA0)

    # Execute
    torch.cuda.synchronize()
    ready = clock.compute_end()
    work()
    host_s = clock.exchange_end() - ready
    torch.cuda.synchronize()  # the next step's one synchronization
    exchange_s = clock.exchange_s(host_s)

    # Assert
    assert reference > 0.005, f"the workload is too light to time: {reference * 1e3:.2f} ms"
    assert 0.8 * reference <= exchange_s <= 1.2 * reference, (exchange_s, reference)
    assert host_s < 0.5 * exchange_s, (host_s, exchange_s)


def test_the_job_backend_from_this_gpus_report() -> None:
    # Prepare
    gpu = local_report(CUDA0)
    cpu = DeviceReport(host=gpu.host, device="cpu", gpu_id="", nccl=gpu.nccl)

    # Execute
    alone, shared, mixed = data_backend([gpu]), data_backend([gpu, gpu]), data_backend([gpu, cpu])

    # Assert: NCCL only where every rank has a GPU of its own
    assert gpu.device == "cuda:0" and gpu.gpu_id
    assert alone == ("nccl" if dist.is_nccl_available() else "gloo")
    assert shared == "gloo" and mixed == "gloo"
