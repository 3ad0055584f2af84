from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from slidejob.errors import ModelError, UnsafeWeights
from slidejob.model import (
    PICKLE_SUFFIXES,
    ModelCard,
    UNet,
    load_model,
    read_weights,
    resolve_model_paths,
    write_weights,
)
from slidejob.model.runtime import build_module


def test_round_trip_gives_identical_outputs(saved_model) -> None:
    card_path, weights_path, unet = saved_model
    loaded = load_model(card_path, weights_path)
    x = torch.randn(2, 3, 40, 48)
    card = ModelCard.load(card_path)
    state_dict, _ = read_weights(weights_path, expected_sha256=card.weights_sha256)
    rebuilt = build_module(card, state_dict)
    with torch.no_grad():
        # The weights round-trip bit for bit...
        torch.testing.assert_close(rebuilt(x), unet(x), rtol=0, atol=0)
        # ...and the loaded model folds BatchNorm into its convolutions: equal up to float rounding.
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.module.modules())
        torch.testing.assert_close(loaded.module(x), unet(x), rtol=1e-5, atol=1e-5)
    assert loaded.weights_sha256 == loaded.card.weights_sha256
    assert not loaded.module.training


def test_either_path_finds_the_other(saved_model) -> None:
    card_path, weights_path, _ = saved_model
    assert load_model(card_path).weights_path == weights_path
    assert load_model(weights_path=weights_path).card_path == card_path
    # A card passed where weights are expected (evaluate's --weights accepts both).
    assert resolve_model_paths(None, card_path) == (card_path, weights_path)


def test_tampered_weights_are_refused_naming_file_and_both_hashes(saved_model) -> None:
    card_path, weights_path, _ = saved_model
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor
    weights_path.write_bytes(bytes(data))
    with pytest.raises(ModelError) as caught:
        load_model(card_path)
    message = str(caught.value)
    assert str(weights_path) in message
    assert "expected sha256" in message and "found" in message
    assert caught.value.__class__ is ModelError


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_files_are_refused_without_being_opened(tmp_path: Path, suffix: str) -> None:
    # The file would run code if unpickled; it must not even be read.
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps({"w": np.zeros(3)}))
    with pytest.raises(UnsafeWeights, match="runs arbitrary code"):
        load_model(weights_path=path)
    with pytest.raises(UnsafeWeights):
        read_weights(path)


def test_pickle_content_under_a_safetensors_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disguised.safetensors"
    torch.save({"w": torch.zeros(3)}, path)  # a zip holding a pickle
    with pytest.raises(UnsafeWeights, match="pickle"):
        read_weights(path)


def test_unsafe_weights_is_a_model_error() -> None:
    assert issubclass(UnsafeWeights, ModelError)


def test_weights_that_do_not_fit_the_card_architecture(saved_model, make_card) -> None:
    card_path = saved_model[0]
    card = ModelCard.load(card_path)
    wider = make_card(UNet(base_channels=8), weights_sha256=card.weights_sha256)
    wider.save(card_path)
    with pytest.raises(ModelError, match="does not fit the architecture"):
        load_model(card_path)


def test_fp16_storage_is_upcast_on_load(tmp_path: Path, saved_model, make_card) -> None:
    from slidejob.model import save_model

    _, _, unet = saved_model
    card = save_model(unet, make_card(unet), tmp_path / "half.safetensors", float_dtype=torch.float16)
    assert card.weights_dtype == "float16"
    loaded = load_model(tmp_path / "half.json")
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), unet(x), rtol=0.02, atol=0.02)


def test_write_weights_is_atomic_and_returns_the_file_hash(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "w.safetensors"
    sha = write_weights({"a": torch.arange(4.0)}, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    with pytest.raises(ModelError, match="safetensors"):
        write_weights({"a": torch.zeros(1)}, tmp_path / "w.pt")


def test_missing_weights_file(saved_model) -> None:
    card_path, weights_path, _ = saved_model
    weights_path.unlink()
    with pytest.raises(ModelError, match="not found"):
        load_model(card_path)


def test_written_weights_follow_the_umask_not_owner_only(tmp_path: Path) -> None:
    # mkstemp-style 0600 files would be unreadable to the rest of a cluster group.
    import os
    import stat

    previous = os.umask(0o022)
    try:
        write_weights({"a": torch.zeros(1)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
