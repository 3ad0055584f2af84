from __future__ import annotations

import numpy as np
import pytest
import torch

from slidejob.model import best_precision, load_model, runtime
from slidejob.model.runtime import _cpu_has_amx


def _tiles(n: int = 2, side_px: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side_px, side_px, 3), dtype=np.uint8)


def test_predict_proba_normalizes_like_the_card_says(saved_model) -> None:
    card_path, weights_path, unet = saved_model
    loaded = load_model(card_path, weights_path)
    tiles = _tiles()
    card = loaded.card
    mean = torch.tensor(card.input_normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card.input_normalization["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        expected = torch.sigmoid(unet(x))[:, 0].numpy()
    probabilities = loaded.predict_proba(tiles)
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 48, 48)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.parametrize(("precision", "channels_last", "atol"),
                         [("fp32", True, 1e-5), ("bf16", False, 0.03), ("bf16", True, 0.03)])
def test_precisions_and_layouts_agree_with_fp32(saved_model, precision, channels_last, atol) -> None:
    card_path, _, _ = saved_model
    tiles = _tiles()
    reference = load_model(card_path).predict_proba(tiles)
    fast = load_model(card_path, precision=precision, channels_last=channels_last).predict_proba(tiles)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, atol=atol)


@pytest.mark.parametrize("bad", [np.zeros((2, 48, 48, 3), np.float32), np.zeros((48, 48, 3), np.uint8),
                                 np.zeros((1, 48, 48, 4), np.uint8)])
def test_predict_proba_rejects_wrong_input(saved_model, bad) -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        load_model(saved_model[0]).predict_proba(bad)


def test_predict_proba_rejects_sides_not_multiple_of_8(saved_model) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        load_model(saved_model[0]).predict_proba(_tiles(side_px=50))


def test_unknown_precision_is_refused(saved_model) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        load_model(saved_model[0], precision="int8")


def test_best_precision_on_cpu_is_bf16_with_amx_or_measured_faster() -> None:
    precision, channels_last = best_precision("cpu")
    assert channels_last is True
    fast = _cpu_has_amx() or runtime.cpu_bf16_speedup() >= runtime.CPU_BF16_MIN_SPEEDUP
    assert precision == ("bf16" if fast else "fp32")


def test_best_precision_measures_bf16_where_the_cpu_has_it_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 1.1)  # a Xeon with AVX512-BF16: 0.8-1.16x
    assert best_precision("cpu") == ("fp32", True)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 1.55)  # a Zen 5 EPYC: 1.5-1.6x
    assert best_precision("cpu") == ("bf16", True)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.5)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert best_precision("cpu") == ("bf16", True)  # AMX: bf16 without measuring


def test_cpu_bf16_speedup_is_measured_where_the_cpu_has_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    speedup = runtime.cpu_bf16_speedup()
    has_bf16 = torch.cpu._is_avx512_bf16_supported()
    assert speedup > 0 and (has_bf16 or speedup == 1.0)
    runtime.cpu_bf16_speedup.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        assert runtime.cpu_bf16_speedup() == 1.0  # no bf16 unit: nothing timed
    finally:
        runtime.cpu_bf16_speedup.cache_clear()


@pytest.mark.gpu
def test_best_precision_on_cuda_runs() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    precision, channels_last = best_precision("cuda")
    loaded = load_model(device="cuda", precision=precision, channels_last=channels_last)
    cpu = load_model()
    tiles = _tiles(2, 64)
    np.testing.assert_allclose(loaded.predict_proba(tiles), cpu.predict_proba(tiles), atol=0.03)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_decoder_convolutions_equal_the_concatenation(norm: str, channels_last: bool) -> None:
    from slidejob.model.runtime import fold_batch_norm
    from slidejob.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(base_channels=4, norm=norm)
    for module in net.modules():  # non-trivial BatchNorm statistics, so the fold does something
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    net = fold_batch_norm(net.eval())
    keys = set(net.state_dict())
    x = torch.randn(2, 3, 40, 56)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        concatenated = net.to(memory_format=layout)(x.to(memory_format=layout))
        for decoder in net.decoders:
            decoder.split_first_conv()
        net = net.to(memory_format=layout)
        split = net(x.to(memory_format=layout))
    torch.testing.assert_close(split, concatenated, rtol=1e-5, atol=1e-5)
    assert set(net.state_dict()) == keys  # the split weights are not saved with the model


def test_a_decoder_block_frees_its_inputs_once_read() -> None:
    # In a CPU forward the last decoder's two full-size inputs were ~80 MB of a ~300 MB peak (1136²).
    import weakref

    from slidejob.model.unet import UNet

    net = UNet(base_channels=4, norm="none").eval()
    decoder = net.decoders[-1]
    decoder.split_first_conv()
    skip, up = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    refs = [weakref.ref(skip), weakref.ref(up)]
    alive: list[list[bool]] = []
    # decoder[1] runs right after the first convolution has read both inputs.
    decoder[1].register_forward_pre_hook(lambda module, args: alive.append([r() is not None for r in refs]))
    inputs = [skip, up]
    del skip, up
    with torch.inference_mode():
        decoder(inputs)
    assert inputs == [] and alive == [[False, False]]


def test_loaded_models_run_split_decoders(saved_model) -> None:
    model = load_model(saved_model[0], saved_model[1], channels_last=True)
    assert all(decoder.split for decoder in model.module.decoders)
    assert all(decoder.weight_skip.is_contiguous(memory_format=torch.channels_last)
               for decoder in model.module.decoders)
