"""`idla infer` end to end, and its clear one-line refusals of bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idla.cli import main
from idla.demo import DigitsCNN
from idla.serve.model_io import load_model, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, DigitsCNN(hidden=32), "digits_cnn", {"hidden": 32}, (1, 8, 8))
    return directory


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _inputs(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def test_infer_scores_a_file_in_order_on_two_workers(model_dir: Path, tmp_path: Path) -> None:
    inputs = _inputs(700)
    source = _npy(tmp_path / "in.npy", inputs)
    target, report = tmp_path / "out.npy", tmp_path / "run.json"

    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "infer", "--model", str(model_dir), "--input",
         str(source), "--output", str(target), "--workers", "2", "--batch-size", "64",
         "--json", str(report)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"},
    )

    assert result.returncode == 0, result.stderr
    outputs = np.load(target, allow_pickle=False)
    model, info = load_model(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    with torch.no_grad():
        expected = np.concatenate([model(torch.from_numpy(inputs[i:i + 64])).numpy()
                                   for i in range(0, len(inputs), 64)])
    torch.set_num_threads(threads)
    assert np.array_equal(outputs, expected)
    summary = json.loads(report.read_text())
    assert summary["samples"] == 700 and sum(summary["samples_per_worker"]) == 700
    assert summary["version"] == info.version
    assert "wrote" in result.stdout and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy", "run.json"]


def _bad_cases(tmp: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    good = str(_npy(tmp / "good.npy", _inputs(10)))
    pickle_model = tmp / "model.pt"
    torch.save(DigitsCNN().state_dict(), pickle_model)
    objects = np.empty(3, dtype=object)
    objects[:] = [{"a": 1}, [2], "three"]
    np.save(tmp / "objects.npy", objects, allow_pickle=True)
    (tmp / "pickled.npy").write_bytes(pickle.dumps({"not": "an array"}))
    np.savez(tmp / "archive.npz", x=_inputs(4))
    np.save(tmp / "strings.npy", np.array(["a", "b"]))
    out = str(tmp / "out.npy")
    base = ["infer", "--model", str(model_dir), "--output", out]
    return {
        "missing model": (["infer", "--model", str(tmp / "none"), "--input", good, "--output",
                           out], "does not exist"),
        "pickle model": (["infer", "--model", str(pickle_model), "--input", good, "--output",
                          out], "never unpickles"),
        "shape": ([*base, "--input", str(_npy(tmp / "flat.npy", _inputs(10).reshape(10, 64)))],
                  "the model wants (N, 1, 8, 8)"),
        "object dtype": ([*base, "--input", str(tmp / "objects.npy")], "pickled"),
        "pickle input": ([*base, "--input", str(tmp / "pickled.npy")], "pickled"),
        "npz": ([*base, "--input", str(tmp / "archive.npz")], ".npz"),
        "strings": ([*base, "--input", str(tmp / "strings.npy")], "numeric"),
        "missing input": ([*base, "--input", str(tmp / "nope.npy")], "does not exist"),
        "workers 0": ([*base, "--input", good, "--workers", "0"], "--workers must be at least 1"),
        "speeds": ([*base, "--input", good, "--workers", "2", "--emulate-speeds", "1"],
                   "1 speeds for 2 workers"),
        "no output dir": (["infer", "--model", str(model_dir), "--input", good, "--output",
                           str(tmp / "no" / "out.npy")], "does not exist"),
    }


CASES = ["missing model", "pickle model", "shape", "object dtype", "pickle input", "npz",
         "strings", "missing input", "workers 0", "speeds", "no output dir"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_2(
    case: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    args, message = _bad_cases(tmp_path, model_dir)[case]

    code = main(args)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("idla: error: "), err
    assert message in lines[0]
    assert not (tmp_path / "out.npy").exists()


def test_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "idla.cli", "infer", "--model", str(tmp_path / "none"),
         "--input", "x.npy", "--output", str(tmp_path / "out.npy")],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_a_failed_run_leaves_the_old_output_untouched(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = _inputs(20)
    inputs[7] = np.inf  # found only once the run has started and the output is reserved
    source = _npy(tmp_path / "in.npy", inputs)
    target = tmp_path / "out.npy"
    target.write_bytes(b"previous results")

    code = main(["infer", "--model", str(model_dir), "--input", str(source), "--output",
                 str(target)])

    assert code == 2 and "NaN or infinite" in capsys.readouterr().err
    assert target.read_bytes() == b"previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy"]  # no temp file
