"""Control-image preprocessors (``sumie.preprocess``) against the semantics of A1111's ControlNet extension
(Mikubill/sd-webui-controlnet): each test names the extension function it pins. Inputs are drawn shapes; the
expected values come from the definitions (cv2 calls the extension makes, closed-form pixel values), never from
Sumie's own output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from sumie.cli.main import main
from sumie.errors import ConfigError
from sumie.preprocess import KINDS, pixel_perfect_resolution, run
from sumie.preprocess.common import resize_with_pad
from sumie.preprocess.inpaint import control_hint
from sumie.preprocess.openpose import COLORS, LIMBS, hand_color
from sumie.preprocess.shuffle import shuffle_flow


def shapes(w: int = 300, h: int = 190) -> Image.Image:
    """White canvas with a red rectangle, a blue disc and a black diagonal line."""
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([w // 6, h // 4, w // 2, 3 * h // 4], fill=(200, 30, 30))
    d.ellipse([w // 2 + 10, h // 5, w // 2 + 10 + h // 2, h // 5 + h // 2], fill=(20, 40, 210))
    d.line([0, h - 1, w - 1, 0], fill=(0, 0, 0), width=3)
    return im


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ------------------------------------------------------------------------------------------------ common steps


def extension_resize(img: np.ndarray, resolution: int) -> tuple[np.ndarray, int, int]:
    """The steps of ``scripts/utils.py: resize_image_with_pad``, spelled out: short side to ``resolution`` (sizes
    rounded, CUBIC up / AREA down), edge padding to multiples of 64."""
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    ht, wt = int(np.round(h * k)), int(np.round(w * k))
    img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    hp, wp = -ht % 64, -wt % 64
    return np.pad(img, [[0, hp], [0, wp], [0, 0]], mode="edge"), ht, wt


@pytest.mark.parametrize("size,res", [((300, 190), 512), ((900, 700), 512), ((640, 512), 512)])
def test_resize_with_pad_is_the_extensions(size: tuple[int, int], res: int) -> None:
    """``resize_image_with_pad``: padded to multiples of 64 by edge replication, remove_pad gives the scaled size."""
    img = arr(shapes(*size))
    padded, remove_pad = resize_with_pad(img, res)
    want, ht, wt = extension_resize(img, res)
    assert padded.shape[0] % 64 == 0 and padded.shape[1] % 64 == 0
    np.testing.assert_array_equal(padded, want)
    assert remove_pad(padded).shape == (ht, wt, 3) and min(ht, wt) == res
    if padded.shape[1] > wt:  # the padding repeats the last column
        np.testing.assert_array_equal(padded[:, -1], padded[:, wt - 1])


def test_none_and_hwc3_semantics() -> None:
    """``PreprocessorNone`` returns the input; ``HWC3`` repeats grey and composites RGBA over white in float32,
    truncating (``annotator/util.py: HWC3``)."""
    im = shapes()
    np.testing.assert_array_equal(arr(run("none", im)), arr(im))
    grey = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10), "L")
    np.testing.assert_array_equal(arr(run("none", grey)), np.repeat(arr(grey)[:, :, None], 3, axis=2))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 100, 50, 128
    a = np.float32(128) / np.float32(255)
    want = [int(np.float32(c) * a + np.float32(255) * (np.float32(1) - a)) for c in (100, 50, 0)]
    assert arr(run("none", Image.fromarray(rgba, "RGBA")))[0, 0].tolist() == want
    assert want == [177, 152, 126]  # blue: 255 * (1 - 128/255) = 126.99998 in float32, truncated (rounding: 127)


# ------------------------------------------------------------------------------------------------ edges / lines


def test_canny_equals_cv2_canny_after_the_extensions_steps() -> None:
    """``PreprocessorCanny``: ``cv2.Canny(padded, 100, 200)`` on the resized, padded RGB image, pad removed, RGB."""
    im = shapes()
    padded, ht, wt = extension_resize(arr(im), 512)
    want = cv2.Canny(padded, 100, 200)[:ht, :wt]
    got = arr(run("canny", im))
    assert got.shape == (ht, wt, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], want)
    assert 0 < (want == 255).mean() < 0.2 and set(np.unique(want)) == {0, 255}
    other = cv2.Canny(padded, 20, 40)[:ht, :wt]
    assert (other != want).any()  # the default thresholds matter on this image
    np.testing.assert_array_equal(arr(run("canny", im, low=20, high=40))[..., 0], other)
    # transparency is composited over white first (HWC3), then the same steps
    rgba = im.convert("RGBA")
    rgba.putalpha(200)
    flat = arr(run("none", rgba))
    p2, _, _ = extension_resize(flat, 256)
    _, h2, w2 = extension_resize(flat, 256)
    np.testing.assert_array_equal(arr(run("canny", rgba, resolution=256))[..., 0], cv2.Canny(p2, 100, 200)[:h2, :w2])


def test_threshold_cuts_the_smallest_channel() -> None:
    """``processor.threshold``: 255 where min(R, G, B) > threshold (127), else 0."""
    x = np.repeat((np.arange(512) // 2).astype(np.uint8)[None, :], 512, axis=0)  # column value x // 2
    img = np.stack([x, x, x], axis=2)
    img[:8] = (200, 100, 200)  # min 100: below the cut although the mean is above
    out = arr(run("threshold", Image.fromarray(img)))
    assert out.shape == (512, 512, 3)
    col = out[100, :, 0]
    np.testing.assert_array_equal(col, np.where(np.arange(512) // 2 > 127, 255, 0))
    assert (out[:8] == 0).all()
    out50 = arr(run("threshold", Image.fromarray(img), threshold=50))[100, :, 0]
    np.testing.assert_array_equal(out50, np.where(np.arange(512) // 2 > 50, 255, 0))


def test_scribble_xdog_lines_and_the_uint8_wrap() -> None:
    """``PreprocessorScribbleXdog``: white where ``2 * (255 - dog) > 32`` computed in uint8 (it wraps modulo 256).
    A 5-pixel black bar at 512 px has 255 - dog = 137, 159, 158, 159, 137 across it: 2 * 137 wraps to 18 < 32 (black),
    2 * 159 to 62 (white); a 1-pixel line (181) is white, its neighbours (8 -> 16) black."""
    img = np.full((512, 512, 3), 255, np.uint8)
    img[:, 256:261] = 0
    img[:, 100] = 0
    out = arr(run("scribble_xdog", Image.fromarray(img)))[300, :, 0]
    assert out[99] == 0 and out[100] == 255 and out[101] == 0
    assert out[256:261].tolist() == [0, 255, 255, 255, 0]  # without the wrap all five would be white
    assert (out[:95] == 0).all() and (out[110:250] == 0).all() and (out[270:] == 0).all()
    assert arr(run("scribble_xdog", Image.fromarray(img), threshold=17))[300, 256, 0] == 255  # 18 > 17


def test_invert_is_255_minus_the_image_at_its_own_size() -> None:
    """``PreprocessorInvert``: ``255 - HWC3(img)``, no resize."""
    im = shapes(123, 77)
    np.testing.assert_array_equal(arr(run("invert", im)), 255 - arr(im))
    rgba = Image.new("RGBA", (5, 5), (0, 0, 0, 0))  # fully transparent -> white -> black
    assert (arr(run("invert", rgba)) == 0).all()


def test_lineart_standard() -> None:
    """``processor.lineart_standard``: bright on dark lines of a white drawing, 0 on the paper; a blank page gives 0
    (the extension's ``max(16, nan)`` = 16 branch, without a RuntimeWarning)."""
    img = np.full((512, 512, 3), 255, np.uint8)
    img[:, 200:203] = 0
    out = arr(run("lineart_standard", Image.fromarray(img)))[256, :, 0]
    assert out[201] > 100 and (out[:150] == 0).all() and (out[260:] == 0).all()
    assert (arr(run("lineart_standard", Image.new("RGB", (64, 64), "white"))) == 0).all()


def test_softedge_gradient() -> None:
    """Sumie's soft edge: a vertical step edge gives 255 at the step, soft values beside it, 0 on flat areas."""
    img = np.zeros((512, 512, 3), np.uint8)
    img[:, 256:] = 200
    out = arr(run("softedge_gradient", Image.fromarray(img)))[200, :, 0]
    assert out.max() == 255 and out[255:257].max() == 255
    assert 0 < out[253] < 255 and (out[:240] == 0).all() and (out[275:] == 0).all()
    sharp = arr(run("softedge_gradient", Image.fromarray(img), sigma=0))[200, :, 0]
    assert (sharp > 0).sum() < (out > 0).sum()  # the blur widens the edge
    assert (arr(run("softedge_gradient", Image.new("RGB", (80, 64), "grey"))) == 0).all()


# ------------------------------------------------------------------------------------------------ shuffle


def test_shuffle_field_and_remap() -> None:
    """``ContentShuffleDetector`` + ``make_noise_disk``: a smooth field spanning exactly [0, W-1] x [0, H-1] (min-max
    normalised), one per seed; the output samples the image at the field (checked on a coordinate ramp: R = x,
    G = y), x drawn first."""
    flow = shuffle_flow(256, 256, seed=5)
    assert flow.shape == (256, 256, 2) and flow.dtype == np.float32
    for c in range(2):
        assert flow[..., c].min() == 0 and flow[..., c].max() == pytest.approx(255, abs=1e-4)
    assert np.abs(np.diff(flow, axis=0)).max() < 8 and np.abs(np.diff(flow, axis=1)).max() < 8  # smooth
    assert not np.allclose(flow, shuffle_flow(256, 256, seed=6))
    np.testing.assert_array_equal(flow, shuffle_flow(256, 256, seed=5))
    rng = np.random.RandomState(5)  # np.random.seed(5), then the extension's draws: x first, then y
    for c, scale in ((0, 255.0), (1, 255.0)):
        noise = cv2.resize(rng.uniform(0, 1, size=(256 // 256 + 2, 256 // 256 + 2, 1)), (256 + 512, 256 + 512),
                           interpolation=cv2.INTER_CUBIC)[256:512, 256:512]
        noise = (noise - noise.min()) / (noise - noise.min()).max()
        np.testing.assert_allclose(flow[..., c], (noise * scale).astype(np.float32), rtol=1e-6, atol=1e-4)

    yy, xx = np.mgrid[0:256, 0:256]
    ramp = np.stack([xx, yy, np.zeros_like(xx)], axis=2).astype(np.uint8)
    out = arr(run("shuffle", Image.fromarray(ramp), resolution=256, seed=5)).astype(np.float32)
    assert np.abs(out[..., 0] - flow[..., 0]).max() <= 1.0
    assert np.abs(out[..., 1] - flow[..., 1]).max() <= 1.0
    a = arr(run("shuffle", shapes(), seed=9))
    np.testing.assert_array_equal(a, arr(run("shuffle", shapes(), seed=9)))
    assert a.shape == (512, 808, 3) and (a != arr(run("shuffle", shapes(), seed=10))).any()


# ------------------------------------------------------------------------------------------------ tile / colour


def test_tile_resample() -> None:
    """``processor.tile_resample``: unchanged below rate 1.1; rate 2 -> int(H / 2) x int(W / 2) by INTER_AREA, i.e.
    the rounded means of 2x2 blocks."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    np.testing.assert_array_equal(arr(run("tile_resample", Image.fromarray(img))), img)
    np.testing.assert_array_equal(arr(run("tile_resample", Image.fromarray(img), rate=1.05)), img)
    out = arr(run("tile_resample", Image.fromarray(img), rate=2))
    assert out.shape == (45, 60, 3)
    means = img.reshape(45, 2, 60, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out - means).max() <= 0.5 + 1e-9
    assert arr(run("tile_resample", Image.fromarray(img), rate=3.5)).shape == (25, 34, 3)


def test_blur_gaussian() -> None:
    """``PreprocessorBlurGaussian``: resize (pad removed), then ``cv2.GaussianBlur((0, 0), 9.0)``."""
    im = shapes(512, 512)
    got = arr(run("blur_gaussian", im))
    np.testing.assert_array_equal(got, cv2.GaussianBlur(arr(im), (0, 0), 9.0))
    assert got.astype(np.float32).std() < arr(im).astype(np.float32).std()
    small = arr(run("blur_gaussian", shapes(), resolution=128, sigma=2))
    _, ht, wt = extension_resize(arr(shapes()), 128)
    assert small.shape == (ht, wt, 3)


def test_color_grid_is_block_constant_with_the_cell_colours() -> None:
    """``annotator.color.apply_color``: short side to the resolution (INTER_AREA), cubic down to one sample per 64-pixel
    cell, nearest back up. An image of flat 64-pixel cells comes back unchanged; any image gives flat cells."""
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(cells, 64, axis=0), 64, axis=1)  # 512 x 768
    np.testing.assert_array_equal(arr(run("color", Image.fromarray(img))), img)
    out = arr(run("color", shapes(256, 200)))  # enlarged to round(256 / 200 * 512) = 655 x 512: 10 x 8 cells
    assert out.shape == (512, 655, 3)
    h_cells, w_cells = 512 // 64, 655 // 64
    ys = (np.arange(512) * h_cells) // 512  # INTER_NEAREST up: source cell of each row / column
    xs = (np.arange(655) * w_cells) // 655
    for cy in range(h_cells):
        for cx in range(w_cells):
            block = out[ys == cy][:, xs == cx]
            assert (block == block[0, 0]).all()
    assert len({tuple(out[y, x]) for y in range(0, 512, 64) for x in range(0, 640, 64)}) > 3
    stripe = np.zeros((512, 512, 3), np.uint8)
    stripe[:, 30:34] = 255  # 4 white columns at the centre of the first cell column
    got = arr(run("color", Image.fromarray(stripe)))
    assert (got[:, :64] == 255).all()  # the cubic sample at the cell centre (the cell mean would be 16)
    assert (got[:, 64:] == 0).all()


def test_recolor_channels() -> None:
    """``processor.recolor_intensity``: V of HSV = max(R, G, B); ``recolor_luminance``: L of ``COLOR_BGR2LAB`` on
    RGB data (pure red is read as blue: L* 32.3 -> 82; pure blue as red: L* 53.2 -> 136); gamma on [0, 1]."""
    img = np.array([[[10, 200, 50], [255, 0, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    inten = arr(run("recolor_intensity", Image.fromarray(img)))[0, :, 0]
    assert inten.tolist() == [200, 255, 255, 128]
    lum = arr(run("recolor_luminance", Image.fromarray(img)))[0, :, 0]
    assert lum[1] == 82 and lum[2] == 136
    g2 = arr(run("recolor_intensity", Image.fromarray(img), gamma=2.0))[0, :, 0]
    assert g2.tolist() == [int((200 / 255) ** 2 * 255), 255, 255, int((128 / 255) ** 2 * 255)]


# ------------------------------------------------------------------------------------------------ inpaint


def test_inpaint_rgba_and_the_controlnet_hint() -> None:
    """``PreprocessorInpaint`` passes the image with the mask as alpha; ``hook.py``'s inpaint protocol feeds
    ``c * (1 - m) - m`` with ``m = alpha / 255 > 0.5``: -1 in all channels where masked, the colour in [0, 1] else."""
    im = shapes(64, 48)
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle([10, 10, 29, 29], fill=255)
    m = np.array(mask)
    m[0, 0], m[0, 1] = 128, 127  # 128 / 255 > 0.5 is masked, 127 / 255 is not
    out = run("inpaint", im, mask=Image.fromarray(m))
    assert out.mode == "RGBA" and out.size == (64, 48)
    rgba = arr(out)
    np.testing.assert_array_equal(rgba[..., :3], arr(im))
    np.testing.assert_array_equal(rgba[..., 3], m)
    hint = control_hint(rgba)
    assert hint.shape == (48, 64, 3) and hint.dtype == np.float32
    assert (hint[10:30, 10:30] == -1).all() and (hint[0, 0] == -1).all()
    np.testing.assert_allclose(hint[40:, 40:], arr(im)[40:, 40:] / 255.0, atol=1e-7)
    np.testing.assert_allclose(hint[0, 1], arr(im)[0, 1] / 255.0, atol=1e-7)
    with pytest.raises(ConfigError, match="needs a mask"):
        run("inpaint", im)
    with pytest.raises(ConfigError, match="mask is 10x10 but the image is 64x48"):
        run("inpaint", im, mask=Image.new("L", (10, 10)))


# ------------------------------------------------------------------------------------------------ openpose

# a standing figure on a 512 x 768 canvas, in pixels: every limb long, no two limbs crossing near a midpoint
BODY_PX = [(256, 96), (256, 192), (192, 192), (160, 320), (144, 448), (320, 192), (352, 320), (368, 448),
           (224, 448), (224, 576), (224, 704), (288, 448), (288, 576), (288, 704), (240, 64), (272, 64), (208, 80),
           (304, 80)]
W, H = 512, 768


def pose_json(points: list[tuple[float, float]], *, norm: bool, conf: list[float] | None = None, h: int = H,
              **extra: object) -> dict:
    sx, sy = (1 / W, 1 / h) if norm else (1.0, 1.0)
    conf = conf or [1.0] * len(points)
    kp = [v for (x, y), c in zip(points, conf, strict=True) for v in (x * sx, y * sy, c)]
    return {"people": [{"pose_keypoints_2d": kp, **extra}], "canvas_width": W, "canvas_height": h}


def test_openpose_body_colours_at_limb_midpoints_and_joints() -> None:
    """``util.draw_bodypose``: limb k an ellipse in ``int(COLORS[k] * 0.6)`` (the limb sequence of the 18-point COCO
    body), joint k a circle in ``COLORS[k]``; on black."""
    out = arr(run("openpose", None, pose=pose_json(BODY_PX, norm=False)))
    assert out.shape == (H, W, 3)
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        (x1, y1), (x2, y2) = BODY_PX[a - 1], BODY_PX[b - 1]
        mid = out[(y1 + y2) // 2, (x1 + x2) // 2]
        assert mid.tolist() == [int(c * 0.6) for c in color], (a, b)
    for (x, y), color in zip(BODY_PX, COLORS, strict=True):
        assert out[y, x].tolist() == list(color)
    assert (out[760, :] == 0).all() and out[400, 40].tolist() == [0, 0, 0]
    row = out[512, 216:233, 1]  # across the right thigh (x = 224): stickwidth 4 -> 9 pixels wide
    assert row.tolist() == [0] * 4 + [int(255 * 0.6)] * 9 + [0] * 4
    assert COLORS[0] == (255, 0, 0) and COLORS[12] == (0, 0, 255) and len(COLORS) == 18 and len(LIMBS) == 17


def test_openpose_normalised_and_pixel_coordinates_draw_the_same() -> None:
    """``util.is_normalized``: all |x|, |y| <= 1 -> scaled by the canvas; else pixels. (A 1024-pixel canvas keeps
    ``y / H * H`` exact; on 768, ``448 / 768 * 768`` is 447.99999 and ``int`` puts the point a pixel higher, in the
    extension as here.)"""
    a = arr(run("openpose", None, pose=pose_json(BODY_PX, norm=False, h=1024)))
    b = arr(run("openpose", None, pose=pose_json(BODY_PX, norm=True, h=1024)))
    np.testing.assert_array_equal(a, b)
    assert (a > 0).mean() > 0.01 and a.shape == (1024, W, 3)


def test_openpose_missing_points_and_confidence_cut() -> None:
    """``decode_json_as_poses``: a point with confidence < 1 is missing (its limbs are not drawn); min_confidence
    lowers the cut; a file whose every point is below the cut is an error, not a black image."""
    conf = [1.0] * 18
    conf[3] = 0.0  # right elbow: limbs 2-3... shoulder-elbow (3, 4) and elbow-wrist (4, 5) go
    out = arr(run("openpose", None, pose=pose_json(BODY_PX, norm=False, conf=conf)))
    (x1, y1), (x2, y2) = BODY_PX[2], BODY_PX[3]
    assert out[(y1 + y2) // 2, (x1 + x2) // 2].tolist() == [0, 0, 0]
    assert out[BODY_PX[3][1], BODY_PX[3][0]].tolist() == [0, 0, 0]
    low = pose_json(BODY_PX, norm=False, conf=[0.8] * 18)
    with pytest.raises(ConfigError, match="confidence below 1"):
        run("openpose", None, pose=low)
    np.testing.assert_array_equal(arr(run("openpose", None, pose=low, min_confidence=0.5)),
                                  arr(run("openpose", None, pose=pose_json(BODY_PX, norm=False))))


def test_openpose_hands_and_face() -> None:
    """``util.draw_handpose``: bone i a 2-px line in ``hsv(i / 20, 1, 1) * 255`` (rounded by cv2), joints blue circles;
    ``util.draw_facepose``: white dots of radius 3. Each part normalised on its own."""
    assert [round(c) for c in hand_color(0)] == [255, 0, 0] and [round(c) for c in hand_color(10)] == [0, 255, 255]
    # a hand: wrist at (100, 600), five straight fingers of four joints going up, 24 px apart
    hand = [(100.0, 600.0)]
    for f in range(5):
        hand += [(52.0 + 24 * f, 600.0 - 30 * j) for j in range(1, 5)]
    hand_norm = [v for x, y in hand for v in (x / W, y / H, 1.0)]
    face = [v for i in range(70) for v in (400.0 + 12 * (i % 10), 100.0 + 12 * (i // 10), 1.0)]
    pose = pose_json(BODY_PX, norm=False, hand_right_keypoints_2d=hand_norm, face_keypoints_2d=face)
    out = arr(run("openpose", None, pose=pose))
    for f in range(5):  # bone 4f + 1 runs between joints 1 and 2 of finger f, at x = 52 + 24 f
        x, y = 52 + 24 * f, 600 - 45
        assert out[y, x].tolist() == [int(round(c)) for c in hand_color(4 * f + 1)], f
    for x, y in hand:
        assert out[int(y), int(x)].tolist() == [0, 0, 255]
    assert out[100, 400].tolist() == [255, 255, 255] and out[160, 508].tolist() == [255, 255, 255]
    assert out[100, 403].tolist() == [255, 255, 255] and out[100, 404].tolist() == [0, 0, 0]  # radius 3
    assert out[600, 104].tolist() == [0, 0, 255] and out[600, 105].tolist() == [0, 0, 0]  # joints: radius 4
    corner = hand_norm.copy()
    corner[3 * 20:3 * 20 + 2] = [0.0, 0.0]  # the little finger's tip at (0, 0): skipped with its bone (eps)
    pose_c = pose_json(BODY_PX, norm=False, hand_right_keypoints_2d=corner)
    out_c = arr(run("openpose", None, pose=pose_c))
    assert (out_c[:4, :4] == 0).all() and out_c[255, 74].tolist() == [0, 0, 0]  # midway to (148, 510)
    assert out_c[480, 148].tolist() == [0, 0, 0] and out_c[510, 148].tolist() == [0, 0, 255]
    no_parts = arr(run("openpose", None, pose=pose, hands=False, face=False))
    np.testing.assert_array_equal(no_parts, arr(run("openpose", None, pose=pose_json(BODY_PX, norm=False))))
    only_face = arr(run("openpose", None, pose=pose, body=False, hands=False))
    assert only_face[BODY_PX[1][1], BODY_PX[1][0]].tolist() == [0, 0, 0] and only_face[100, 400].tolist() == [255] * 3


@pytest.mark.parametrize("change,field", [
    (lambda p: p["people"][0].update(pose_keypoints_2d=[0.5] * 75), "pose_keypoints_2d has 25 keypoints.*BODY_25"),
    (lambda p: p["people"][0].update(pose_keypoints_2d=[0.5] * 17), "pose_keypoints_2d has 17 numbers"),
    (lambda p: p["people"][0].update(hand_left_keypoints_2d=[0.5] * 60), "hand_left_keypoints_2d has 20 keypoints"),
    (lambda p: p["people"][0].update(face_keypoints_2d=["a", 1, 1]), "face_keypoints_2d must be a list of numbers"),
    (lambda p: p.update(people={"a": 1}), "no 'people' list"),
    (lambda p: p.update(canvas_width=-3), "canvas_width must be a positive"),
    (lambda p: p.pop("canvas_height"), "no canvas_height"),
])
def test_openpose_bad_json_names_the_field(change: object, field: str) -> None:
    pose = pose_json(BODY_PX, norm=True)
    change(pose)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=field):
        run("openpose", None, pose=pose)


def test_openpose_canvas_from_settings_or_image_and_json_text(tmp_path: Path) -> None:
    """OpenPose's own files have no canvas size: ``width`` / ``height`` or the image's size give it."""
    pose = pose_json(BODY_PX, norm=True)
    del pose["canvas_width"], pose["canvas_height"]
    a = arr(run("openpose", None, pose=pose, width=W, height=H))
    b = arr(run("openpose", Image.new("RGB", (W, H)), pose=json.dumps(pose)))
    path = tmp_path / "p.json"
    path.write_text(json.dumps(pose))
    c = arr(run("openpose", None, pose=path, width=W, height=H))
    want = arr(run("openpose", None, pose=pose_json(BODY_PX, norm=True)))
    for x in (a, b, c):
        np.testing.assert_array_equal(x, want)


# ------------------------------------------------------------------------------------------------ API errors


def test_run_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown preprocessor 'cany'; known: none, canny, "):
        run("cany", shapes())
    with pytest.raises(ConfigError, match="'canny' takes resolution, low, high; not 'seed'"):
        run("canny", shapes(), seed=1)
    with pytest.raises(ConfigError, match="low must be from 1 to 255, got 0"):
        run("canny", shapes(), low=0)
    with pytest.raises(ConfigError, match="sigma must be a number, got nan"):
        run("blur_gaussian", shapes(), sigma=float("nan"))
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        run("shuffle", shapes(), seed=1.5)
    with pytest.raises(ConfigError, match="needs a PIL image"):
        run("canny", np.zeros((8, 8, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pose JSON"):
        run("openpose", shapes())


def test_kinds_table_and_pixel_perfect() -> None:
    """The module names and defaults of the extension's sliders; ``external_code.pixel_perfect_resolution``."""
    defaults = {k: {p.name: p.default for p in v.params} for k, v in KINDS.items()}
    assert defaults["canny"] == {"resolution": 512, "low": 100, "high": 200}
    assert defaults["threshold"]["threshold"] == 127 and defaults["scribble_xdog"]["threshold"] == 32
    assert defaults["blur_gaussian"]["sigma"] == 9.0 and defaults["tile_resample"]["rate"] == 1.0
    assert {"none", "canny", "threshold", "scribble_xdog", "invert", "shuffle", "tile_resample", "blur_gaussian",
            "color", "inpaint", "openpose"} <= set(KINDS)
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Crop and Resize") == 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "Resize and Fill") == 256
    assert pixel_perfect_resolution((600, 400), 768, 512, "Just Resize") == 512


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_preprocessed_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.png"
    shapes().save(src)
    out = tmp_path / "sub" / "canny.png"
    assert main(["preprocess", "canny", str(src), "-o", str(out), "--low", "50", "--high", "150"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as got:
        assert got.mode == "RGB"
        np.testing.assert_array_equal(arr(got), arr(run("canny", shapes(), low=50, high=150)))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    mask = tmp_path / "mask.png"
    Image.new("L", (300, 190), 255).save(mask)
    assert main(["preprocess", "inpaint", str(src), "--mask", str(mask), "-o", str(tmp_path / "i.png")]) == 0
    with Image.open(tmp_path / "i.png") as got:
        assert got.mode == "RGBA" and (arr(got)[..., 3] == 255).all()
    pose = tmp_path / "pose.json"
    pose.write_text(json.dumps(pose_json(BODY_PX, norm=True)))
    assert main(["preprocess", "openpose", str(pose), "-o", str(tmp_path / "p.png"), "--no-face"]) == 0
    with Image.open(tmp_path / "p.png") as got:
        np.testing.assert_array_equal(arr(got), arr(run("openpose", None, pose=pose_json(BODY_PX, norm=True))))
    assert main(["preprocess", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(k in listing for k in KINDS) and "--low 100 --high 200" in listing
    assert main(["preprocess", "--list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == list(KINDS)


@pytest.mark.parametrize("case", ["kind", "image", "pose", "setting", "exists"])
def test_cli_errors_are_one_line(tmp_path: Path, case: str) -> None:
    """Bad input: exit 2, one ``sumie: error:`` line naming the problem, no traceback, no output file."""
    src = tmp_path / "in.png"
    shapes(64, 64).save(src)
    bad_pose = tmp_path / "pose.json"
    bad_pose.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.5] * 75}], "canvas_width": 64,
                                    "canvas_height": 64}))
    out = tmp_path / "out.png"
    args, expect = {
        "kind": (["cany", src], "unknown preprocessor 'cany'; known: none, canny"),
        "image": (["canny", tmp_path / "missing.png"], "file not found"),
        "pose": (["openpose", bad_pose], "people[0].pose_keypoints_2d has 25 keypoints"),
        "setting": (["canny", src, "--seed", "3"], "takes --resolution, --low, --high; not --seed"),
        "exists": (["canny", src], "already exists"),
    }[case]
    if case == "exists":
        out.write_bytes(b"keep")
    r = subprocess.run([sys.executable, "-m", "sumie", "preprocess", *map(str, args), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sumie: error:") and expect in lines[0], r.stderr
    assert out.exists() == (case == "exists") and (case != "exists" or out.read_bytes() == b"keep")
