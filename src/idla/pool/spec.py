"""Job specs: what a user submits to the pool (``idla submit job.toml``), checked field by field.

    name = "finetune"
    kind = "train"              # train | serve | infer
    priority = 4                # p >= 0, the weight of this job's utility in Σ pᵢ·Uᵢ
    min_workers = 1
    max_workers = 3
    deadline_s = 600            # optional: seconds after submission

    [train]
    script = "train_pool.py"    # relative paths: from the spec file's folder
    args = ["--epochs", "2"]
    env = { SEED = "0" }
    resizable = true            # false for a script without run_elastic: placed rigidly
    samples = 4000              # optional: the job's total work, for progress

    [serve]                     # kind = "serve"
    model = "models/digits"
    p99_ms = 50
    offered_requests_per_s = 100

    [infer]                     # kind = "infer"
    model = "models/digits"
    input = "rows.npy"
    output = "predictions.npy"

Every mistake is a `ConfigError` of one line naming the file and the field:
``job.toml: priority: must be a number >= 0, got "high"``. A deadline is a relative number of
seconds (not a date) so that a spec means the same whenever it is submitted and no clock or
time zone enters it. Cost: one TOML parse, O(size of the file).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idla.errors import ConfigError, read_user_text
from idla.pool.model import JobKind, JobView

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before 3.11
    import tomli as tomllib

MAX_SPEC_BYTES = 64 << 10
"""A spec larger than this is refused before it is parsed (the API caps bodies the same)."""
MAX_WORKERS = 4096
MAX_SAMPLES = 10**15
"""A job's ``samples`` (its total work) above this is refused as a typo."""
MAX_MEMORY_BYTES = 1 << 50
"""``memory_bytes_per_worker`` above this (a PiB) is refused as a typo."""
_TOP = {"name", "kind", "priority", "min_workers", "max_workers", "deadline_s",
        "memory_bytes_per_worker", "train", "serve", "infer"}
_SECTIONS = {
    JobKind.TRAIN: {"script", "args", "env", "resizable", "samples"},
    JobKind.SERVE: {"model", "p99_ms", "offered_requests_per_s"},
    JobKind.INFER: {"model", "input", "output"},
}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A submitted job, validated; paths are absolute."""

    name: str
    """A label for people (status table, page); need not be unique."""
    kind: JobKind
    priority: float
    """p ≥ 0: the weight of this job's utility in the pool's Σ pᵢ·Uᵢ."""
    min_workers: int = 1
    max_workers: int = 1
    deadline_s: float | None = None
    """Seconds after submission by which the job should finish, if any."""
    memory_bytes_per_worker: int = 0
    """A device with less memory cannot hold one of its workers (0: no need stated)."""
    script: str | None = None
    """train: the user's script (absolute path), run with this Python."""
    args: tuple[str, ...] = ()
    """train: the script's arguments."""
    env: Mapping[str, str] = field(default_factory=dict)
    """train: extra environment for every worker."""
    resizable: bool = True
    """train: the script uses `run_elastic`, so the job grows and shrinks in place."""
    samples: int | None = None
    """train: total samples the job trains (progress); None when unknown."""
    model: str | None = None
    """serve, infer: the model directory (absolute path)."""
    p99_ms: float | None = None
    """serve: the latency target, milliseconds at the 99th percentile."""
    offered_requests_per_s: float | None = None
    """serve: the load the deployment must carry within its target."""
    input: str | None = None
    """infer: the input file (absolute path)."""
    output: str | None = None
    """infer: where predictions go (absolute path)."""

    def view(self, job_id: str, arrival_s: float, remaining_samples: float | None = None
             ) -> JobView:
        """The job as the policy sees it; a serving job or a rigid script is never resized."""
        deadline = None if self.deadline_s is None else arrival_s + self.deadline_s
        return JobView(
            job_id=job_id, kind=self.kind, priority=self.priority,
            min_workers=self.min_workers, max_workers=self.max_workers,
            memory_bytes_per_worker=self.memory_bytes_per_worker,
            resizable=self.resizable and self.kind is JobKind.TRAIN, arrival_s=arrival_s,
            deadline_s=deadline,
            remaining_samples=remaining_samples if remaining_samples is not None
            else (None if self.samples is None else float(self.samples)),
            offered_requests_per_s=self.offered_requests_per_s or 0.0)

    def as_json(self) -> dict[str, Any]:
        """The spec in the TOML layout (parse_spec of it gives it back)."""
        top: dict[str, Any] = {"name": self.name, "kind": self.kind.value,
                               "priority": self.priority, "min_workers": self.min_workers,
                               "max_workers": self.max_workers,
                               "memory_bytes_per_worker": self.memory_bytes_per_worker}
        if self.deadline_s is not None:
            top["deadline_s"] = self.deadline_s
        section = {name: getattr(self, name) for name in _SECTIONS[self.kind]}
        section = {k: v for k, v in section.items() if v is not None}
        if "args" in section:
            section["args"] = list(section["args"])
        if "env" in section:
            section["env"] = dict(section["env"])
        top[self.kind.value] = section
        return top


