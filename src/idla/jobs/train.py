"""`idla train`: the demo job on N local workers, with progress, summary and report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, AgentConfig
from idla.agent.resume import restore_agent, save_agent
from idla.compress import parse_codec
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.group import Group
from idla.runtime.launch import report_progress
from idla.sync.modes import SyncMode, parse_sync


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """What `idla train` runs; each field is a CLI option of the same name."""

    workers: int = 4
    """Local worker processes."""
    emulate_speeds: list[float] | None = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25])
    """Relative CPU speed of each worker (cgroup throttling); None runs at full speed."""
    base_cores: float = 0.5
    """CPU cores a worker of speed 1 gets when emulating."""
    global_batch: int = 512
    """Samples per optimizer step, summed over workers."""
    epochs: int = 20
    """Passes over the training set."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 0
    """Seeds the model, the data order and the split."""
    rebalance: bool = True
    """Let the agent re-plan shares (False: equal shares)."""
    max_local_batch: list[int] | None = None
    """Memory cap on each worker's local batch (None: no caps)."""
    out: str | None = "runs/train"
    """Directory for report.json and plots (None: none written)."""
    threads: int = 1
    """torch threads per worker."""
    compress: str = "none"
    """Gradient codec, or "auto" (see AgentConfig.compress)."""
    error_feedback: bool = True
    """Carry what the codec dropped into the next step."""
    sync: str = "allreduce"
    """Synchronization mode: allreduce, local:H, diloco:H or async:S."""
    checkpoint_dir: str | None = None
    """Save a checkpoint here at the end of every epoch (None: no checkpoints)."""
    resume: str | None = None
    """Continue from this checkpoint (a step directory, or a directory with `latest`)."""
    delay_compensation: float = 0.0
    """λ of DC-ASGD in async mode (0: off)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.emulate_speeds is not None and len(self.emulate_speeds) != self.workers:
            raise ConfigError(
                f"--emulate-speeds lists {len(self.emulate_speeds)} speeds for "
                f"{self.workers} workers"
            )
        if self.global_batch < self.workers:
            raise ConfigError(
                f"--global-batch {self.global_batch} is smaller than the number of workers "
                f"{self.workers}"
            )
        caps = self.max_local_batch
        if caps is not None:
            if len(caps) != self.workers:
                raise ConfigError(
                    f"--max-local-batch lists {len(caps)} caps for {self.workers} workers"
                )
            if sum(caps) < self.global_batch:
                raise ConfigError(
                    f"--max-local-batch: the caps hold at most {sum(caps)} samples but the "
                    f"global batch is {self.global_batch}"
                )
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.base_cores <= 0:
            raise ConfigError(f"--base-cores must be positive, got {self.base_cores}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        spec = parse_sync(self.sync)
        if spec.mode is not SyncMode.ALLREDUCE and (self.checkpoint_dir or self.resume):
            raise ConfigError("--checkpoint-dir and --resume apply to --sync allreduce only")
        if spec.mode is not SyncMode.ALLREDUCE and self.compress != "none":
            raise ConfigError("--compress applies to --sync allreduce only")
        if self.delay_compensation < 0:
            raise ConfigError(f"--delay-compensation must be 0 or more, got "
                              f"{self.delay_compensation}")
        if self.compress != "auto":
            try:
                parse_codec(self.compress)
            except ConfigError as error:
                raise ConfigError(f"--compress: {error}, or auto") from None


def train_worker(config: TrainConfig) -> dict[str, Any]:
    """One worker of the demo job; rank 0 reports progress and returns the full report."""
    torch.set_num_threads(config.threads)
    group = Group()
    train_set, test_set = load_digits_split(seed=config.seed)
    torch.manual_seed(config.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    agent = Agent(
        model, optimizer, train_set,
        config=AgentConfig(
            global_batch_size=config.global_batch, seed=config.seed, rebalance=config.rebalance,
            max_local_batch=None if config.max_local_batch is None
            else config.max_local_batch[group.rank],
            compress=config.compress, error_feedback=config.error_feedback,
        ),
        group=group,
    )
    first_epoch, first_batch = 0, 0
    if config.resume is not None:
        first_epoch, first_batch = restore_agent(agent, load_checkpoint(config.resume))
    steps = config.epochs * agent.sampler.steps_per_epoch()
    start = time.perf_counter()
    for epoch in range(first_epoch, config.epochs):
        for x, y in agent.batches(epoch, first_batch if epoch == first_epoch else 0):
            loss = F.cross_entropy(model(x), y)
            agent.backward(loss)
            optimizer.step()
            if agent.rank == 0:
                report_progress({"step": agent.step, "steps": steps, "shares": agent.shares,
                                 "loss": agent.history["loss"][-1]})
        if config.checkpoint_dir is not None:
            save_agent(config.checkpoint_dir, agent, epoch=epoch + 1)
    elapsed_s = time.perf_counter() - start
    agent.close()
    if config.out is not None and agent.rank == 0:  # what `idla serve` and `idla infer` load
        from idla.serve.model_io import save_model

        save_model(Path(config.out) / "model", model, "digits_cnn",
                   {"hidden": 128, "classes": 10}, (1, 8, 8))
    report = agent.report()
    report.update(
        test_accuracy=accuracy(model, test_set, agent.group.device),
        elapsed_s=elapsed_s,
        samples_per_s=steps and (config.epochs - first_epoch) * len(train_set) / elapsed_s,
        config=asdict(config),
    )
    return report if agent.rank == 0 else {}


def write_outputs(report: dict[str, Any], out: str | Path) -> Path:
    """report.json and training.png in `out` (both written atomically)."""
    from idla.report import plot_history, write_json_atomic

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "report.json", report)
    plot_history(report["history"], directory / "training.png")
    return directory
