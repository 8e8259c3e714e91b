"""`idla train`: the demo job on N local workers, with progress, summary and report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from idla.agent import Agent, AgentConfig
from idla.agent.resume import restore_agent, save_agent
from idla.demo import DigitsCNN, accuracy, load_digits_split
from idla.errors import ConfigError
from idla.runtime.checkpoint import load_checkpoint
from idla.runtime.group import Group
from idla.runtime.launch import report_progress
from idla.sync.modes import SyncMode, parse_sync


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """What `idla train` runs: the job's own settings and the agent's (``agent``).

    ``agent.max_local_batch`` stays None: the job holds one cap per worker in
    ``max_local_batch`` and `agent_config` gives each rank its own.
    """

    workers: int = field(default=4, metadata={"parse": "positive_int", "metavar": "N"})
    """Local worker processes."""
    emulate_speeds: list[float] | None = field(
        default_factory=lambda: [1.0, 1.0, 0.5, 0.25],
        metadata={"parse": "speeds", "metavar": "LIST"},
    )
    """Relative CPU speed per local worker, e.g. 1,1,0.5,0.25: each worker runs in its own
    cgroup with quota base-cores × speed (real OS throttling; the agent is not told); 'none'
    runs at full speed."""
    base_cores: float = field(default=0.5, metadata={"metavar": "CORES"})
    """CPU cores a worker of speed 1 gets when emulating."""
    agent: AgentConfig = field(default_factory=lambda: AgentConfig(global_batch_size=512))
    """How the agent plans, checks and compresses (global batch, seed, rebalance, codec)."""
    epochs: int = field(default=20, metadata={"parse": "positive_int", "metavar": "E"})
    """Passes over the training set."""
    lr: float = 3e-3
    """Adam learning rate."""
    max_local_batch: list[int] | None = field(
        default=None, metadata={"parse": "caps", "metavar": "LIST"})
    """Memory cap on each worker's local batch, e.g. 256,256,128,64; None: no caps."""
    out: str | None = field(default="runs/train", metadata={"metavar": "DIR"})
    """Directory for report.json, training.png and the model; None writes nothing."""
    threads: int = 1
    """torch threads per worker."""
    sync: str = field(default="allreduce", metadata={"metavar": "MODE"})
    """Synchronization mode: allreduce | local:H | diloco:H | async:S."""
    delay_compensation: float = field(default=0.0, metadata={"metavar": "LAMBDA"})
    """DC-ASGD λ for --sync async; 0 turns it off."""
    checkpoint_dir: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Save a checkpoint (safetensors + JSON) here after every epoch; None saves none."""
    resume: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Continue from a checkpoint directory (or its parent, via 'latest')."""

    def __post_init__(self) -> None:
        batch = self.agent.global_batch_size
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.emulate_speeds is not None and len(self.emulate_speeds) != self.workers:
            raise ConfigError(
                f"--emulate-speeds lists {len(self.emulate_speeds)} speeds for "
                f"{self.workers} workers"
            )
        if batch < self.workers:
            raise ConfigError(
                f"--global-batch {batch} is smaller than the number of workers {self.workers}"
            )
        if self.agent.max_local_batch is not None:
            raise ConfigError("TrainConfig.agent.max_local_batch must be None; set the caps "
                              "per worker in TrainConfig.max_local_batch")
        caps = self.max_local_batch
        if caps is not None:
            if len(caps) != self.workers:
                raise ConfigError(
                    f"--max-local-batch lists {len(caps)} caps for {self.workers} workers"
                )
            if sum(caps) < batch:
                raise ConfigError(
                    f"--max-local-batch: the caps hold at most {sum(caps)} samples but the "
                    f"global batch is {batch}"
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
        if spec.mode is not SyncMode.ALLREDUCE and self.agent.compress != "none":
            raise ConfigError("--compress applies to --sync allreduce only")
        if self.delay_compensation < 0:
            raise ConfigError(f"--delay-compensation must be 0 or more, got "
                              f"{self.delay_compensation}")
        train_size = len(load_digits_split(seed=self.agent.seed)[0])
        if train_size < batch:
            raise ConfigError(f"--global-batch {batch} is larger than the data set "
                              f"({train_size} training samples)")

    def agent_config(self, rank: int) -> AgentConfig:
        """The agent's config on ``rank``: ``agent`` with that worker's memory cap."""
        caps = self.max_local_batch
        return replace(self.agent, max_local_batch=None if caps is None else caps[rank])

    def as_dict(self) -> dict[str, Any]:
        """The ``config`` section of report.json: one flat object, keys as they have always
        been (``global_batch`` for ``agent.global_batch_size``)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "agent"}
        agent = self.agent
        return {**own, "global_batch": agent.global_batch_size, "seed": agent.seed,
                "rebalance": agent.rebalance, "compress": agent.compress,
                "error_feedback": agent.error_feedback}


def train_worker(config: TrainConfig) -> dict[str, Any]:
    """One worker of the demo job; rank 0 reports progress and returns the full report."""
    torch.set_num_threads(config.threads)
    group = Group()
    train_set, test_set = load_digits_split(seed=config.agent.seed)
    torch.manual_seed(config.agent.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    agent = Agent(model, optimizer, train_set, config=config.agent_config(group.rank),
                  group=group)
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
        config=config.as_dict(),
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
