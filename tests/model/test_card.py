from __future__ import annotations

import json
from pathlib import Path

import pytest

from slidejob.errors import ModelError
from slidejob.model import CARD_SCHEMA_PATH, ModelCard, UNet
from slidejob.model._schema import schema_errors


def test_card_round_trips_through_json(tmp_path: Path, make_card) -> None:
    card = make_card(UNet(base_channels=4))
    card.save(tmp_path / "card.json")
    loaded = ModelCard.load(tmp_path / "card.json")
    assert loaded == card
    assert loaded.source == tmp_path / "card.json"
    assert loaded.unet_config == UNet(base_channels=4).config
    assert loaded.receptive_radius_px == 51
    assert loaded.mask_threshold == 128 and loaded.negative_classes == ("Normal",)


def test_nan_metric_is_written_as_null(tmp_path: Path, make_card) -> None:
    card = make_card(UNet(base_channels=4), validation_metrics={"sensitivity": float("nan"), "dice": 1.0})
    card.save(tmp_path / "card.json")
    assert json.loads((tmp_path / "card.json").read_text())["validation_metrics"]["sensitivity"] is None


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("threshold",), 1.5, "$.threshold: expected <= 1"),
        (("weights_sha256",), "abc", "$.weights_sha256: expected a string matching"),
        (("architecture", "config", "norm"), "layer", "$.architecture.config.norm: expected one of"),
        (("input_normalization", "std"), [0.2, 0.0, 0.1], "$.input_normalization.std[1]: expected > 0"),
        (("mpp_um",), "0.5", "$.mpp_um: expected number or null"),
        (("training", "split", "method"), "tile", "$.training.split.method: expected one of ['group']"),
    ],
)
def test_invalid_card_names_the_bad_field(tmp_path: Path, make_card, path, value, message) -> None:
    data = make_card(UNet(base_channels=4)).to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ModelError) as caught:
        ModelCard.load(tmp_path / "bad.json")
    assert message in str(caught.value) and "bad.json" in str(caught.value)


def test_missing_and_extra_keys_are_reported(tmp_path: Path, make_card) -> None:
    data = make_card(UNet(base_channels=4)).to_dict()
    del data["threshold"]
    data["treshold"] = 0.5
    (tmp_path / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="missing required key 'threshold'(.|\n)*unexpected key 'treshold'"):
        ModelCard.load(tmp_path / "card.json")


def test_card_that_is_not_json_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelCard.load(tmp_path / "card.json")


def test_missing_card_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        ModelCard.load(tmp_path / "nope.json")


def test_invalid_card_is_never_written(tmp_path: Path, make_card) -> None:
    card = make_card(UNet(base_channels=4), threshold=2.0)
    with pytest.raises(ModelError):
        card.save(tmp_path / "card.json")
    assert not (tmp_path / "card.json").exists()


def test_schema_uses_only_keywords_the_validator_implements() -> None:
    # schema_errors raises on an unknown keyword; walking a valid card visits every branch.
    schema = json.loads(CARD_SCHEMA_PATH.read_text())
    assert schema_errors({}, schema) != []


def test_validator_basics() -> None:
    assert schema_errors(True, {"type": "integer"}) == ["$: expected integer, found bool True"]
    assert schema_errors(float("nan"), {"type": "number"})[0].startswith("$: expected number")
    assert schema_errors({"a": [1, 2, 3]}, {"properties": {"a": {"maxItems": 2}}}) == [
        "$.a: expected at most 2 items, found 3"
    ]
    with pytest.raises(ValueError, match="does not implement"):
        schema_errors(1, {"oneOf": []})
