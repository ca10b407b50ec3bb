"""Image and mask operations (A1111 1.10 semantics): expectations written by hand from A1111's formulas or from an
independent straightforward computation in the test; the mask blur also against OpenCV (recorded and live)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sumie.configs import TINY
from sumie.errors import ConfigError, SumieError
from sumie.models.vae import AutoencoderKL
from sumie.pipelines import images as im
from sumie.pipelines import inpaint as ip
from sumie.pipelines import masks as mk
from sumie.pipelines import outpaint as op
from sumie.pipelines import vae_io
from sumie.pipelines.params import InpaintParams


def rand_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random RGB test image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def block_mask(w: int, h: int, box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    """'L' mask, ``value`` inside box (x1, y1, x2, y2), 0 elsewhere."""
    a = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = value
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------------------------------ resize


def test_resize_modes_by_name_and_number() -> None:
    assert [im.resize_mode_index(m) for m in ("just_resize", "crop and resize", "Resize-and-fill", 0, 1, 2)] == [
        0, 1, 2, 0, 1, 2,
    ]
    for bad in ("stretch", 3, -1, True, None):
        with pytest.raises(ConfigError, match="resize mode"):
            im.resize_mode_index(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resize mode"):
        im.resize_image(rand_rgb(8, 8), 8, 8, "zoom")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="target size"):
        im.resize_image(rand_rgb(8, 8), 0, 8)


def test_just_resize_is_lanczos_and_identity_at_same_size() -> None:
    img = rand_rgb(24, 16)
    assert np.array_equal(np.array(im.resize_image(img, 24, 16)), np.array(img))
    out = im.resize_image(img, 48, 32, 0)
    assert out.size == (48, 32)
    assert np.array_equal(np.array(out), np.array(img.resize((48, 32), Image.Resampling.LANCZOS)))


def test_crop_and_resize_takes_the_centre() -> None:
    # 64x32 -> 32x32: src_w = 64 * 32 // 32 = 64, src_h = 32 (no resize), pasted at x = 16 - 32 = -16.
    img = rand_rgb(64, 32)
    out = np.array(im.resize_image(img, 32, 32, "crop_and_resize"))
    assert np.array_equal(out, np.array(img)[:, 16:48])
    # 32x64 -> 32x32: the middle rows.
    tall = rand_rgb(32, 64, 1)
    assert np.array_equal(np.array(im.resize_image(tall, 32, 32, 1)), np.array(tall)[16:48])


def _edge_band(edge: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """PIL bicubic (a = -0.5) of a zero-size box at the border: weights 0.5625 and -0.0625, normalized."""
    return np.clip(np.floor(1.125 * edge.astype(np.float64) - 0.125 * inner + 0.5), 0, 255).astype(np.uint8)


def test_resize_and_fill_stretches_edge_rows() -> None:
    # 32x16 -> 32x32: ratio 1 < 2, src = 32x16 (no resize) pasted at y = 16 - 8 = 8; bands of 8 rows.
    a = np.random.default_rng(2).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    out = np.array(im.resize_image(Image.fromarray(a), 32, 32, "resize_and_fill"))
    assert np.array_equal(out[8:24], a)
    top, bottom = _edge_band(a[0], a[1]), _edge_band(a[-1], a[-2])
    assert all(np.array_equal(out[r], top) for r in range(8))
    assert all(np.array_equal(out[r], bottom) for r in range(24, 32))


def test_resize_and_fill_stretches_edge_columns_of_a_mask() -> None:
    a = np.random.default_rng(3).integers(0, 256, (32, 16), dtype=np.uint8)
    out = im.resize_image(Image.fromarray(a), 32, 32, 2)
    assert out.mode == "L"  # masks stay masks (A1111's RGB canvas holds the same values)
    o = np.array(out)
    assert np.array_equal(o[:, 8:24], a)
    left, right = _edge_band(a[:, 0], a[:, 1]), _edge_band(a[:, -1], a[:, -2])
    assert all(np.array_equal(o[:, c], left) for c in range(8))
    assert all(np.array_equal(o[:, c], right) for c in range(24, 32))


# ------------------------------------------------------------------------------------------------ tensors / uint8


def test_to_tensor_values() -> None:
    vals = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([vals, vals[::-1], np.full(256, 7, np.uint8)], -1)[None])
    x = im.to_tensor(img)
    assert x.shape == (1, 3, 1, 256) and x.dtype == torch.float32
    expect = torch.tensor([2 * (np.float32(v) / np.float32(255)) - 1 for v in range(256)], dtype=torch.float32)
    assert torch.equal(x[0, 0, 0], expect)
    assert torch.equal(x[0, 1, 0], expect.flip(0))
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, 255] == 1
    assert torch.equal(im.to_tensor(img, convention="diffusers"), x)
    assert im.to_tensor(img, torch.float16).dtype == torch.float16


def test_to_image_truncate_vs_round() -> None:
    cases = {  # x: (A1111 truncation, diffusers rounding)
        -3.0: (0, 0),
        -1.0: (0, 0),
        0.0: (127, 128),  # 127.5: truncated / rounded half to even
        1.0: (255, 255),
        2.0: (255, 255),
        2 * 100.6 / 255 - 1: (100, 101),
        2 * 100.4 / 255 - 1: (100, 100),
    }
    x = torch.tensor(list(cases), dtype=torch.float32).view(1, 1, 1, -1).expand(2, 3, 1, -1)
    trunc = im.to_image(x, "truncate")
    rnd = im.to_image(x, "round")
    assert len(trunc) == 2 and trunc[0].mode == "RGB" and trunc[0].size == (len(cases), 1)
    assert np.array(trunc[1])[0, :, 2].tolist() == [t for t, _ in cases.values()]
    assert np.array(rnd[1])[0, :, 0].tolist() == [r for _, r in cases.values()]
    with pytest.raises(ConfigError, match="rounding"):
        im.to_image(x, "floor")  # type: ignore[arg-type]


def test_round_trip() -> None:
    vals = np.arange(256, dtype=np.uint8)
    img = Image.fromarray(np.stack([vals] * 3, -1)[None])
    x = im.to_tensor(img)
    assert np.array_equal(np.array(im.to_image(x, "round")[0]), np.array(img))
    diff = np.array(img).astype(int) - np.array(im.to_image(x, "truncate")[0])
    assert diff.min() >= 0 and diff.max() <= 1  # truncation can lose one level on the way back


# ------------------------------------------------------------------------------------------------------ load / save


def test_load_image_flattens_transparency_onto_white(tmp_path) -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 255
    a[0, 0, 3] = 0  # transparent
    a[0, 1, 3] = 128  # half
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    img = im.load_image(tmp_path / "t.png")
    assert img.mode == "RGB" and img.size == (4, 4)
    px = np.array(img)
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[1, 1].tolist() == [200, 0, 0]
    expect = (200 * 128 / 255 + 255 * 127 / 255, 127, 127)  # 128/255 of red over white
    assert np.abs(px[0, 1].astype(float) - expect).max() <= 1


def test_load_image_applies_exif_rotation(tmp_path) -> None:
    a = np.zeros((2, 4, 3), np.uint8)
    a[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    img = im.load_image(tmp_path / "r.png")
    assert img.size == (2, 4)  # shown rotated 90 degrees clockwise: the top-left pixel is now top-right
    assert np.array(img)[0, 1].tolist() == [255, 255, 255] and np.array(img).sum() == 3 * 255


def test_unreadable_images_name_the_file(tmp_path) -> None:
    with pytest.raises(im.ImageError, match="missing.png"):
        im.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(SumieError, match="junk.png"):
        im.load_image(tmp_path / "junk.png")
    rand_rgb(64, 64).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(im.ImageError, match="cut.png"):
        im.load_image(tmp_path / "cut.png")
    with pytest.raises(im.ImageError, match="directory"):
        im.load_image(tmp_path)
    with pytest.raises(im.ImageError, match="nomask.png"):
        mk.load_mask(tmp_path / "nomask.png", (8, 8))


def test_load_mask_sizes_and_alpha(tmp_path) -> None:
    block_mask(16, 8, (0, 0, 4, 8)).save(tmp_path / "m.png")
    m = mk.load_mask(tmp_path / "m.png", (16, 8))
    assert m.mode == "L" and np.array(m)[:, :4].min() == 255 and np.array(m)[:, 4:].max() == 0
    with pytest.raises(im.ImageError, match=r"16x8 but the image is 32x16.*resize"):
        mk.load_mask(tmp_path / "m.png", (32, 16))
    big = mk.load_mask(tmp_path / "m.png", (32, 16), resize=True)
    assert big.size == (32, 16)
    # A transparent RGBA mask: its alpha, thresholded at > 128 (A1111 create_binary_mask).
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[0, :, 3] = [0, 128, 129, 255]
    assert np.array(mk.load_mask(Image.fromarray(rgba, "RGBA"), (4, 1)))[0].tolist() == [0, 0, 255, 255]
    assert np.array(mk.load_mask(Image.fromarray(rgba, "RGBA"), (4, 1), round_mask=False))[0].tolist() == [
        0, 128, 129, 255,
    ]
    # Fully opaque RGBA: its luminance instead.
    rgba[0, :, 3] = 255
    rgba[0, :, :3] = 200
    assert np.array(mk.load_mask(Image.fromarray(rgba, "RGBA"), (4, 1)))[0].tolist() == [200] * 4


# ----------------------------------------------------------------------------------------------------- mask blur

# cv2.GaussianBlur(a, (2 * int(2.5 * s + 0.5) + 1, 1), s) of the two rows below, recorded with opencv-python-headless
# 4.10.0 and 5.0.0 (identical). Sigma 8 has a 41-tap kernel over 24 pixels: several reflections.
ROW = [(i * 37 + 11) % 256 for i in range(24)]
STEP = [0] * 12 + [255] * 12
CV2_TEXT = {
    ("row", 1): "38 53 85 122 158 181 156 91 66 89 125 161 184 159 94 69 92 128 164 187 162 97 67 69",
    ("row", 2): "68 75 94 116 134 139 131 116 108 112 125 138 142 134 119 111 115 128 141 144 134 113 96 89",
    ("row", 4): "101 101 105 109 113 116 118 120 121 123 125 126 127 126 127 125 125 124 124 123 121 119 117 116",
    ("row", 8): "116 113 114 115 115 116 115 119 118 119 119 121 120 120 123 122 122 122 123 121 121 124 122 123",
    ("step", 1): "0 0 0 0 0 0 0 0 0 1 15 77 178 240 254 255 255 255 255 255 255 255 255 255",
    ("step", 2): "0 0 0 0 0 0 0 2 9 26 57 102 153 198 229 246 253 255 255 255 255 255 255 255",
    ("step", 4): "0 0 1 3 7 12 21 32 48 67 90 115 140 165 188 207 223 234 243 248 252 254 255 255",
    ("step", 8): "36 37 39 44 49 56 64 74 85 96 109 122 133 146 159 170 181 191 199 206 211 216 218 219",
}
CV2 = {key: [int(v) for v in text.split()] for key, text in CV2_TEXT.items()}


def reference_blur_row(row: list[int], sigma: float) -> list[int]:
    """OpenCV's uint8 Gaussian written out plainly: float kernel, error-diffused to 1/256, reflect-101 by
    repeated mirroring, integer sum, rounded half up."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    r = n // 2
    g = [math.exp(-((i - r) ** 2) / (2 * sigma * sigma)) for i in range(n)]
    total = sum(g)
    k = [0] * n
    err = 0.0
    for i in range(r):
        exact = g[i] / total * 256 + err
        k[i] = k[n - 1 - i] = round(exact)
        err = exact - k[i]
    k[r] = 256 - 2 * sum(k[:r])
    length = len(row)

    def mirror(p: int) -> int:
        while not 0 <= p < length:
            p = -p if p < 0 else 2 * (length - 1) - p
        return p

    return [min(255, (sum(k[j] * row[mirror(x + j - r)] for j in range(n)) + 128) >> 8) for x in range(length)]


