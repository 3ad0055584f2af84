"""Labelled tiles on disk: find image/mask pairs, split them by group, load them.

Two layouts work without flags:

- ``DATA/image/*.png`` + ``DATA/label/*.png`` (one class), or
- ``DATA/CLASS/image/*`` + ``DATA/CLASS/label/*`` for several classes, as
  EBHI-Seg ships (``Adenocarcinoma/``, ``Normal/``, …).

``images``/``img`` and ``labels``/``mask``/``masks`` are accepted as folder
names too.  An image pairs with the mask of the same file stem.  Masks are
8-bit greyscale (or 1-bit); a pixel at or above ``mask_threshold`` is cancer.
A class declared *negative* counts as all background whatever its masks mark
(EBHI-Seg's ``Normal`` masks outline normal glands, not tumour).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from slidejob.errors import DataError

__all__ = [
    "DEFAULT_GROUP_REGEX",
    "IMAGE_SUFFIXES",
    "LabelledTiles",
    "Sample",
    "discover_samples",
    "fingerprint",
    "group_of",
    "load_tiles",
    "split_by_group",
]

logger = logging.getLogger(__name__)

#: The patient/slide prefix of EBHI-Seg names: ``GT2012324-1-400-005.png`` → ``GT2012324-1-400``
#: (some names carry letters after ``GT``: ``GTDC2100796-1-400``, ``GTxc2012827-1-400``).
DEFAULT_GROUP_REGEX = r"^(GT[A-Za-z]*\d+-\d+-\d+)"

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
_IMAGE_DIRS = ("image", "images", "img")
_MASK_DIRS = ("label", "labels", "mask", "masks")


@dataclass(frozen=True)
class Sample:
    """One labelled tile on disk.

    Attributes
    ----------
    image_path
        RGB image file.
    mask_path
        Mask file, or ``None`` for tiles of a negative class that have none.
    class_name
        Class folder name (``""`` for the one-class layout).
    group
        Group key (patient/slide) from the file name; the split never separates a group.
    negative
        The class is all-negative: the mask is ignored and the truth is all background.
    """

    image_path: Path
    mask_path: Path | None
    class_name: str
    group: str
    negative: bool


def _find_dir(parent: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    return None


def group_of(file_name: str, group_regex: str | re.Pattern[str]) -> str | None:
    """The group key of ``file_name``: the regex's first group (or whole match), ``None`` without a match.

    >>> group_of("GT2012324-1-400-005.png", DEFAULT_GROUP_REGEX)
    'GT2012324-1-400'
    >>> group_of("GTDC2100796-1-400-002.png", DEFAULT_GROUP_REGEX)
    'GTDC2100796-1-400'
    """
    match = re.search(group_regex, file_name)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


def _class_dirs(root: Path) -> list[tuple[str, Path]]:
    if _find_dir(root, _IMAGE_DIRS) is not None:
        return [("", root)]
    found = sorted(
        (child.name, child) for child in root.iterdir() if child.is_dir() and _find_dir(child, _IMAGE_DIRS)
    )
    if not found:
        raise DataError(
            f"no labelled tiles under {root}: expected {root}/image/ + {root}/label/, or class folders "
            f"{root}/CLASS/image/ + {root}/CLASS/label/ (image names: {', '.join(_IMAGE_DIRS)}; "
            f"mask names: {', '.join(_MASK_DIRS)})"
        )
    return found


def discover_samples(
    root: Path,
    *,
    negative_classes: Iterable[str] = (),
    group_regex: str = DEFAULT_GROUP_REGEX,
    require_negative_classes: bool = True,
) -> list[Sample]:
    """Every image/mask pair under ``root``, sorted by class then file name.

    Parameters
    ----------
    root
        Data folder in one of the layouts of this module's docstring.
    negative_classes
        Class folder names whose tiles are all background (their masks are ignored).
    group_regex
        Regex applied to the image file name; its first group is the group key.
    require_negative_classes
        A named negative class that is not there is an error (catches typos);
        ``False`` when the names are defaults taken from a model card and the
        folder may hold only some of the classes.

    Returns
    -------
    list of Sample

    Raises
    ------
    DataError
        Missing folder, a named negative class that does not exist, an image
        without a mask (outside negative classes), or file names the group
        regex does not match.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise DataError(f"group regex {group_regex!r} does not compile: {exc}") from exc
    negative = set(negative_classes)
    classes = _class_dirs(root)
    unknown = negative - {name for name, _ in classes}
    if unknown and require_negative_classes:
        raise DataError(
            f"negative class(es) {sorted(unknown)} not found under {root}; class folders there: "
            f"{[name for name, _ in classes]}"
        )
    samples: list[Sample] = []
    unmatched: list[str] = []
    for class_name, class_dir in classes:
        image_dir = _find_dir(class_dir, _IMAGE_DIRS)
        mask_dir = _find_dir(class_dir, _MASK_DIRS)
        assert image_dir is not None
        is_negative = class_name in negative
        if mask_dir is None and not is_negative:
            raise DataError(
                f"{class_dir} has {image_dir.name}/ but no mask folder ({'/, '.join(_MASK_DIRS)}/); "
                "add the masks or declare the class negative"
            )
        masks = {}
        if mask_dir is not None:
            masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        for image_path in sorted(image_dir.iterdir()):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            mask_path = masks.get(image_path.stem)
            if mask_path is None and not is_negative:
                raise DataError(
                    f"image {image_path} has no mask with the same name in {mask_dir}; "
                    "every image of a non-negative class needs one"
                )
            group = group_of(image_path.name, pattern)
            if group is None:
                unmatched.append(image_path.name)
                continue
            samples.append(Sample(image_path, mask_path, class_name, group, is_negative))
    if unmatched:
        raise DataError(
            f"{len(unmatched)} file name(s) under {root} do not match the group regex {group_regex!r}, "
            f"e.g. {unmatched[:3]}; pass --group-regex with a pattern whose first group is the "
            "patient/slide prefix"
        )
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return samples


