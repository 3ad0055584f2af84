from __future__ import annotations

import pytest
import torch

from slidejob.model import UNet, UNetConfig, receptive_radius_px


@pytest.mark.parametrize("side_px", [8, 16, 24, 64, 120])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_output_shape_equals_input_shape(side_px: int, norm: str) -> None:
    net = UNet(base_channels=4, norm=norm).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, side_px, side_px))
    assert out.shape == (2, 1, side_px, side_px)


def test_rectangular_input_keeps_its_shape() -> None:
    with torch.no_grad():
        assert UNet(base_channels=4).eval()(torch.zeros(1, 3, 16, 40)).shape == (1, 1, 16, 40)


@pytest.mark.parametrize("shape", [(1, 3, 30, 32), (1, 3, 32, 12), (1, 3, 7, 7), (1, 3, 225, 224)])
def test_side_not_multiple_of_8_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        UNet(base_channels=4)(torch.zeros(shape))


def test_three_down_and_three_up_samplings() -> None:
    net = UNet(base_channels=4)
    assert len(net.encoders) == 4 and len(net.upsamplers) == 3 and len(net.decoders) == 3
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 1  # one pool, used 3 times


def test_width_32_has_the_expected_parameter_count() -> None:
    # The inference side sizes its work from this figure (≈1.9 M at width 32, ≈0.48 M at 16).
    assert sum(p.numel() for p in UNet(base_channels=32).parameters()) == 1_927_009
    assert sum(p.numel() for p in UNet(base_channels=16).parameters()) == 482_737


def test_receptive_radius_matches_gradient_support() -> None:
    # The radius is computed by interval arithmetic; check it against the set of
    # input pixels that actually influence an output pixel, at every phase mod 8.
    torch.manual_seed(0)
    net = UNet(base_channels=4, norm="none").double()
    radius = receptive_radius_px(net)
    side = -(-(2 * radius + 64) // 8) * 8
    found = 0
    for x in range(radius + 8, radius + 16):
        image = torch.randn(1, 3, side, side, dtype=torch.double, requires_grad=True)
        net(image)[0, 0, x, x].backward()
        support = torch.nonzero(image.grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
        found = max(found, x - int(support.min()), int(support.max()) - x)
    assert found == radius == 51


def test_receptive_radius_does_not_depend_on_width_or_input_form() -> None:
    assert receptive_radius_px(UNetConfig(base_channels=32)) == receptive_radius_px({"base_channels": 4,
                                                                                      "norm": "none",
                                                                                      "in_channels": 3})
    assert receptive_radius_px() == 51


def test_tiles_with_a_halo_of_the_receptive_radius_reproduce_the_whole_image() -> None:
    # What the inference halo relies on: eval-mode BatchNorm is per pixel, so a
    # tile cut at an offset that is a multiple of 8 with a halo >= the radius
    # (rounded up to 8) gives exactly the whole-image output in its centre.
    torch.manual_seed(1)
    net = UNet(base_channels=4).eval()
    halo = -(-receptive_radius_px(net) // 8) * 8
    image = torch.randn(1, 3, 64 + 2 * halo + 16, 64 + 2 * halo + 16)
    with torch.no_grad():
        whole = net(image)
        tile = net(image[:, :, 8 : 8 + 64 + 2 * halo, 16 : 16 + 64 + 2 * halo])
    centre = tile[:, :, halo : halo + 64, halo : halo + 64]
    torch.testing.assert_close(centre, whole[:, :, 8 + halo : 8 + halo + 64, 16 + halo : 16 + halo + 64])


@pytest.mark.parametrize("norm", ["batch", "none", "group"])
@pytest.mark.parametrize(("shape", "margin_px"), [((1, 3, 176, 176), 56), ((2, 3, 136, 200), 8),
                                                  ((1, 3, 64, 96), 16), ((1, 3, 72, 48), 0)])
def test_a_margin_gives_the_full_outputs_centre(norm: str, shape: tuple[int, ...], margin_px: int) -> None:
    # Decoders computed on the centre and a ring only (batch and no norm) must give exactly
    # the full forward's centre; group norm computes in full and cuts.  Random weights, so
    # that every ring pixel a cropped decoder got wrong would show.
    torch.manual_seed(2)
    net = UNet(base_channels=4, norm=norm).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    image = torch.randn(shape)
    with torch.no_grad():
        full = net(image)
        centre = net(image, margin_px)
    height, width = shape[-2:]
    assert centre.shape == (shape[0], 1, height - 2 * margin_px, width - 2 * margin_px)
    torch.testing.assert_close(centre, full[:, :, margin_px : height - margin_px, margin_px : width - margin_px],
                               rtol=0, atol=1e-5)


def test_a_margin_while_training_gives_the_full_outputs_centre() -> None:
    # Batch norm normalises by the batch's own statistics while training: nothing may be cropped.
    torch.manual_seed(3)
    net = UNet(base_channels=4).train()
    image = torch.randn(2, 3, 64, 80)
    torch.testing.assert_close(net(image, 16), net(image)[:, :, 16:48, 16:64])


@pytest.mark.parametrize("margin_px", [-8, 4, 12, 32])
def test_a_bad_margin_raises(margin_px: int) -> None:
    with pytest.raises(ValueError, match="margin"):
        UNet(base_channels=4)(torch.zeros(1, 3, 64, 64), margin_px)


@pytest.mark.parametrize("bad", [{"base_channels": 0}, {"norm": "layer"}, {"base_channels": 2.5}])
def test_bad_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        UNetConfig(**bad)


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    config = UNetConfig(base_channels=8, norm="group")
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({"base_channels": 8, "norm": "batch", "in_channels": 3, "depth": 4})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 64, 48), (2, 3, 10, 6), (1, 1, 4, 4), (3, 16, 2, 2), (1, 5, 7, 6)])
def test_max_pool_2x2_equals_max_pool2d(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    from slidejob.model.unet import max_pool_2x2

    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")  # a NaN wins its window in both
    for layout in (torch.channels_last, torch.contiguous_format):  # the fast path, and ATen's
        xs = x.contiguous(memory_format=layout)
        got = max_pool_2x2(xs)
        want = torch.max_pool2d(xs, 2)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        assert got.is_contiguous(memory_format=layout)


def test_max_pool_2x2_keeps_max_pool2d_gradients_for_training() -> None:
    from slidejob.model.unet import max_pool_2x2

    x = torch.zeros(1, 2, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()  # all ties
    max_pool_2x2(x).sum().backward()
    y = x.detach().clone().requires_grad_()
    torch.max_pool2d(y, 2).sum().backward()
    assert x.grad is not None and y.grad is not None and torch.equal(x.grad, y.grad)