@pytest.mark.parametrize("name,sigma", sorted(CV2))
def test_blur_matches_recorded_opencv(name: str, sigma: int) -> None:
    row = ROW if name == "row" else STEP
    a = np.array([row], np.uint8)
    assert mk.gaussian_blur_1d(a, sigma, axis=1)[0].tolist() == CV2[name, sigma]
    assert mk.gaussian_blur_1d(a.T.copy(), sigma, axis=0)[:, 0].tolist() == CV2[name, sigma]
    assert reference_blur_row(row, sigma) == CV2[name, sigma]


@pytest.mark.parametrize("sigma", [0.7, 1, 2.5, 3, 4, 6, 13])
def test_blur_matches_plain_reference(sigma: float) -> None:
    rng = np.random.default_rng(int(sigma * 10))
    a = rng.integers(0, 256, (5, 37), dtype=np.uint8)
    a[:, :10] = 0
    a[:, 30:] = 255
    out = mk.gaussian_blur_1d(a, sigma, axis=1)
    for y in range(5):
        assert out[y].tolist() == reference_blur_row(a[y].tolist(), sigma)
    # The 8-bit kernel keeps the blur within a few levels of the exact float Gaussian convolution.
    n = mk.blur_kernel_size(sigma)
    r = n // 2
    g = np.exp(-((np.arange(n) - r) ** 2) / (2 * sigma**2))
    g /= g.sum()
    idx = mk.reflect101(np.arange(37)[:, None] + np.arange(-r, r + 1)[None], 37)
    ideal = (a[:, idx] * g).sum(-1)
    assert np.abs(out - ideal).max() <= 3.0


