"""`make setup`'s choice of torch build (scripts/install-torch.sh), dry-run against stand-ins:
a `python` that reports an installed torch and whether pip's find-links holds a CPU wheel, and
an `nvidia-smi` that works or fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-torch.sh"
VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FAKE_PYTHON = """\
#!/bin/sh
if [ "$1" = "-c" ]; then  # the probe for an installed torch
    [ -n "$FAKE_TORCH" ] || exit 1
    echo "$FAKE_TORCH"
    exit 0
fi
exit "$FAKE_LOCAL_WHEEL_RC"  # pip install --dry-run --no-index: is a local wheel there?
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the Linux branch of the script")


def _choose(tmp_path: Path, torch: str, *, gpu: bool, installed: str = "",
            local_wheel: bool = False) -> subprocess.CompletedProcess[str]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nexit {0 if gpu else 1}\n")
    for tool in (python, smi):
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
           "PY": str(python), "TORCH": torch, "TORCH_VERSION": VERSION, "FAKE_TORCH": installed,
           "FAKE_LOCAL_WHEEL_RC": "0" if local_wheel else "1"}
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=30)


def _pip_commands(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.split(" -m pip install -q ", 1)[1] for line in result.stdout.splitlines()
            if line.startswith("+ ")]


@pytest.mark.parametrize(
    ("torch", "gpu", "installed", "local_wheel", "expected"),
    [
        ("auto", True, "2.13.0+cpu cpu", False, [f"torch=={VERSION},!={VERSION}+cpu"]),
        ("auto", True, "2.5.1 cuda", False, []),
        ("auto", False, "", True,
         [f"--no-index --no-deps torch=={VERSION}+cpu", f"torch=={VERSION}+cpu"]),
        ("auto", False, "", False, [f"torch=={VERSION}+cpu --index-url {CPU_INDEX}"]),
        ("auto", False, "2.13.0+cpu cpu", True, []),
        ("cpu", True, "2.13.0 cuda", False, [f"torch=={VERSION}+cpu --index-url {CPU_INDEX}"]),
        ("cuda", False, "", False, [f"torch=={VERSION},!={VERSION}+cpu"]),
        ("keep", True, "", False, []),
    ],
)
def test_the_build_follows_the_gpu_and_the_override(
    tmp_path: Path, torch: str, gpu: bool, installed: str, local_wheel: bool,
    expected: list[str],
) -> None:
    result = _choose(tmp_path, torch, gpu=gpu, installed=installed, local_wheel=local_wheel)

    assert result.returncode == 0, result.stderr
    assert _pip_commands(result) == expected


def test_an_unknown_choice_is_refused(tmp_path: Path) -> None:
    result = _choose(tmp_path, "rocm", gpu=False)

    assert result.returncode == 2
    assert "TORCH must be auto, cpu, cuda or keep, not 'rocm'" in result.stderr
