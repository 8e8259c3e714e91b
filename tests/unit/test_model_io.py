"""The serving model format: safetensors + model.json, verified on load, never unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from idla.demo import DigitsCNN
from idla.errors import IdlaError
from idla.serve.model_io import (
    ARCHITECTURES,
    META,
    MLP,
    WEIGHTS,
    ModelFormatError,
    load_model,
    read_info,
    save_model,
)


def _saved_cnn(directory: Path, seed: int = 0, version: str | None = None) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN(hidden=32)
    save_model(directory, model, "digits_cnn", {"hidden": 32}, (1, 8, 8), version=version)
    return model


def _edit_meta(directory: Path, **changes: object) -> None:
    meta = json.loads((directory / META).read_text())
    meta.update(changes)
    (directory / META).write_text(json.dumps(meta))


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "unpickled"))  # type: ignore[return-value]


def test_round_trip_gives_the_same_outputs_and_info(tmp_path: Path) -> None:
    model = _saved_cnn(tmp_path)
    x = torch.rand(7, 1, 8, 8)

    loaded, info = load_model(tmp_path)

    assert torch.equal(loaded(x), model.eval()(x))
    assert info.architecture == "digits_cnn" and info.kwargs == {"hidden": 32}
    assert info.input_shape == (1, 8, 8)
    assert info.version == info.sha256[:12]
    assert read_info(tmp_path) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, META])  # no temp files


def test_mlp_round_trip_and_explicit_version(tmp_path: Path) -> None:
    model = MLP(in_features=64, hidden=16, layers=3, classes=4)
    kwargs = {"in_features": 64, "hidden": 16, "layers": 3, "classes": 4}

    info = save_model(tmp_path, model, "mlp", kwargs, (1, 8, 8), version="v2")
    loaded, loaded_info = load_model(tmp_path)

    assert "mlp" in ARCHITECTURES and loaded_info == info and info.version == "v2"
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded(x).shape == (3, 4)


def test_save_refuses_a_model_that_does_not_match_its_architecture(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"do not match|wants"):
        save_model(tmp_path, DigitsCNN(hidden=64), "digits_cnn", {"hidden": 32}, (1, 8, 8))
    with pytest.raises(ModelFormatError, match="input_shape"):
        save_model(tmp_path, MLP(in_features=64), "mlp", {"in_features": 64}, (1, 4, 4))
    assert not (tmp_path / META).exists()


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    _saved_cnn(tmp_path)
    blob = bytearray((tmp_path / WEIGHTS).read_bytes())
    blob[-1] ^= 0xFF  # one weight's last byte: still valid safetensors, other weights
    (tmp_path / WEIGHTS).write_bytes(bytes(blob))

    with pytest.raises(ModelFormatError, match="sha256 does not match"):
        load_model(tmp_path)


def test_weights_replaced_by_another_model_are_refused(tmp_path: Path) -> None:
    _saved_cnn(tmp_path / "a", seed=0)
    _saved_cnn(tmp_path / "b", seed=1)
    (tmp_path / "a" / WEIGHTS).write_bytes((tmp_path / "b" / WEIGHTS).read_bytes())

    with pytest.raises(ModelFormatError, match="sha256"):
        load_model(tmp_path / "a")


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    _saved_cnn(tmp_path)
    _edit_meta(tmp_path, architecture="resnet9000")

    with pytest.raises(ModelFormatError, match="unknown model architecture 'resnet9000'"):
        load_model(tmp_path)


def test_kwargs_that_change_the_shapes_are_refused(tmp_path: Path) -> None:
    _saved_cnn(tmp_path)
    _edit_meta(tmp_path, kwargs={"hidden": 64})

    with pytest.raises(ModelFormatError, match=r"head\.1\.weight"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ('{"format": "idla-model/1"}', "exactly the keys"),
     ("[1, 2]", "exactly the keys")],
)
def test_damaged_model_json_is_refused(tmp_path: Path, text: str, message: str) -> None:
    _saved_cnn(tmp_path)
    (tmp_path / META).write_text(text)

    with pytest.raises(ModelFormatError, match=message):
        load_model(tmp_path)


def test_bad_field_values_are_refused(tmp_path: Path) -> None:
    _saved_cnn(tmp_path)
    _edit_meta(tmp_path, input_shape=[1, -8, 8])

    with pytest.raises(ModelFormatError, match="input_shape"):
        load_model(tmp_path)


def test_truncated_safetensors_gives_a_clear_error(tmp_path: Path) -> None:
    _saved_cnn(tmp_path)
    blob = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(blob[: len(blob) // 2])

    with pytest.raises(ModelFormatError, match="sha256"):
        load_model(tmp_path)  # the hash catches it first ...

    import hashlib

    _edit_meta(tmp_path, sha256=hashlib.sha256(blob[: len(blob) // 2]).hexdigest())
    with pytest.raises(ModelFormatError, match="not a valid safetensors file"):
        load_model(tmp_path)  # ... and the parser when the hash was forged to match


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "weights.pkl", "no_suffix"])
def test_a_pickle_file_passed_as_the_model_is_refused_unopened(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "was-unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Marker(marker), protocol=4))

    with pytest.raises(ModelFormatError, match="pickle") as caught:
        load_model(path)

    assert "never unpickles" in str(caught.value)
    assert isinstance(caught.value, IdlaError)
    assert not marker.exists()


def test_torch_save_archives_are_refused(tmp_path: Path) -> None:
    torch.save(DigitsCNN().state_dict(), tmp_path / "checkpoint")  # zip with a pickle inside

    with pytest.raises(ModelFormatError, match="pickle"):
        load_model(tmp_path / "checkpoint")


def test_a_directory_of_torch_save_files_says_why(tmp_path: Path) -> None:
    torch.save(DigitsCNN().state_dict(), tmp_path / "model.pt")

    with pytest.raises(ModelFormatError, match="pickle"):
        load_model(tmp_path)


def test_a_pickle_renamed_to_safetensors_is_refused_even_with_a_forged_hash(
    tmp_path: Path,
) -> None:
    import hashlib

    _saved_cnn(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-unpickled"
    payload = pickle.dumps(_Marker(marker), protocol=4)
    (tmp_path / WEIGHTS).write_bytes(payload)
    _edit_meta(tmp_path, sha256=hashlib.sha256(payload).hexdigest())

    with pytest.raises(ModelFormatError, match="pickle"):
        load_model(tmp_path)
    assert not marker.exists()


def test_missing_directory_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelFormatError, match=f"no {META}"):
        load_model(tmp_path)
    _saved_cnn(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(ModelFormatError, match=f"no {WEIGHTS}"):
        load_model(tmp_path)
