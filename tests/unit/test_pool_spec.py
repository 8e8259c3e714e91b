"""Job specs from TOML: good specs parse, each bad one is one line naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from idla.errors import ConfigError
from idla.pool.model import JobKind
from idla.pool.spec import MAX_SPEC_BYTES, load_spec, parse_spec, spec_from_mapping

TRAIN = """
name = "finetune"
kind = "train"
priority = 4
min_workers = 1
max_workers = 3
deadline_s = 600
[train]
script = "train.py"
args = ["--epochs", "2"]
env = { SEED = "1" }
samples = 4000
"""


def test_a_train_spec_resolves_its_script_from_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(TRAIN)

    spec = load_spec(tmp_path / "job.toml")

    assert spec.kind is JobKind.TRAIN and spec.priority == 4.0
    assert spec.script == str((tmp_path / "train.py").resolve())
    assert spec.args == ("--epochs", "2") and dict(spec.env) == {"SEED": "1"}
    assert spec.resizable and spec.samples == 4000
    view = spec.view("job-1", arrival_s=100.0)
    assert (view.min_workers, view.max_workers, view.deadline_s) == (1, 3, 700.0)
    assert view.remaining_samples == 4000.0 and view.resizable


def test_samples_and_memory_are_not_capped_at_the_worker_limit(tmp_path: Path) -> None:
    text = TRAIN.replace("samples = 4000", "samples = 57480").replace(
        "deadline_s = 600", "deadline_s = 600\nmemory_bytes_per_worker = 2_000_000_000")

    spec = parse_spec(text, "job.toml", tmp_path)

    assert spec.samples == 57480 and spec.memory_bytes_per_worker == 2_000_000_000
    with pytest.raises(ConfigError, match=r"train\.samples: must be a whole number in 1\.\."):
        parse_spec(TRAIN.replace("samples = 4000", "samples = 0"), "job.toml", tmp_path)


def test_the_json_form_gives_the_same_spec_back(tmp_path: Path) -> None:
    spec = parse_spec(TRAIN, "job.toml", tmp_path)

    assert spec_from_mapping(spec.as_json(), "stored") == spec


def test_serve_and_infer_specs_are_placed_rigidly(tmp_path: Path) -> None:
    serve = parse_spec('name = "s"\nkind = "serve"\npriority = 2\n[serve]\nmodel = "m"\n'
                       'p99_ms = 50\noffered_requests_per_s = 100\n', "s.toml", tmp_path)
    infer = parse_spec('name = "i"\nkind = "infer"\npriority = 0\n[infer]\nmodel = "m"\n'
                       'input = "x.npy"\noutput = "y.npy"\n', "i.toml", tmp_path)

    assert serve.p99_ms == 50.0 and not serve.view("a", 0.0).resizable
    assert serve.view("a", 0.0).offered_requests_per_s == 100.0
    assert infer.output == str((tmp_path / "y.npy").resolve()) and not infer.resizable


@pytest.mark.parametrize(("change", "message"), [
    (('priority = 4', 'priority = "high"'),
     'job.toml: priority: must be a number >= 0, got "high"'),
    (('priority = 4', 'priority = -1'), "job.toml: priority: must be a number >= 0, got -1"),
    (('priority = 4\n', ''), "job.toml: priority: is required"),
    (('kind = "train"', 'kind = "sweep"'), 'job.toml: kind: must be one of train, serve, infer'),
    (('max_workers = 3', 'max_workers = 0'), "job.toml: max_workers: must be a whole number"),
    (('min_workers = 1', 'min_workers = 5'), "job.toml: max_workers: 3 is below min_workers 5"),
    (('deadline_s = 600', 'deadline_s = 0'), "job.toml: deadline_s: must be a number > 0"),
    (('script = "train.py"', 'script = ""'), "job.toml: train.script: must be a non-empty"),
    (('script = "train.py"\n', ''), "job.toml: train.script: is required"),
    (('args = ["--epochs", "2"]', 'args = "--epochs 2"'),
     "job.toml: train.args: must be a list of strings"),
    (('env = { SEED = "1" }', 'env = { SEED = 1 }'), "job.toml: train.env: must be a table"),
    (('samples = 4000', 'samples = 4000\nresizable = "yes"'),
     'job.toml: train.resizable: must be true or false, got "yes"'),
    (('samples = 4000', 'sample = 4000'), "job.toml: train.sample: unknown field"),
    (('deadline_s = 600', 'deadline = 600'), "job.toml: deadline: unknown field"),
    (('[train]', '[serve]\n[train]'), "job.toml: serve: a [serve] table in a train job"),
    (('name = "finetune"', 'name = "finetune'), "job.toml: not valid TOML"),
])
def test_a_bad_spec_is_one_line_naming_the_field(tmp_path: Path, change: tuple[str, str],
                                                  message: str) -> None:
    old, new = change
    assert old in TRAIN

    with pytest.raises(ConfigError) as caught:
        parse_spec(TRAIN.replace(old, new), "job.toml", tmp_path)

    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_relative_paths_need_a_base_and_big_or_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.script: 'train\.py' is relative"):
        parse_spec(TRAIN, "POST /jobs")
    with pytest.raises(ConfigError, match="larger than"):
        parse_spec(TRAIN + "#" * MAX_SPEC_BYTES, "job.toml", tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "absent.toml")
