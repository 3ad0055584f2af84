from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(scope="session")
def real_slides() -> Path:
    if not SLIDES.is_dir():
        pytest.skip(f"real slides not found at {SLIDES} (the project's ../shared/data is absent)")
    return SLIDES
