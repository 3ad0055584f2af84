from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The test models are tiny: one thread is as fast, and it keeps the tests from
    # crawling when another process holds the machine's cores (OpenMP threads
    # spin-wait and oversubscription slows a run 10-20×).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_slides() -> Path:
    if not SLIDES.is_dir():
        pytest.skip(f"real slides not found at {SLIDES} (the project's ../shared/data is absent)")
    return SLIDES


def _card(base_channels: int, **overrides: object) -> dict:
    from slidejob import __version__
    from slidejob.model import receptive_radius_px

    card = {
        "schema_version": 1,
        "name": "test-synthetic",
        "description": "Tiny U-Net trained in the test session on generated slides (dark crowded tissue = cancer).",
        "architecture": {
            "name": "unet",
            "config": {"base_channels": base_channels, "norm": "batch", "in_channels": 3},
            "receptive_radius_px": receptive_radius_px({"base_channels": base_channels, "norm": "batch"}),
        },
        "input_normalization": {"space": "rgb_0_1", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "mpp_um": 0.5,
        "magnification": None,
        "threshold": 0.5,
        "training": {
            "dataset": "slidejob.synthetic",
            "data_rules": {"mask_threshold": 128, "negative_classes": [], "group_regex": "(.*)"},
            "split": {"method": "group", "seed": 0, "val_fraction": 0.0},
        },
        "validation_metrics": {},
        "weights_sha256": "0" * 64,
        "weights_dtype": "float32",
        "slidejob_version": __version__,
    }
    card.update(overrides)
    return card


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 U-Net trained for a few seconds to find generated "cancer"; returns its card path."""
    import numpy as np
    import torch

    from slidejob.model import ModelCard, UNet, save_model
    from slidejob.synthetic import render_block

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 1024, 1024)]
    cancer = [(100, 150, 400, 500), (600, 300, 900, 950)]
    image = render_block(0, 0, 1024, 1024, tissue_boxes=boxes, cancer_boxes=cancer, seed=3)
    image[:, 900:] = (242, 240, 244)  # some glass too
    truth = np.zeros((1024, 1024), np.float32)
    for y0, x0, y1, x1 in cancer:
        truth[y0:y1, x0:x1] = 1
    truth[:, 900:] = 0
    net = UNet(base_channels=4, norm="batch")
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    for _ in range(40):
        ys, xs = rng.integers(0, 1024 - 64, 8), rng.integers(0, 1024 - 64, 8)
        x = np.stack([image[y : y + 64, x_ : x_ + 64] for y, x_ in zip(ys, xs)])
        t = np.stack([truth[y : y + 64, x_ : x_ + 64] for y, x_ in zip(ys, xs)])
        xb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / 0.25
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb)[:, 0], torch.from_numpy(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(net, ModelCard.from_dict(_card(4)), out)
    return out.with_suffix(".json")
