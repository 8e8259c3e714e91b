"""CPU throttling through cgroup v1: parsing, validation, and a real throttled process."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from idla.emulate.cgroup import CpuThrottle, cgroups_available, parse_speeds
from idla.errors import ConfigError, EmulationError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,1,0.5,0.25", [1.0, 1.0, 0.5, 0.25]), ("2", [2.0]), (" 1 , 0.5 ", [1.0, 0.5])],
)
def test_parse_speeds_accepts_lists(text: str, expected: list[float]) -> None:
    assert parse_speeds(text) == expected


@pytest.mark.parametrize("text", ["", "1,x", "1,,2", "0", "1,-1", "nan", "1,inf", "1e999"])
def test_parse_speeds_rejects_bad_lists(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--emulate-speeds: .* is not a comma-separated"):
        parse_speeds(text)


def test_parse_speeds_message_names_the_input() -> None:
    with pytest.raises(ConfigError) as info:
        parse_speeds("1,x")

    assert str(info.value) == (
        "--emulate-speeds: '1,x' is not a comma-separated list of positive numbers"
    )


@given(st.text())
def test_parse_speeds_any_text_gives_a_list_or_config_error(text: str) -> None:
    try:
        speeds = parse_speeds(text)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert speeds
        assert all(0 < s < float("inf") for s in speeds)


def test_throttle_rejects_more_cpu_than_the_host_has() -> None:
    too_many = [1.0] * (2 * (os.cpu_count() or 1) + 2)

    with pytest.raises(ConfigError, match=r"--emulate-speeds: .*sum of speeds"):
        CpuThrottle(too_many, base_cores=0.5)


def test_throttle_rejects_quota_below_kernel_minimum() -> None:
    with pytest.raises(ConfigError, match="below the kernel minimum"):
        CpuThrottle([0.1], base_cores=0.5, period_us=10_000)


def test_throttle_rejects_non_positive_speed() -> None:
    with pytest.raises(ConfigError, match="--emulate-speeds"):
        CpuThrottle([1.0, 0.0])


def test_missing_controller_is_an_emulation_error(tmp_path: Path) -> None:
    throttle = CpuThrottle([0.2], root=str(tmp_path))

    assert not cgroups_available(str(tmp_path))
    with pytest.raises(EmulationError, match="run without --emulate-speeds"), throttle:
        pass


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_throttled_busy_loop_gets_its_quota() -> None:
    busy = [sys.executable, "-c", "while True: pass"]

    with CpuThrottle([0.2], base_cores=0.5) as throttle:  # 0.1 CPU
        group = throttle.paths[0]
        child = subprocess.Popen(busy)
        try:
            throttle.attach(0, child.pid)
            process = psutil.Process(child.pid)
            before = process.cpu_times()
            time.sleep(1.0)
            after = process.cpu_times()
        finally:
            child.kill()
            child.wait()
        assert group.is_dir()

    cpu_s = (after.user + after.system) - (before.user + before.system)
    assert cpu_s < 0.5
    assert not group.exists()


@pytest.mark.cgroup
@pytest.mark.skipif(not cgroups_available(), reason="needs a writable cgroup v1 cpu controller")
def test_exit_moves_live_tasks_out_and_removes_groups() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with CpuThrottle([0.5, 0.5]) as throttle:
            throttle.attach(1, child.pid)
            paths = list(throttle.paths)
        throttle.close()  # idempotent

        assert not any(p.exists() for p in paths)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
