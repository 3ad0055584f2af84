from __future__ import annotations

from slidejob.model.bench import measure


def test_measure_reports_every_setting_and_fp32_matches_itself() -> None:
    results = measure(2, side_px=16, batch=1, repeats=1)
    assert [(m.precision, m.channels_last) for m in results] == [
        ("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)
    ]
    assert all(m.megapixels_per_s > 0 for m in results)
    assert results[0].max_abs_diff == 0.0 and results[0].mask_flip_fraction == 0.0
