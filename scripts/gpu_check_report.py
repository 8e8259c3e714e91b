"""Verdict lines for `scripts/gpu_check.sh`: what a step printed or wrote, read back as
``PASS``/``FAIL``/``SKIP``/``NUM``/``INFO`` lines ("<KIND> <check>: <detail>").

    python scripts/gpu_check_report.py env
    python scripts/gpu_check_report.py junit RESULTS.xml
    python scripts/gpu_check_report.py pytest-log LOG            # a run cut short: its -v lines
    python scripts/gpu_check_report.py train NAME REPORT.json
    python scripts/gpu_check_report.py example NAME LOG --world N [--fleet F] [--min-accuracy A]
    python scripts/gpu_check_report.py expected-fleet N          # the fleet torchrun -n N gets

Only the standard library at the top: ``junit`` and ``pytest-log`` run without torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import socket
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

DETAIL_CHARS = 300
"""Longest detail on a verdict line; the log holds the rest."""

DEPENDENCIES = ("pytest", "numpy", "sklearn", "psutil", "safetensors", "rich", "matplotlib",
                "fastapi", "uvicorn", "httpx", "prometheus_client", "hypothesis", "pynvml")


def say(kind: str, key: str, detail: object) -> None:
    text = " ".join(str(detail).split())
    print(f"{kind} {key}: {text[:DETAIL_CHARS]}", flush=True)


# ---- env ---------------------------------------------------------------------------------


def env() -> int:
    say("INFO", "python", f"{sys.version.split()[0]} at {sys.executable}")
    for name in DEPENDENCIES:
        try:
            module = importlib.import_module(name)
            say("INFO", f"dep_{name}", getattr(module, "__version__", "present"))
        except Exception as error:  # any failure to import is what this line reports
            say("INFO", f"dep_{name}", f"missing ({type(error).__name__}: {error})")
    import torch
    import torch.distributed as dist

    say("INFO", "torch", f"{torch.__version__} (CUDA {torch.version.cuda}, available "
                         f"{torch.cuda.is_available()}, {torch.cuda.device_count()} device(s)) "
                         f"from {os.path.dirname(torch.__file__)}")
    say("INFO", "backends", f"nccl={dist.is_nccl_available()} gloo={dist.is_gloo_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        say("INFO", "gpu0", f"{props.name}, sm_{props.major}{props.minor}, "
                            f"{props.total_memory / 2**30:.0f} GiB, "
                            f"{props.multi_processor_count} SMs")
        try:
            say("INFO", "nccl", ".".join(map(str, torch.cuda.nccl.version())))
        except Exception as error:  # older torch: no version tuple
            say("INFO", "nccl", f"{type(error).__name__}: {error}")
    say("INFO", "tf32", f"matmul {torch.backends.cuda.matmul.allow_tf32}, "
                        f"cudnn {torch.backends.cudnn.allow_tf32}")
    say("INFO", "visible", f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
                           f"IDLA_DEVICE={os.environ.get('IDLA_DEVICE')!r}")
    import idla

    say("INFO", "idla", f"{idla.__version__} from {os.path.dirname(idla.__file__)}")
    from idla.runtime.netif import ensure_gloo_interface

    trial = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}
    say("INFO", "netif", f"for a one-host job (MASTER_ADDR=127.0.0.1) idla's Group sets "
                         f"GLOO_SOCKET_IFNAME={ensure_gloo_interface(trial)!r} unless it is set")
    say("INFO", "torchrun_fleet_3", f"{expected_fleet(3)} (each rank's own choice here)")
    return 0


# ---- the fleet a torchrun of N processes gets --------------------------------------------


def expected_fleet(processes: int) -> str:
    """"<backend>: 0:<device> 1:<device> ..." as `Group.describe_fleet` would write it for
    local ranks 0..N-1 on this host (its environment, its GPUs)."""
    import torch
    import torch.distributed as dist

    from idla.runtime.devices import DeviceReport, choose_device, data_backend, describe_fleet

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    host, nccl = socket.gethostname(), dist.is_nccl_available()
    reports = []
    for local_rank in range(processes):
        device = choose_device(local_rank, count)
        gpu_id = "" if device.type == "cpu" else f"{host}:{device.index or 0}"
        reports.append(DeviceReport(host=host, device=str(device), gpu_id=gpu_id, nccl=nccl))
    return f"{data_backend(reports)}: {describe_fleet(reports)}"


# ---- pytest results ----------------------------------------------------------------------


def junit(path: str) -> int:
    """One verdict per test case of a JUnit XML file written by ``pytest --junitxml``."""
    root = ElementTree.parse(path).getroot()
    for case in root.iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        name = f"{module}.py::{case.get('name')}" if module else str(case.get("name"))
        seconds = float(case.get("time", "0") or 0)
        skipped = case.find("skipped")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            say("FAIL", name, failure.get("message") or (failure.text or "").strip()[-600:])
        elif skipped is not None:
            say("SKIP", name, (skipped.get("message") or "").removeprefix("Skipped: "))
        else:
            say("PASS", name, f"{seconds:.1f} s")
    return 0


_VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED)(?:\s+\((.*)\))?")


def pytest_log(path: str) -> int:
    """The verdicts a ``pytest -v`` run printed before it was cut short."""
    kinds = {"PASSED": "PASS", "FAILED": "FAIL", "ERROR": "FAIL", "SKIPPED": "SKIP"}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = _VERBOSE_LINE.match(line)
        if match:
            say(kinds[match.group(2)], match.group(1), match.group(3) or "(from the -v log)")
    return 0


# ---- the CLI and the examples ------------------------------------------------------------


def _last_json(path: str) -> dict[str, Any] | None:
    for line in reversed(Path(path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def train(name: str, path: str) -> int:
    """`idla train`'s report.json: a run on one worker that learned."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        say("FAIL", name, f"no readable report.json ({error})")
        return 0
    accuracy = float(report.get("test_accuracy", 0.0))
    ok = report.get("world_size") == 1 and accuracy > 0.85
    say("PASS" if ok else "FAIL", name,
        f"backend {report.get('backend')}, world size {report.get('world_size')}, test accuracy "
        f"{accuracy:.3f} (want > 0.85), {report.get('steps')} steps")
    say("NUM", f"{name}_samples_per_s", f"{float(report.get('samples_per_s', 0.0)):.0f}")
    return 0