def split_by_group(
    samples: Sequence[Sample], *, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split tiles into train and validation by group, never by tile, per class.

    Each group is assigned to the class most of its tiles belong to; within each
    class (in name order), groups are shuffled with ``seed`` and moved to
    validation until it holds at least ``val_fraction`` of that class's tiles.
    Stratifying by class keeps a small negative class represented in
    validation.  A class with a single group stays in training.

    Returns
    -------
    tuple
        ``(train, validation)`` samples, each in the input order.

    Raises
    ------
    DataError
        ``val_fraction`` outside (0, 1), or no group left for training or validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    tiles_per_group: Counter[str] = Counter(s.group for s in samples)
    class_votes: dict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        class_votes[s.group][s.class_name] += 1
    # Majority class; ties go to the first class name, so the result does not depend on dict order.
    home = {g: min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, votes in class_votes.items()}
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for class_name in sorted(set(home.values())):
        groups = sorted(g for g, c in home.items() if c == class_name)
        if len(groups) < 2:
            continue
        target = val_fraction * sum(tiles_per_group[g] for g in groups)
        taken = 0
        for index in rng.permutation(len(groups)):
            if taken >= target or len(val_groups & set(groups)) == len(groups) - 1:
                break
            val_groups.add(groups[index])
            taken += tiles_per_group[groups[index]]
    train = [s for s in samples if s.group not in val_groups]
    val = [s for s in samples if s.group in val_groups]
    if not train or not val:
        raise DataError(
            f"the group split left {len(train)} training and {len(val)} validation tiles from "
            f"{len(tiles_per_group)} group(s); a group split needs at least two groups per class "
            "(check --group-regex)"
        )
    return train, val


@dataclass
class LabelledTiles:
    """Tiles loaded into memory.

    Attributes
    ----------
    images
        uint8 RGB arrays (H, W, 3), one per sample.
    masks
        bool arrays (H, W): cancer truth after thresholding (all False for negative classes).
    samples
        Where each tile came from.
    """

    images: list[npt.NDArray[np.uint8]]
    masks: list[npt.NDArray[np.bool_]]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def positive_pixels(self) -> int:
        """Cancer pixels over all tiles."""
        return int(sum(np.count_nonzero(m) for m in self.masks))

    def total_pixels(self) -> int:
        """Pixels over all tiles."""
        return int(sum(m.size for m in self.masks))


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _read_mask(path: Path, threshold: int) -> npt.NDArray[np.bool_]:
    try:
        with Image.open(path) as image:
            if image.mode == "1":
                return np.asarray(image, dtype=bool)
            if image.mode not in ("L", "P", "RGB", "RGBA", "LA"):
                raise DataError(
                    f"mask {path} has mode {image.mode}; expected an 8-bit greyscale (or 1-bit) image"
                )
            return np.asarray(image.convert("L")) >= threshold
    except OSError as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc


def load_tiles(samples: Sequence[Sample], *, mask_threshold: int) -> LabelledTiles:
    """Read every image and mask of ``samples`` into memory.

    Raises
    ------
    DataError
        Unreadable file, or a mask whose size differs from its image.
    """
    images, masks = [], []
    for sample in samples:
        image = _read_rgb(sample.image_path)
        mask: npt.NDArray[np.bool_]
        if sample.negative:
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            assert sample.mask_path is not None
            mask = _read_mask(sample.mask_path, mask_threshold)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"mask {sample.mask_path} is {mask.shape[1]}×{mask.shape[0]} px but its image "
                    f"{sample.image_path} is {image.shape[1]}×{image.shape[0]} px"
                )
        images.append(image)
        masks.append(mask)
    return LabelledTiles(images=images, masks=masks, samples=list(samples))


def fingerprint(samples: Sequence[Sample], root: Path) -> str:
    """sha256 over the relative paths and contents of every file of ``samples``.

    Recorded in the model card, so a card says exactly which files it was trained on.
    """
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: str(s.image_path)):
        for path in (sample.image_path, sample.mask_path):
            if path is None:
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
