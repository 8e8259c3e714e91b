"""`idla train` and `idla profile`: the demo job and the worker survey.

Both parsers come from `TrainConfig` (and its `AgentConfig`); heavy imports (torch) stay inside
the handlers so that `idla --help` is fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from idla.cli import fields
from idla.errors import ConfigError

# The options of `idla train`, in the order --help lists them ("agent.x": TrainConfig.agent.x).
TRAIN_OPTIONS = (
    "workers", "emulate_speeds", "base_cores", "agent.global_batch_size", "epochs", "lr",
    "agent.seed", "max_local_batch", "agent.rebalance", "out", "agent.compress",
    "agent.error_feedback", "sync", "delay_compensation", "checkpoint_dir", "resume",
    "agent.replica_check", "agent.replica_tolerance",
)
PROFILE_OPTIONS = ("workers", "emulate_speeds", "base_cores")


def _train_config() -> type:
    from idla.jobs.train import TrainConfig

    return TrainConfig


def add_commands(commands: Any, benches: Any) -> None:
    """Add `idla train` and `idla profile` to ``commands``."""
    train = commands.add_parser(
        "train", help="train the demo CNN on digits with N local workers",
        description="Train the demo CNN (scikit-learn digits) on local workers with "
        "heterogeneity-aware shares. With no options: 4 workers at speeds 1,1,0.5,0.25.",
    )
    train.defer(_train_options)
    train.set_defaults(handler=_train)
    profile = commands.add_parser(
        "profile", help="probe local workers: CPU, memory, GPU, link bandwidth, step time",
        description="Start N local workers, probe each (CPU, memory, GPU, measured link "
        "bandwidth) and fit its step time as a function of batch size; print a table.",
    )
    profile.defer(_profile_options)
    profile.set_defaults(handler=_profile)


def _train_options(train: argparse.ArgumentParser) -> None:
    fields.add_options(train, _train_config(), TRAIN_OPTIONS)
    train.add_argument("--elastic", action="store_true",
                       help="Survive lost workers: the others re-form the group and go on")
    train.add_argument("--faults", default="", metavar="LIST",
                       help="With --elastic, inject faults: kill:2@30, term:2@30, nan:1@20+5, "
                            "slow:3@10x10")
    train.add_argument("--quiet", action="store_true", help="No progress bar")


def _profile_options(profile: argparse.ArgumentParser) -> None:
    fields.add_options(profile, _train_config(), PROFILE_OPTIONS,
                       defaults={"emulate_speeds": "none"})
    profile.add_argument("--json", metavar="PATH", help="Also write the table as JSON here")


def _train(args: argparse.Namespace) -> int:
    if args.faults and not args.elastic:
        raise ConfigError("--faults needs --elastic")
    config = fields.build(_train_config(), args, TRAIN_OPTIONS)
    speeds = config.emulate_speeds
    if args.elastic:
        from idla.jobs.elastic import launch_elastic

        return int(launch_elastic(config, speeds, args.faults))
    if config.sync != "allreduce":
        return _train_mode(config, speeds)
    from idla.jobs.summary import TrainProgress, print_summary
    from idla.jobs.train import train_worker, write_outputs
    from idla.runtime.launch import launch_local

    if args.quiet:
        reports = launch_local(train_worker, (config,), config.workers, speeds, config.base_cores)
    else:
        with TrainProgress() as progress:
            reports = launch_local(train_worker, (config,), config.workers, speeds,
                                   config.base_cores, on_progress=progress.update)
    report = reports[0]
    out = write_outputs(report, config.out) if config.out else None
    print_summary(report, out)
    return 0


def _train_mode(config: Any, speeds: list[float] | None) -> int:
    from idla.jobs.sync_modes import mode_summary, mode_worker, print_mode_summary
    from idla.runtime.launch import launch_local

    results = launch_local(mode_worker, (config,), config.workers, speeds, config.base_cores)
    report = mode_summary(results)
    print_mode_summary(report)
    if config.out:
        from pathlib import Path

        from idla.report import write_json_atomic

        Path(config.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(config.out) / "report.json", report)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from idla.jobs.profile_survey import print_profiles, survey_workers

    given = fields.values(_train_config(), args, PROFILE_OPTIONS)
    rows = survey_workers(given["workers"], given.get("emulate_speeds"), given["base_cores"])
    print_profiles(rows)
    if args.json:
        from idla.report import write_json_atomic

        write_json_atomic(args.json, {"workers": rows})
    return 0
