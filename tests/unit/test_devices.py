"""`--device` parsing for serving and offline inference, and running a batch on a device."""

from __future__ import annotations

import pytest
import torch

from idla.errors import ConfigError
from idla.serve.devices import parse_device, parse_devices, resolve_devices, run_on

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("spec", "workers", "gpus", "expected"), [
    ("cpu", 3, 0, ["cpu", "cpu", "cpu"]),
    (" CPU ", 1, 0, ["cpu"]),
    ("cuda", 2, 1, ["cuda:0", "cuda:0"]),
    ("cuda:1", 2, 2, ["cuda:1", "cuda:1"]),
    ("cuda:0,cpu,cpu", 3, 1, ["cuda:0", "cpu", "cpu"]),
    ("cpu, cuda:1", 2, 2, ["cpu", "cuda:1"]),
    ("Cuda:01", 1, 2, ["cuda:1"]),
    ("auto", 3, 0, ["cpu", "cpu", "cpu"]),
    ("auto", 3, 2, ["cuda:0", "cuda:1", "cpu"]),
    ("auto", 2, 4, ["cuda:0", "cuda:1"]),
    (["cpu", "cuda:0"], 2, 1, ["cpu", "cuda:0"]),
])
def test_a_device_value_gives_one_device_per_worker(spec: str, workers: int, gpus: int,
                                                    expected: list[str]) -> None:
    assert parse_devices(spec, workers, gpus) == expected


@pytest.mark.parametrize(("spec", "workers", "gpus", "message"), [
    ("cuda:0", 1, 0, "--device cuda:0: CUDA is not available on this machine"),
    ("cuda", 2, 0, "--device cuda: CUDA is not available on this machine"),
    ("cpu,cuda:0", 2, 0, "--device cuda:0: CUDA is not available on this machine"),
    ("cuda:3", 1, 1, "--device cuda:3: this machine has 1 CUDA device (cuda:0)"),
    ("cuda:2", 1, 2, "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cpu,cpu", 3, 0, "--device lists 2 devices for 3 workers"),
    ("cpu,cpu,cpu", 2, 0, "--device lists 3 devices for 2 workers"),
    ("tpu", 1, 0, "--device 'tpu' is not a device: use cpu, cuda, cuda:N, auto"),
    ("cuda:", 1, 1, "'cuda:' is not a device"),
    ("cuda:-1", 1, 1, "'cuda:-1' is not a device"),
    ("cuda:0x1", 1, 1, "'cuda:0x1' is not a device"),
    ("", 1, 0, "'' is not a device"),
    ("cpu,,cpu", 3, 0, "'' is not a device"),
    ("auto,cpu", 2, 1, "auto stands alone"),
    ("cpu", 0, 0, "--workers must be at least 1"),
])
def test_a_bad_device_value_is_a_config_error_naming_it(spec: str, workers: int, gpus: int,
                                                        message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_devices(spec, workers, gpus)

    assert message in str(raised.value)


def test_parse_device_returns_the_canonical_name() -> None:
    assert [parse_device(text, 2) for text in ("cpu", "cuda", "CUDA:1 ")] == [
        "cpu", "cuda:0", "cuda:1"]


def test_resolve_devices_checks_against_this_machine() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0

    assert resolve_devices("cpu,cpu", 2) == ["cpu", "cpu"]
    assert resolve_devices("auto", gpus + 1)[-1] == "cpu"
    with pytest.raises(ConfigError, match=f"cuda:{gpus}"):
        resolve_devices(f"cuda:{gpus}", 1)


def test_run_on_the_cpu_is_the_plain_forward_pass() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    inputs = torch.rand(4, 5)

    with torch.no_grad():
        assert torch.equal(run_on(model, inputs, "cpu"), model(inputs))


@CUDA
def test_run_on_cuda_returns_cpu_outputs_close_to_the_cpu_ones() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    inputs = torch.rand(32, 64)
    with torch.no_grad():
        expected = model(inputs)
        outputs = run_on(model.to("cuda:0"), inputs, "cuda:0")

    assert outputs.device.type == "cpu"
    torch.testing.assert_close(outputs, expected, rtol=1e-3, atol=1e-3)