class _Fields:
    """Reads typed fields from one table, naming ``where: path.field`` in every error."""

    def __init__(self, table: Mapping[str, Any], where: str, prefix: str = "") -> None:
        self.table, self.where, self.prefix = table, where, prefix

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{name}: {message}")

    def get(self, name: str, default: Any = None, required: bool = False) -> Any:
        if name not in self.table:
            if required:
                raise self.fail(name, "is required")
            return default
        return self.table[name]

    def number(self, name: str, default: float | None = None, *, required: bool = False,
               positive: bool = False) -> float | None:
        value = self.get(name, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise self.fail(name, f"must be a number {bound}, got {json.dumps(value)}")
        return float(value)

    def count(self, name: str, default: int | None, low: int = 1,
              high: int = MAX_WORKERS) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(name, f"must be a whole number in {low}..{high}, got "
                            f"{json.dumps(value)}")
        return value

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self.get(name, None, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise self.fail(name, f"must be a non-empty string, got {json.dumps(value)}")
        return value

    def path(self, name: str, base: Path | None, *, required: bool = True) -> str | None:
        value = self.text(name, required=required)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            if base is None:
                raise self.fail(name, f"{value!r} is relative; give an absolute path")
            path = base / path
        return str(path.resolve())

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.table) - allowed)
        if extra:
            names = ", ".join(sorted(allowed))
            raise self.fail(extra[0], f"unknown field (expected one of {names})")


def _section(top: _Fields, kind: JobKind) -> _Fields:
    for other in JobKind:
        if other is not kind and other.value in top.table:
            raise top.fail(other.value, f"a [{other.value}] table in a {kind.value} job")
    table = top.get(kind.value, {})
    if not isinstance(table, dict):
        raise top.fail(kind.value, "must be a table")
    section = _Fields(table, top.where, f"{kind.value}.")
    section.unknown(_SECTIONS[kind])
    return section


def _train_fields(section: _Fields, base: Path | None) -> dict[str, Any]:
    args = section.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise section.fail("args", f"must be a list of strings, got {json.dumps(args)}")
    env = section.get("env", {})
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise section.fail("env", "must be a table of strings (NAME = \"value\")")
    resizable = section.get("resizable", True)
    if not isinstance(resizable, bool):
        raise section.fail("resizable", f"must be true or false, got {json.dumps(resizable)}")
    return {"script": section.path("script", base), "args": tuple(args), "env": dict(env),
            "resizable": resizable, "samples": section.count("samples", None, high=MAX_SAMPLES)}


def spec_from_mapping(table: Mapping[str, Any], where: str, base: Path | None = None) -> JobSpec:
    """A `JobSpec` from a parsed TOML (or JSON) table; relative paths resolve against ``base``
    (None: they are refused). ``where`` names the source in errors."""
    top = _Fields(table, where)
    top.unknown(_TOP)
    name = top.text("name", required=True)
    kind_text = top.get("kind", required=True)
    try:
        kind = JobKind(kind_text)
    except ValueError:
        raise top.fail("kind", f"must be one of train, serve, infer, got "
                       f"{json.dumps(kind_text)}") from None
    priority = top.number("priority", required=True)
    min_workers = top.count("min_workers", 1)
    max_workers = top.count("max_workers", min_workers)
    assert name is not None and priority is not None and min_workers and max_workers
    if max_workers < min_workers:
        raise top.fail("max_workers", f"{max_workers} is below min_workers {min_workers}")
    memory = top.count("memory_bytes_per_worker", 0, low=0, high=MAX_MEMORY_BYTES)
    section = _section(top, kind)
    fields: dict[str, Any]
    if kind is JobKind.TRAIN:
        fields = _train_fields(section, base)
    elif kind is JobKind.SERVE:
        fields = {"model": section.path("model", base),
                  "p99_ms": section.number("p99_ms", required=True, positive=True),
                  "offered_requests_per_s": section.number("offered_requests_per_s",
                                                           required=True),
                  "resizable": False}
    else:
        fields = {"model": section.path("model", base), "input": section.path("input", base),
                  "output": section.path("output", base), "resizable": False}
    return JobSpec(name=name.strip(), kind=kind, priority=priority, min_workers=min_workers,
                   max_workers=max_workers, deadline_s=top.number("deadline_s", positive=True),
                   memory_bytes_per_worker=memory or 0, **fields)


def parse_spec(text: str, where: str, base: Path | None = None) -> JobSpec:
    """A `JobSpec` from TOML text (errors name ``where``, e.g. the file name)."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_SPEC_BYTES} bytes")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where}: not valid TOML ({error})") from None
    return spec_from_mapping(table, where, base)


def load_spec(path: str | Path) -> JobSpec:
    """The spec in the TOML file at ``path``; relative paths in it are from its folder."""
    file = Path(path)
    text = read_user_text(file, str(path), MAX_SPEC_BYTES)
    return parse_spec(text, file.name, file.resolve().parent)
