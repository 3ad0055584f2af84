"""Inference tasks (slidejob.infer) on their own, without a cluster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slidejob import infer, maskstore
from slidejob.pipeline import tile_slide
from slidejob.synthetic import write_slide

FORWARD_S = 0.05


class _SlowZeros:
    """A model that takes FORWARD_S a forward and calls nothing: the task's clock must see exactly that."""

    device = torch.device("cpu")
    precision = "fp32"
    channels_last = False

    def __init__(self) -> None:
        self.forwards = 0

    def predict_proba(self, batch: np.ndarray, margin_px: int = 0) -> np.ndarray:
        self.forwards += 1
        time.sleep(FORWARD_S)
        n, height, width = batch.shape[:3]
        return np.zeros((n, height - 2 * margin_px, width - 2 * margin_px), np.float32)


def test_a_task_times_its_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = write_slide(tmp_path / "s.tif", 1024, 1024, tissue_boxes=[(0, 0, 1024, 1024)], compression="zlib")
    tiles = tile_slide(slide.path, tmp_path / "tiles.zarr").store
    mask = tmp_path / "mask.ome.zarr"
    maskstore.create_mask_store(mask, height_px=1024, width_px=1024, mpp_um=None, attributes={},
                                tissue_fraction=np.ones((2, 2), np.float32))
    model = _SlowZeros()
    monkeypatch.setattr(infer, "get_model", lambda spec: model)
    spec = infer.ModelSpec(card_path="unused", weights_path="unused", weights_sha256="0" * 64)
    t0 = time.perf_counter()
    result = infer.infer_blocks(spec, str(tiles), str(mask), None, [[(0, 0, 2, 2)]], halo_px=56, threshold=0.5,
                                batch_size=1, forward_chunks="1x1")
    wall_s = time.perf_counter() - t0
    assert model.forwards == 4 and result.chunks_written == 4
    assert list(result.stage_s) == list(infer.TASK_STAGES)
    # The forwards' time is the forward stage's, not another's; the stages add up to the task.
    assert 4 * FORWARD_S <= result.stage_s["forward"] < 4 * FORWARD_S + 0.1
    assert all(v < FORWARD_S for k, v in result.stage_s.items() if k != "forward" and k != "read")
    assert sum(result.stage_s.values()) <= wall_s < sum(result.stage_s.values()) + 0.05