def test_kernel_properties() -> None:
    for sigma in (1, 2, 4, 8, 16, 64):
        k = mk.gaussian_kernel_fixed(sigma, mk.blur_kernel_size(sigma))
        assert k.sum() == 256 and np.array_equal(k, k[::-1]) and k.min() >= 0
        assert k.max() - k[len(k) // 2] <= 1  # error diffusion: small taps are not monotonic (as in OpenCV)
    assert mk.blur_kernel_size(4) == 21 and mk.blur_kernel_size(1) == 7 and mk.blur_kernel_size(0.1) == 1
    assert mk.reflect101(np.array([-3, -2, -1, 0, 3, 4, 5, 9]), 4).tolist() == [3, 2, 1, 0, 3, 2, 1, 3]
    assert mk.reflect101(np.array([-5, 0, 5]), 1).tolist() == [0, 0, 0]
    with pytest.raises(ConfigError):
        mk.gaussian_kernel_fixed(2, 4)


def test_blur_matches_live_opencv() -> None:
    import cv2  # opencv-python-headless is a dev extra (test oracle only)
    rng = np.random.default_rng(7)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        a = (rng.random((h, w)) > 0.6).astype(np.uint8) * 255 if trial % 2 else rng.integers(0, 256, (h, w), np.uint8)
        s = int(rng.integers(1, 24))
        k = mk.blur_kernel_size(s)
        assert np.array_equal(mk.gaussian_blur_1d(a, s, 1), cv2.GaussianBlur(a, (k, 1), s)), (h, w, s)
        assert np.array_equal(mk.gaussian_blur_1d(a, s, 0), cv2.GaussianBlur(a, (1, k), s)), (h, w, s)


def test_prepare_mask() -> None:
    m = block_mask(40, 30, (10, 5, 25, 20))
    assert np.array_equal(np.array(mk.prepare_mask(m, 0)), np.array(m))
    inv = np.array(mk.prepare_mask(m, 0, invert=True))
    assert np.array_equal(inv, 255 - np.array(m))
    out = np.array(mk.prepare_mask(m, 3, blur_y=2))
    a = np.array(m)
    rows = np.array([reference_blur_row(r.tolist(), 3) for r in a], np.uint8)
    both = np.array([reference_blur_row(c.tolist(), 2) for c in rows.T], np.uint8).T
    assert np.array_equal(out, both)
    only_y = np.array(mk.prepare_mask(m, 0, blur_y=2))
    assert np.array_equal(only_y, np.array([reference_blur_row(c.tolist(), 2) for c in a.T], np.uint8).T)
    with pytest.raises(ConfigError, match="mask blur"):
        mk.prepare_mask(m, -1)


# ---------------------------------------------------------------------------------------------------- only masked


def test_get_crop_region() -> None:
    m = block_mask(64, 64, (10, 20, 20, 30))
    assert mk.get_crop_region(m) == (10, 20, 20, 30)
    assert mk.get_crop_region(m, 5) == (5, 15, 25, 35)
    assert mk.get_crop_region(np.array(m), 100) == (0, 0, 64, 64)
    assert mk.get_crop_region(block_mask(8, 8, (0, 0, 0, 0))) is None
    faint = block_mask(16, 16, (3, 4, 5, 9), value=1)  # any non-zero pixel counts (blurred edges)
    assert mk.get_crop_region(faint, 2) == (1, 2, 7, 11)
    with pytest.raises(ConfigError, match="padding"):
        mk.get_crop_region(m, -1)


@pytest.mark.parametrize(
    "region,proc,image,expected",
    [
        ((10, 20, 20, 30), (64, 32), (64, 64), (5, 20, 25, 30)),  # widen 10 -> 20 around the centre
        ((50, 0, 60, 10), (64, 32), (64, 64), (44, 0, 64, 10)),  # widen, overflows right by 1: shifted left
        ((0, 0, 32, 8), (32, 32), (64, 64), (0, 0, 32, 32)),  # heighten 8 -> 32 from y = -12: shifted down
        ((0, 0, 64, 8), (32, 32), (64, 16), (0, 0, 64, 16)),  # too tall for the image: clipped
        ((0, 0, 10, 3), (64, 48), (64, 64), (0, 0, 10, 7)),  # wanted height 7.5: int(4.5) = 4 rows, from y = -2
        ((0, 20, 10, 24), (64, 48), (64, 64), (0, 19, 10, 26)),  # odd growth 3: 1 above, 2 below
    ],
)
def test_expand_crop_region(region, proc, image, expected) -> None:
    assert mk.expand_crop_region(region, *proc, *image) == expected


def test_paste_back_binary_mask() -> None:
    orig = rand_rgb(32, 32, 1)
    gen = rand_rgb(32, 32, 2)
    m = block_mask(32, 32, (8, 4, 20, 30))
    out = np.array(ip.paste_back(orig, gen, None, m))
    inside = np.array(m) == 255
    assert np.array_equal(out[inside], np.array(gen)[inside])
    assert np.array_equal(out[~inside], np.array(orig)[~inside])


def test_paste_back_soft_mask_blends() -> None:
    orig = Image.new("RGB", (4, 1), (200, 0, 100))
    gen = Image.new("RGB", (4, 1), (0, 200, 50))
    m = Image.fromarray(np.array([[0, 64, 192, 255]], np.uint8))
    out = np.array(ip.paste_back(orig, gen, None, m))[0].astype(float)
    w = np.array([0, 64, 192, 255])[:, None] / 255
    expect = np.array([200, 0, 100]) * (1 - w) + np.array([0, 200, 50]) * w
    assert np.abs(out - expect).max() <= 1.5


def test_paste_back_only_masked_uncrops() -> None:
    orig = rand_rgb(64, 48, 3)
    m = block_mask(64, 48, (20, 10, 30, 20))
    region = (16, 8, 32, 24)  # 16x16 crop, generated at 32x32
    gen = Image.new("RGB", (32, 32), (9, 99, 199))
    out = np.array(ip.paste_back(orig, gen, region, m))
    inside = np.array(m) == 255
    assert (out[inside] == [9, 99, 199]).all()
    assert np.array_equal(out[~inside], np.array(orig)[~inside])
    # Generated at the crop size: pasted pixel for pixel.
    gen2 = rand_rgb(16, 16, 4)
    out2 = np.array(ip.paste_back(orig, gen2, region, Image.new("L", (64, 48), 255)))
    assert np.array_equal(out2[8:24, 16:32], np.array(gen2))


def test_crop_for_processing() -> None:
    img = rand_rgb(64, 64, 5)
    out = ip.crop_for_processing(img, (8, 8, 24, 40), 16, 32)
    assert np.array_equal(np.array(out), np.array(img)[8:40, 8:24])
    out2 = ip.crop_for_processing(img, (0, 0, 16, 16), 32, 32)
    assert np.array_equal(np.array(out2), np.array(img.crop((0, 0, 16, 16)).resize((32, 32), Image.Resampling.LANCZOS)))


# ---------------------------------------------------------------------------------------------------- masked content


def test_fill_keeps_unmasked_and_spreads_colours() -> None:
    a = np.zeros((16, 48, 3), np.uint8)
    a[:, :24] = (250, 10, 10)
    a[:, 24:] = (10, 10, 250)
    m = block_mask(48, 16, (16, 0, 32, 16))
    out = np.array(ip.fill_masked_image(Image.fromarray(a), m))
    keep = np.array(m) == 0
    assert np.array_equal(out[keep], a[keep])
    assert (out[:, 16, 0] > out[:, 16, 2]).all() and (out[:, 31, 2] > out[:, 31, 0]).all()
    assert out[:, 16, 0].min() > 150 and out[:, 31, 2].min() > 150
    flat = Image.new("RGB", (24, 24), (30, 140, 220))
    filled = np.array(ip.fill_masked_image(flat, block_mask(24, 24, (4, 4, 20, 20)))).astype(int)
    assert np.abs(filled - (30, 140, 220)).max() <= 6  # PIL's premultiplied-alpha rounding at low alpha
    with pytest.raises(im.ImageError, match="fill"):
        ip.fill_masked_image(flat, block_mask(8, 8, (0, 0, 2, 2)))


def test_latent_mask_bicubic_then_round() -> None:
    m = block_mask(64, 64, (0, 0, 32, 64))  # left half
    lm = mk.latent_mask(m, 8, 8)
    assert lm.shape == (1, 1, 8, 8) and lm.dtype == torch.float32
    assert lm[0, 0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8
    line = block_mask(64, 64, (20, 0, 21, 64))  # one pixel wide: about 1/8 after downsampling
    assert mk.latent_mask(line, 8, 8).sum() == 0
    soft = mk.latent_mask(line, 8, 8, round_mask=False)
    assert 0 < soft.max() < 0.5
    # The unrounded values are PIL's bicubic of the RGB mask, red channel / 255.
    ref = np.array(line.convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))[..., 0] / np.float32(255)
    assert torch.equal(soft[0, 0], torch.from_numpy(ref.astype(np.float32)))
    assert mk.latent_mask(m, 4, 8)[0, 0].tolist() == [[1.0] * 4 + [0.0] * 4] * 4


def test_apply_latent_fill() -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 6, 6, generator=g)
    noise = torch.randn(2, 4, 6, 6, generator=g)
    m = torch.zeros(1, 1, 6, 6)
    m[..., 1:4, 2:5] = 1
    sel = m.bool().expand_as(lat)
    out = ip.apply_latent_fill(lat, m, "latent_noise", noise)
    assert torch.equal(out[sel], noise[sel]) and torch.equal(out[~sel], lat[~sel])
    out = ip.apply_latent_fill(lat, m, "latent nothing")
    assert (out[sel] == 0).all() and torch.equal(out[~sel], lat[~sel])
    assert ip.apply_latent_fill(lat, m, "fill") is lat and ip.apply_latent_fill(lat, m, 1) is lat
    half = torch.full((1, 1, 6, 6), 0.25)
    assert torch.allclose(ip.apply_latent_fill(lat, half, 2, noise), lat * 0.75 + noise * 0.25)
    with pytest.raises(ConfigError, match="noise"):
        ip.apply_latent_fill(lat, m, "latent_noise")
    with pytest.raises(ConfigError, match="masked content"):
        ip.apply_latent_fill(lat, m, "blur")


