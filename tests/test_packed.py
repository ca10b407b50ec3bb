"""Prepacked CPU convolutions and linear layers (sumie.models.packed, sumie.models.winograd): the same numbers as the
plain layer within fp32 rounding, packed again whenever the weight or the input shape changes, never used for
autograd or training; Winograd's F(2x2, 3x3) where it fits; "auto" packs only weights in a memory-mapped file and
hands their pages back once the packed copy exists, "on" packs every weight, "off" none."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tiny_unet import random_unet, unet_inputs

import sumie
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.io import load_state_dict
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.models import packed as packed_module
from sumie.models.packed import Conv2d, Linear, packed_bytes, set_weight_packing
from sumie.models.vae import AutoencoderKL
from sumie.models.winograd import BAND_TILES, winograd_conv3x3, winograd_weight
from sumie.pipelines.params import GenerationParams

CL = torch.channels_last


def _conv(cin: int = 16, cout: int = 24, k: int = 3, stride: int = 1, bias: bool = True, seed: int = 0) -> Conv2d:
    torch.manual_seed(seed)
    conv = Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias).eval()
    conv.weight_packing = "on"  # its weight is in ordinary memory: "auto" would not pack it
    return conv


def _plain(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("k,stride,bias", [(3, 1, True), (3, 2, True), (1, 1, True), (3, 1, False)])
def test_packed_equals_channels_last_conv_bitwise(k: int, stride: int, bias: bool) -> None:
    conv = _conv(k=k, stride=stride, bias=bias)
    x = torch.randn(2, 16, 12, 10)
    with torch.inference_mode():
        out = conv(x)
        assert conv._packed is not None  # the packed path ran
        assert torch.equal(out, _plain(conv, x.contiguous(memory_format=CL)))
        torch.testing.assert_close(out, _plain(conv, x), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=CL)


def test_repacked_for_a_new_weight_object_version_and_shape() -> None:
    conv = _conv()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        conv(x)
        first = conv._packed
        conv.weight.add_(1.0)  # in place: the version counter moves
        assert torch.equal(conv(x), _plain(conv, x.contiguous(memory_format=CL)))
        assert conv._packed is not first
        second = conv._packed
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))  # a new object (as a patch installs)
        assert torch.equal(conv(x), _plain(conv, x.contiguous(memory_format=CL)))
        third = conv._packed
        assert third is not second
        y = torch.randn(2, 16, 5, 7)
        assert torch.equal(conv(y), _plain(conv, y.contiguous(memory_format=CL)))
        assert conv._packed is not third and conv._packed.key == y.shape
        conv(y)
        assert conv._packed.key == y.shape  # the same shape and weight: kept


def test_patcher_patch_and_unpatch_repack() -> None:
    """A weight patch (LoRA's way) and its removal are both seen; the unpatched output is the original one."""
    unet = random_unet()
    set_weight_packing(unet, "on")
    x, t, ctx = unet_inputs()
    key = "input_blocks.0.0.weight"
    with torch.inference_mode():
        before = unet(x, t, ctx)
    patcher = ModelPatcher(unet)
    patcher.add_patches({key: torch.randn(unet.state_dict()[key].shape)}, strength=0.5)
    with patcher.patched(), torch.inference_mode():
        patched = unet(x, t, ctx)
    set_weight_packing(unet, "off")
    with patcher.patched(), torch.inference_mode():
        patched_plain = unet(x, t, ctx)
    set_weight_packing(unet, "on")
    with torch.inference_mode():
        after = unet(x, t, ctx)
    assert torch.equal(after, before)
    assert (patched - before).abs().max() > 1e-2
    torch.testing.assert_close(patched, patched_plain, rtol=1e-4, atol=1e-4)


def test_unet_modes_auto_on_off() -> None:
    unet = random_unet()  # weights in ordinary memory
    x, t, ctx = unet_inputs()
    with torch.inference_mode():
        auto = unet(x, t, ctx)
    assert packed_bytes(unet) == 0  # "auto": packing would cost memory here
    set_weight_packing(unet, "on")
    with torch.inference_mode():
        packed = unet(x, t, ctx)
    assert packed_bytes(unet) > 0
    assert set_weight_packing(unet, "off") == sum(isinstance(m, (Conv2d, Linear)) for m in unet.modules())
    assert packed_bytes(unet) == 0
    with torch.inference_mode():
        plain = unet(x, t, ctx)
    assert packed_bytes(unet) == 0
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(auto, plain)
    with pytest.raises(ValueError, match="auto, on, off"):
        set_weight_packing(unet, "yes")  # type: ignore[arg-type]


def test_plain_path_for_autograd_training_and_other_dtypes() -> None:
    conv = _conv()
    x = torch.randn(1, 16, 8, 8)
    out = conv(x)  # grad enabled
    assert out.requires_grad and conv._packed is None
    assert torch.equal(out, _plain(conv, x))
    with torch.no_grad():
        conv(x)
    assert conv._packed is not None
    conv.train()
    assert conv._packed is None  # training drops the copy
    with torch.no_grad():
        conv(x)
    assert conv._packed is None
    conv.eval().double()
    with torch.no_grad():
        assert torch.equal(conv(x.double()), _plain(conv, x.double()))
    assert conv._packed is None


def _file_rss_kib(t: torch.Tensor) -> int:
    """Resident KiB of the /proc/self/smaps mapping that holds ``t``."""
    ptr = t.data_ptr()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and head[0] == "Rss:":
                return int(head[1])
    raise AssertionError("no mapping holds the tensor")


def _mapped(tmp_path: Path, layer: torch.nn.Module, w: torch.Tensor) -> torch.nn.Module:
    """``layer`` with weight ``w`` and a random bias read back from a safetensors file (memory-mapped), all pages
    read."""
    save_file({"weight": w, "bias": torch.randn(w.shape[0])}, str(tmp_path / "layer.safetensors"))
    sd = load_state_dict(tmp_path / "layer.safetensors")
    layer.weight = torch.nn.Parameter(sd["weight"], requires_grad=False)
    layer.bias = torch.nn.Parameter(sd["bias"], requires_grad=False)
    assert torch.equal(layer.weight, w)  # every page read
    assert _file_rss_kib(layer.weight) >= 2 * 1024
    return layer.eval()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_file_pages_handed_back_after_packing(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 weight read from a safetensors file (memory-mapped) leaves memory once packed, and reads the same;
    a new input shape is packed from the packed copy, not from the file."""
    torch.manual_seed(0)
    if kind == "conv":
        w = torch.randn(256, 256, 3, 3)  # 2.25 MiB
        layer, shapes = _mapped(tmp_path, Conv2d(256, 256, 3, padding=1), w), [(1, 256, 8, 8), (2, 256, 6, 8)]
        plain = lambda x: F.conv2d(x, w, layer.bias, padding=1)  # noqa: E731
    else:
        w = torch.randn(768, 768)  # 2.25 MiB
        layer, shapes = _mapped(tmp_path, Linear(768, 768), w), [(2, 77, 768), (5, 768)]
        plain = lambda x: F.linear(x, w, layer.bias)  # noqa: E731
    sources = []  # where each packing read the dense weight from
    pack = type(layer)._pack
    monkeypatch.setattr(type(layer), "_pack", lambda self, dense, x, key: (sources.append(dense.data_ptr()),
                                                                           pack(self, dense, x, key))[1])
    for shape in shapes:
        x = torch.randn(shape)
        with torch.inference_mode():
            out = layer(x)
        assert layer._packed.key != "winograd" and layer._packed.weight is not None
        assert _file_rss_kib(layer.weight) < 512  # the whole pages of the weight went back (and stayed out)
        # (a memory-mapped weight is not 64-byte aligned: the plain call takes another path, so a tolerance;
        # the outputs' scale is ~48 for the conv, ~28 for the linear layer)
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=5e-4)
    assert sources[0] == layer.weight.data_ptr() and sources[1] != sources[0]  # the second from the packed copy
    assert torch.equal(layer.weight, w)  # read again from the file, unchanged


def test_anonymous_weights_stay() -> None:
    conv = _conv(64, 64)
    w = conv.weight.detach().clone()
    with torch.inference_mode():
        conv(torch.randn(1, 64, 8, 8))
    assert torch.equal(conv.weight, w)


def test_engine_and_cli_switch(tmp_path: Path) -> None:
    """Through the engine with a float32 file: packed by default ("auto"), ``set_weight_packing("off")`` and
    ``--weight-packing off`` give plain convolutions, and the two images are within one uint8 level."""
    path = tmp_path / "tiny.safetensors"
    save_file(random_single_file(TINY["sd1"], seed=3), str(path))
    engine = sumie.load(path)
    params = GenerationParams(prompt="a cat", negative_prompt="blurry", steps=3, width=64, height=64, seed=5)
    packed = np.asarray(engine.generate(params).images[0], dtype=np.int16)
    assert packed_bytes(engine.models.unet) > 0 and packed_bytes(engine.models.vae) > 0
    engine.set_weight_packing("off")
    assert packed_bytes(engine.models.unet) == packed_bytes(engine.models.vae) == 0
    plain = np.asarray(engine.generate(params).images[0], dtype=np.int16)
    assert packed_bytes(engine.models.unet) == 0
    assert np.abs(packed - plain).max() <= 1

    common = ["generate", "a cat", "--negative-prompt", "blurry", "--model", str(path), "--steps", "3", "--width",
              "64", "--height", "64", "--seed", "5", "-q"]
    assert main([*common, "-o", str(tmp_path / "packed.png")]) == 0
    assert main([*common, "--weight-packing", "off", "-o", str(tmp_path / "plain.png")]) == 0
    cli_packed = np.asarray(Image.open(tmp_path / "packed.png"), dtype=np.int16)
    cli_plain = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)
    assert np.array_equal(cli_packed, packed) and np.array_equal(cli_plain, plain)


def test_deepcopy_and_pickle_leave_the_packed_copy_behind() -> None:
    conv = _conv()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        want = conv(x)
    assert conv._packed is not None
    for other in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert other._packed is None and other.weight_packing == "on"
        with torch.no_grad():
            assert torch.equal(other(x), want)
        assert other._packed is not None
    assert conv._packed is not None  # the original keeps its own


@pytest.mark.parametrize("b,c,o,h,w,bias", [(3, 8, 12, 16, 20, True), (2, 8, 12, 40, 16, False),
                                            (1, 5, 7, 6, 2 * (BAND_TILES + 2), True), (1, 3, 4, 2, 2, True)])
def test_winograd_is_the_convolution(b: int, c: int, o: int, h: int, w: int, bias: bool) -> None:
    """F(2x2, 3x3) against a float64 convolution (bands that do not divide the rows, rows longer than a band, one
    tile); each image's result is the one it gets alone."""
    torch.manual_seed(0)
    x, wt = torch.randn(b, c, h, w), torch.randn(o, c, 3, 3)
    bb = torch.randn(o) if bias else None
    got = winograd_conv3x3(x, winograd_weight(wt), bb)
    assert got.shape == (b, o, h, w) and got.is_contiguous(memory_format=CL)
    ref = F.conv2d(x.double(), wt.double(), None if bb is None else bb.double(), padding=1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[-1:], winograd_conv3x3(x[-1:], winograd_weight(wt), bb))


def test_conv_takes_winograd_where_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = _conv(16, 24)
    with torch.inference_mode():
        x = torch.randn(2, 16, 16, 16)  # 256 pixels per image, even sides
        torch.testing.assert_close(conv(x), _plain(conv, x), rtol=1e-5, atol=1e-5)
        kernel = conv._packed
        assert kernel.key == "winograd"
        y = torch.randn(1, 16, 20, 18)
        torch.testing.assert_close(conv(y), _plain(conv, y), rtol=1e-5, atol=1e-5)
        assert conv._packed is kernel  # Winograd's kernel does not depend on the input shape
        for shape in [(1, 16, 14, 14), (1, 16, 17, 16)]:  # too few pixels; an odd side
            z = torch.randn(shape)
            torch.testing.assert_close(conv(z), _plain(conv, z), rtol=1e-5, atol=1e-5)
            assert conv._packed.key == z.shape
        strided = _conv(16, 24, stride=2)
        strided(x)
        assert strided._packed.key == x.shape
        monkeypatch.setattr(packed_module, "WINOGRAD_MAX_BYTES", 24 * 16 * 9 * 4 - 1)  # a weight too big
        big = _conv(16, 24)
        big(x)
        assert big._packed.key == x.shape
    assert all(not m.winograd for m in AutoencoderKL(TINY["sd1"].vae).modules() if isinstance(m, Conv2d))


def test_unet_with_winograd_matches_the_plain_unet() -> None:
    unet = random_unet()
    set_weight_packing(unet, "on")
    x, t, ctx = unet_inputs()
    x = torch.randn(x.shape[0], x.shape[1], 16, 16)
    with torch.inference_mode():
        packed = unet(x, t, ctx)
        assert any(m._packed is not None and m._packed.key == "winograd" for m in unet.modules()
                   if isinstance(m, Conv2d))
        set_weight_packing(unet, "off")
        plain = unet(x, t, ctx)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)


def test_linear_packed_repacked_and_plain_for_autograd() -> None:
    torch.manual_seed(0)
    lin = Linear(48, 40).eval()
    lin.weight_packing = "on"
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        out = lin(x)
        first = lin._packed
        assert first.key == 14 and first.weight is not None
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        lin(x)
        assert lin._packed is first  # the same rows and weight: kept
        y = torch.randn(3, 48)
        torch.testing.assert_close(lin(y), F.linear(y, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert lin._packed.key == 3
        lin.weight.add_(1.0)
        torch.testing.assert_close(lin(y), F.linear(y, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert lin._packed.version == lin.weight._version
    grad = lin(x)  # autograd: the plain call
    assert grad.requires_grad and torch.equal(grad, F.linear(x, lin.weight, lin.bias))
    plain = Linear(48, 40).eval()  # "auto" and an ordinary weight: nothing packed
    with torch.no_grad():
        plain(x)
    assert plain._packed is not None and plain._packed.weight is None
