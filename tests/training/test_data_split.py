from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidejob.errors import DataError
from slidejob.training.data import (
    DEFAULT_GROUP_REGEX,
    discover_samples,
    group_of,
    load_tiles,
    split_by_group,
)

EBHI = Path(__file__).resolve().parents[3] / "shared" / "data" / "annotated" / "ebhi-seg"


def test_class_layout_with_a_negative_class(synthetic_tiles: Path) -> None:
    samples = discover_samples(synthetic_tiles, negative_classes=["Normal"])
    assert len(samples) == 40
    assert {s.class_name for s in samples} == {"Normal", "Tumour"}
    assert all(s.negative == (s.class_name == "Normal") for s in samples)
    tiles = load_tiles([s for s in samples if s.negative], mask_threshold=128)
    # Normal masks are white over glands, yet the truth is all background.
    assert tiles.positive_pixels() == 0


def test_mask_threshold_is_applied(synthetic_tiles: Path) -> None:
    tumour = [s for s in discover_samples(synthetic_tiles) if s.class_name == "Tumour"][:1]
    raw = np.asarray(Image.open(tumour[0].mask_path))
    assert set(np.unique(raw)) == {30, 253}
    assert load_tiles(tumour, mask_threshold=128).masks[0].tolist() == (raw >= 128).tolist()
    assert load_tiles(tumour, mask_threshold=20).masks[0].all()


def test_single_class_layout(tmp_path: Path, synthetic_tiles: Path) -> None:
    shutil.copytree(synthetic_tiles / "Tumour", tmp_path / "flat")
    samples = discover_samples(tmp_path / "flat")
    assert len(samples) == 32 and {s.class_name for s in samples} == {""}


def test_image_without_mask_is_an_error(tmp_path: Path, synthetic_tiles: Path) -> None:
    shutil.copytree(synthetic_tiles, tmp_path / "data")
    victim = min((tmp_path / "data" / "Tumour" / "label").iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name}.*no mask"):
        discover_samples(tmp_path / "data")


def test_unknown_negative_class_is_an_error(synthetic_tiles: Path) -> None:
    with pytest.raises(DataError, match=r"\['Norma'\] not found"):
        discover_samples(synthetic_tiles, negative_classes=["Norma"])


def test_names_the_regex_does_not_match_are_an_error(synthetic_tiles: Path) -> None:
    with pytest.raises(DataError, match="do not match the group regex"):
        discover_samples(synthetic_tiles, group_regex=r"^(PATIENT\d+)")


def test_folder_without_tiles_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no labelled tiles"):
        discover_samples(tmp_path)


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("GT2012324-1-400-005.png", "GT2012324-1-400"),
        ("GTDC2100796-1-400-002.png", "GTDC2100796-1-400"),
        ("GTxc2012827-1-400-001.png", "GTxc2012827-1-400"),
        ("slide7.png", None),
    ],
)
def test_default_group_regex(name: str, group: str | None) -> None:
    assert group_of(name, DEFAULT_GROUP_REGEX) == group


def test_split_keeps_groups_whole_and_is_seeded(synthetic_tiles: Path) -> None:
    samples = discover_samples(synthetic_tiles, negative_classes=["Normal"])
    train, val = split_by_group(samples, val_fraction=0.25, seed=3)
    assert not {s.group for s in train} & {s.group for s in val}
    assert len(train) + len(val) == len(samples)
    # Stratified: both classes are in validation, about a quarter of the cancer tiles.
    assert {s.class_name for s in val} == {"Normal", "Tumour"}
    assert sum(s.class_name == "Tumour" for s in val) == 8
    again = split_by_group(samples, val_fraction=0.25, seed=3)
    assert again == (train, val)
    other = split_by_group(samples, val_fraction=0.25, seed=4)
    assert {s.group for s in other[1]} != {s.group for s in val}


def test_split_needs_two_groups(synthetic_tiles: Path) -> None:
    samples = [s for s in discover_samples(synthetic_tiles) if s.group == "GT2000000-1-400"]
    with pytest.raises(DataError, match="at least two groups"):
        split_by_group(samples, val_fraction=0.2, seed=0)


def test_group_shared_by_two_classes_stays_on_one_side(tmp_path: Path, synthetic_tiles: Path) -> None:
    # EBHI-Seg has such a group (GT2100256-2-400 is in Adenocarcinoma and Normal).
    shutil.copytree(synthetic_tiles, tmp_path / "data")
    for folder in ("image", "label"):
        source = tmp_path / "data" / "Tumour" / folder / "GT2000001-1-400-001.png"
        shutil.copy(source, tmp_path / "data" / "Normal" / folder / "GT2000001-1-400-099.png")
    samples = discover_samples(tmp_path / "data", negative_classes=["Normal"])
    for seed in range(5):
        train, val = split_by_group(samples, val_fraction=0.3, seed=seed)
        assert not {s.group for s in train} & {s.group for s in val}


@pytest.mark.skipif(not EBHI.is_dir(), reason=f"EBHI-Seg not found at {EBHI} (../shared/data is absent)")
def test_ebhi_seg_layout_reads_directly() -> None:
    samples = discover_samples(EBHI, negative_classes=["Normal"])
    assert len(samples) == 726
    train, val = split_by_group(samples, val_fraction=0.2, seed=0)
    assert not {s.group for s in train} & {s.group for s in val}
    assert 0.15 < len(val) / len(samples) < 0.25
    assert {s.class_name for s in val} == {"Adenocarcinoma", "Normal"}