# ------------------------------------------------------------------------------------------- inpainting-model inputs


def fake_encoder(x: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x8 average pooling, 3 -> 4 channels."""
    p = F.avg_pool2d(x, 8)
    return torch.cat([p, p.mean(1, keepdim=True)], 1)


def test_inpaint_model_inputs_a1111_and_diffusers() -> None:
    img = im.to_tensor(rand_rgb(32, 16, 6)).expand(2, -1, -1, -1)
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., :, 8:24] = 128 / 255  # rounds to 1
    mask[..., :, 8:10] = 127 / 255  # rounds to 0
    mask[..., 0:8, 16:17] = 0.5  # exactly one half: A1111 round -> 0, diffusers binarize -> 1
    binary = (torch.round(mask) == 1).float()
    lat, mlat = ip.inpaint_model_inputs(img, mask, fake_encoder)
    assert lat.shape == (2, 4, 2, 4) and mlat.shape == (2, 1, 2, 4)
    assert torch.equal(lat, fake_encoder(img * (1 - binary)))
    assert torch.equal(mlat, binary[..., ::8, ::8].expand(2, -1, -1, -1))  # nearest picks pixel 8 * i
    dbin = (mask >= 0.5).float()
    dlat, dmlat = ip.inpaint_model_inputs(img, mask, fake_encoder, "diffusers")
    assert torch.equal(dlat, fake_encoder(img * (1 - dbin)))
    assert torch.equal(dmlat, dbin[..., ::8, ::8].expand(2, -1, -1, -1))
    assert not torch.equal(lat, dlat)  # the 0.5 column
    wlat, _ = ip.inpaint_model_inputs(img, mask, fake_encoder, mask_weight=0.5)
    assert torch.allclose(wlat, fake_encoder(img - 0.5 * img * binary), atol=1e-6)
    with pytest.raises(im.ImageError, match="mask"):
        ip.inpaint_model_inputs(img, mask[..., :8, :], fake_encoder)
    with pytest.raises(ConfigError, match="convention"):
        ip.inpaint_model_inputs(img, mask, fake_encoder, "comfy")  # type: ignore[arg-type]


def test_inpaint_model_inputs_with_tiny_vae() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY["sd1"].vae).eval()
    img = im.to_tensor(rand_rgb(32, 32, 8))
    mask = mk.mask_to_tensor(block_mask(32, 32, (0, 0, 16, 32)))
    with torch.no_grad():
        lat, mlat = ip.inpaint_model_inputs(img, mask, lambda x: vae_io.encode(vae, x))
        expect = vae.scale_latents(vae.encode(img * (1 - mask)).mode())
        assert torch.equal(lat, expect)
        assert mlat[0, 0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        s1, _ = ip.inpaint_model_inputs(img, mask, lambda x: vae_io.encode(vae, x, [g1]))
        s2 = vae.scale_latents(vae.encode(img * (1 - mask)).sample(g2))
        assert torch.equal(s1, s2)
        t_lat, t_mask = ip.txt2img_inpaint_inputs(2, 32, 32, lambda x: vae_io.encode(vae, x))
        one = vae.scale_latents(vae.encode(torch.zeros(1, 3, 32, 32)).mode())  # vae_io encodes image by image
        assert torch.equal(t_lat, torch.cat([one, one]))
        assert t_mask.shape == (2, 1, 4, 4) and (t_mask == 1).all()


# ---------------------------------------------------------------------------------------------------- whole inpaint


def test_prepare_inpaint_whole_image() -> None:
    img = rand_rgb(32, 32, 9)
    mask = block_mask(32, 32, (8, 8, 16, 24))
    res = ip.prepare_inpaint(img, InpaintParams(mask=mask, mask_blur=0, fill="original"), 32, 32)
    assert np.array_equal(np.array(res.image), np.array(img))
    assert np.array_equal(np.array(res.mask), np.array(mask)) and res.latent_mask_source is res.mask
    assert res.paste_to is None and res.crop_region is None
    alpha = np.array(res.overlay)[..., 3]
    assert np.array_equal(alpha, 255 - np.clip(np.array(mask).astype(int) * 2, 0, 255))
    # Blurred: the overlay mask is the blurred mask doubled (clipped), the model mask the blurred one.
    res = ip.prepare_inpaint(img, InpaintParams(mask=mask, mask_blur=2, fill="original"), 32, 32)
    blurred = np.array(mk.prepare_mask(mask, 2))
    assert np.array_equal(np.array(res.mask), blurred)
    assert np.array_equal(np.array(res.overlay)[..., 3], 255 - np.clip(blurred.astype(int) * 2, 0, 255))
    # Resized to the processing size with the resize mode, image and mask alike.
    res = ip.prepare_inpaint(img, InpaintParams(mask=mask, mask_blur=0, fill="original"), 16, 48, "crop_and_resize")
    assert res.image.size == (16, 48) and res.mask.size == (16, 48) and res.overlay.size == (16, 48)
    assert np.array_equal(np.array(res.image), np.array(im.resize_image(img, 16, 48, 1)))


def test_prepare_inpaint_fills() -> None:
    img = rand_rgb(32, 32, 10)
    mask = block_mask(32, 32, (8, 8, 24, 24))
    for fill in ("fill", "latent_noise", "latent_nothing"):  # A1111 fills unless the fill is "original"
        res = ip.prepare_inpaint(img, InpaintParams(mask=mask, mask_blur=1, fill=fill), 32, 32)
        assert np.array_equal(np.array(res.image), np.array(ip.fill_masked_image(img, res.mask)))
    other = block_mask(32, 32, (0, 0, 4, 4))
    res = ip.prepare_inpaint(img, InpaintParams(mask=mask, mask_blur=0, fill="fill"), 32, 32, latent_mask_image=other)
    assert res.latent_mask_source is other and np.array_equal(np.array(res.mask), np.array(mask))
    assert np.array_equal(np.array(res.image), np.array(ip.fill_masked_image(img, other)))


def test_prepare_inpaint_only_masked() -> None:
    img = rand_rgb(64, 64, 11)
    mask = block_mask(64, 64, (40, 8, 48, 16))
    p = InpaintParams(mask=mask, mask_blur=0, fill="original", full_res=True, full_res_padding=4)
    res = ip.prepare_inpaint(img, p, 32, 32)
    assert res.crop_region == (36, 4, 52, 20) and res.paste_to == (36, 4, 16, 16)
    crop = img.crop((36, 4, 52, 20)).resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.array(res.image), np.array(crop))
    assert res.mask.size == (32, 32) and np.array(res.mask)[11:21, 11:21].min() > 200
    assert np.array_equal(np.array(res.mask), np.array(im.resize_image(mask.crop((36, 4, 52, 20)), 32, 32, 2)))
    assert res.overlay.size == (64, 64)
    assert np.array_equal(np.array(res.overlay)[..., 3], 255 - np.array(mask))  # not doubled in this mode
    out = np.array(ip.apply_overlay(Image.new("RGB", (32, 32), (1, 2, 3)), res.overlay, res.paste_to))
    inside = np.array(mask) == 255
    assert (out[inside] == (1, 2, 3)).all() and np.array_equal(out[~inside], np.array(img)[~inside])
    # A blank mask: plain img2img.
    blank = InpaintParams(mask=Image.new("L", (64, 64)), mask_blur=4, full_res=True)
    res = ip.prepare_inpaint(img, blank, 32, 32)
    assert res.mask is None and res.overlay is None and res.paste_to is None
    assert np.array_equal(np.array(res.image), np.array(im.resize_image(img, 32, 32)))


def test_prepare_inpaint_errors() -> None:
    img = rand_rgb(32, 32)
    with pytest.raises(im.ImageError, match=r"16x16 but the image is 32x32"):
        ip.prepare_inpaint(img, InpaintParams(mask=Image.new("L", (16, 16))), 32, 32)
    with pytest.raises(ConfigError, match="masked content"):
        ip.prepare_inpaint(img, InpaintParams(mask=Image.new("L", (32, 32)), fill="smear"), 32, 32)  # type: ignore
    with pytest.raises(ConfigError, match="resize mode"):
        ip.prepare_inpaint(img, InpaintParams(mask=Image.new("L", (32, 32))), 32, 32, "tile")  # type: ignore


# ------------------------------------------------------------------------------------------------------ outpainting


def test_outpaint_padding_rounds_up_like_poor_mans() -> None:
    # Poor man's outpainting, 100x100 and 128 px on every side at 64: 356 -> 384, extra 284 split 142 / 142.
    assert op.outpaint_padding(100, 100, 128, 128, 128, 128, multiple=64) == (142, 142, 142, 142)
    assert op.outpaint_padding(40, 24, 8, 0, 0, 0) == (8, 0, 0, 0)
    assert op.outpaint_padding(30, 30, 5, 5, 0, 0) == (5, 5, 0, 2)  # 30 -> 32 on the unpadded axis: bottom
    assert op.outpaint_padding(30, 32, 1, 3, 0, 0) == (2, 8, 0, 0)  # 34 -> 40: left 1 * 10 // 4, right the rest
    assert op.outpaint_padding(32, 32, 0, 0, 0, 3) == (0, 0, 0, 8)
    with pytest.raises(ConfigError, match="at least one side"):
        op.outpaint_padding(32, 32, 0, 0, 0, 0)
    with pytest.raises(ConfigError, match="left"):
        op.outpaint_padding(32, 32, -8, 0, 0, 0)


def test_outpaint_canvas_and_mask() -> None:
    img = rand_rgb(16, 8, 12)
    canvas, mask = op.outpaint_canvas(img, 8, 8, 0, 0, fill="color", overlap=4, color=(10, 20, 30))
    assert canvas.size == mask.size == (32, 8) and mask.mode == "L"
    c, m = np.array(canvas), np.array(mask)
    assert np.array_equal(c[:, 8:24], np.array(img))
    assert (c[:, :8] == (10, 20, 30)).all() and (c[:, 24:] == (10, 20, 30)).all()
    # White over the new area and 4 px into the image on the left, 3 on the right (PIL's inclusive rectangle).
    assert m[0].tolist() == [255] * 12 + [0] * 9 + [255] * 11
    assert (m == m[0]).all()
    # Top only: rows 0..7 new, overlap 2 into the image, nothing masked at the far (bottom) edge.
    _, mt = op.outpaint_canvas(rand_rgb(16, 16), 0, 0, 8, 0, overlap=2)
    assert np.array(mt)[:, 5].tolist() == [255] * 10 + [0] * 14


def test_outpaint_fills() -> None:
    img = rand_rgb(8, 8, 13)
    a = np.array(img)
    edge, _ = op.outpaint_canvas(img, 8, 0, 0, 8, fill="edge", overlap=2)
    e = np.array(edge)
    assert e.shape == (16, 16, 3) and np.array_equal(e[:8, 8:], a)
    assert np.array_equal(e[:8, :8], np.repeat(a[:, :1], 8, 1))  # left band: first column repeated
    assert np.array_equal(e[8:, 8:], np.repeat(a[-1:], 8, 0))  # bottom band: last row repeated
    assert (e[8:, :8] == a[-1, 0]).all()  # corner: the corner pixel
    n1, _ = op.outpaint_canvas(img, 8, 0, 0, 0, fill="noise", overlap=2, seed=1)
    n2, _ = op.outpaint_canvas(img, 8, 0, 0, 0, fill="noise", overlap=2, seed=1)
    n3, _ = op.outpaint_canvas(img, 8, 0, 0, 0, fill="noise", overlap=2, seed=2)
    assert np.array_equal(np.array(n1), np.array(n2)) and not np.array_equal(np.array(n1), np.array(n3))
    assert np.array_equal(np.array(n1)[:, 8:], a) and np.array(n1)[:, :8].std() > 40
    black, _ = op.outpaint_canvas(img, 0, 8, 0, 0, fill="color", overlap=2)
    assert (np.array(black)[:, 8:] == 0).all()
    with pytest.raises(ConfigError, match="fill"):
        op.outpaint_canvas(img, 8, 0, 0, 0, fill="mirror", overlap=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="overlap"):
        op.outpaint_canvas(img, 8, 8, 0, 0, overlap=4)
    with pytest.raises(ConfigError, match="color"):
        op.outpaint_canvas(img, 8, 0, 0, 0, fill="color", overlap=2, color=(300, 0, 0))


def test_outpaint_latent_mask_for_poor_mans_recipe() -> None:
    canvas, mask = op.outpaint_canvas(rand_rgb(48, 64), 16, 0, 0, 0, fill="color", overlap=8, multiple=64)
    assert canvas.size == (64, 64)
    lm = op.outpaint_mask(canvas.size, 16, 0, 0, 0, 4 // 2)
    assert np.array(lm)[0].tolist() == [255] * 18 + [0] * 46
    assert np.array(mask)[0].tolist() == [255] * 24 + [0] * 40


# ------------------------------------------------------------------------------------------ diffusers as the oracle


def test_diffusers_convention_matches_diffusers() -> None:
    import diffusers  # noqa: F401  (dev extra: test oracle only)
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import StableDiffusionInpaintPipeline

    img = rand_rgb(32, 16, 14)
    proc = VaeImageProcessor(vae_scale_factor=8)
    assert torch.equal(im.to_tensor(img, convention="diffusers"), proc.preprocess(img))
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        x = (torch.rand(2, 3, 8, 16, generator=g) * 2.4 - 1.2).to(dtype)
        ours = [np.array(p) for p in im.to_image(x, "round")]
        theirs = [np.array(p) for p in proc.postprocess(x, output_type="pil")]
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))

    # Inpainting-model inputs: diffusers' mask processor and prepare_mask_latents with the same stand-in encoder.
    a = np.zeros((16, 32), np.uint8)
    a[:, 8:24] = 200
    a[:, 12:14] = 100
    mask_img = Image.fromarray(a)
    mask_proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask_cond = mask_proc.preprocess(mask_img, height=16, width=32)
    init = proc.preprocess(img, height=16, width=32)
    methods = {"vae_scale_factor": 8, "_encode_vae_image": lambda self, image, generator: fake_encoder(image)}
    fake_pipe = type("FakePipe", (), methods)()
    d_mask, d_lat = StableDiffusionInpaintPipeline.prepare_mask_latents(
        fake_pipe, mask_cond, init * (mask_cond < 0.5), 2, 16, 32, torch.float32, "cpu", None, False
    )
    batch = init.expand(2, -1, -1, -1)
    lat, mlat = ip.inpaint_model_inputs(batch, mk.mask_to_tensor(mask_img), fake_encoder, "diffusers")
    assert torch.equal(lat, d_lat) and torch.equal(mlat, d_mask)