def example(name: str, path: str, world: int, fleet: str | None, min_accuracy: float) -> int:
    """An example's one JSON line: the world size (or fleet) wanted and an accuracy above
    `min_accuracy`."""
    result = _last_json(path)
    if result is None:
        tail = Path(path).read_text(errors="replace").strip().splitlines()[-3:]
        say("FAIL", name, f"no JSON line; the output ends: {' | '.join(tail)}")
        return 0
    problems = []
    if fleet is not None and result.get("fleet") != fleet:
        problems.append(f"fleet {result.get('fleet')!r}, want {fleet!r}")
    if "world_size" in result and result["world_size"] != world:
        problems.append(f"world size {result['world_size']}, want {world}")
    accuracy = float(result.get("test_accuracy", 0.0))
    if accuracy <= min_accuracy:
        problems.append(f"test accuracy {accuracy:.3f}, want > {min_accuracy}")
    say("FAIL" if problems else "PASS", name,
        "; ".join(problems) or f"{result.get('fleet', f'world size {world}')}, shares "
                               f"{result.get('shares')}, test accuracy {accuracy:.3f}")
    if "samples_per_s" in result:
        say("NUM", f"{name}_samples_per_s", f"{float(result['samples_per_s']):.0f} "
                                            f"(shares {result.get('shares')})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env")
    commands.add_parser("junit").add_argument("path")
    commands.add_parser("pytest-log").add_argument("path")
    train_parser = commands.add_parser("train")
    train_parser.add_argument("name")
    train_parser.add_argument("path")
    example_parser = commands.add_parser("example")
    example_parser.add_argument("name")
    example_parser.add_argument("path")
    example_parser.add_argument("--world", type=int, required=True)
    example_parser.add_argument("--fleet")
    example_parser.add_argument("--min-accuracy", type=float, default=0.85)
    commands.add_parser("expected-fleet").add_argument("processes", type=int)
    args = parser.parse_args()

    if args.command == "env":
        return env()
    if args.command == "junit":
        return junit(args.path)
    if args.command == "pytest-log":
        return pytest_log(args.path)
    if args.command == "train":
        return train(args.name, args.path)
    if args.command == "example":
        return example(args.name, args.path, args.world, args.fleet, args.min_accuracy)
    print(expected_fleet(args.processes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
