"""SD upscale (sumie.pipelines.sd_upscale): the grid split / combine against A1111's definition (a per-pixel oracle,
exact), the upscale step, A1111's seed rule, end to end on the embedded sumie-tiny (size, tiles blended, no hard
seam), a random tile ControlNet per tile, and the ``sumie upscale-sd`` command."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from control_testfiles import random_controlnet, write_original
from PIL import Image

import sumie
from sumie.cli.main import main
from sumie.errors import ConfigError
from sumie.pipelines.output import read_png_info
from sumie.pipelines.params import ControlUnit, GenerationParams
from sumie.pipelines.sd_upscale import _tile_runs, combine_grid, sd_upscale, split_grid, target_size, upscale_image

# ----------------------------------------------------------------------------- A1111's definition, pixel by pixel


def a1111_starts(n: int, tile: int, overlap: int) -> list[int]:
    """A1111 ``split_grid``: ceil((n - overlap) / (tile - overlap)) tiles at int(i * (n - tile) / (count - 1)), a
    tile reaching the end (>= n) moved back to n - tile."""
    count = math.ceil((n - overlap) / (tile - overlap))
    out = []
    for i in range(count):
        pos = int(i * ((n - tile) / (count - 1))) if count > 1 else 0
        out.append(n - tile if pos + tile >= n else pos)
    return out


def div255(a: np.ndarray) -> np.ndarray:
    """PIL's rounded division by 255 of an 8-bit blend (``(a + 128 + ((a + 128) >> 8)) >> 8``)."""
    t = a + 128
    return ((t >> 8) + t) >> 8


def blend(under: np.ndarray, over: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``over`` pasted on ``under`` through the 8-bit mask ``m`` (PIL ``paste(..., mask=L)``)."""
    return div255(under * (255 - m) + over * m)


def a1111_combine(tiles: dict[tuple[int, int], np.ndarray], ys: list[int], xs: list[int], w: int, h: int,
                  th: int, tw: int, o: int) -> np.ndarray:
    """A1111 ``combine_grid`` per pixel: rows left to right, each tile's first ``o`` columns blended with mask
    floor(i * 255 / o), then the rows top to bottom the same way over their first ``o`` lines."""
    ramp = (np.arange(o) * 255) // o if o else np.zeros(0, np.int64)
    out = np.zeros((h, w, 3), np.int64)
    for y in ys:
        line = np.zeros((th, w, 3), np.int64)
        for x in xs:
            t = tiles[(y, x)].astype(np.int64)
            if x == 0 or o == 0:
                line[:, x : x + tw] = t
                continue
            line[:, x : x + o] = blend(line[:, x : x + o], t[:, :o], ramp[None, :, None])
            line[:, x + o : x + tw] = t[:, o:]
        if y == 0 or o == 0:
            out[y : y + th] = line
            continue
        out[y : y + o] = blend(out[y : y + o], line[:o], ramp[:, None, None])
        out[y + o : y + th] = line[o:]
    return out.astype(np.uint8)


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(("w", "h", "tw", "th", "o"), [(200, 150, 64, 48, 16), (512, 384, 192, 128, 64),
                                                       (96, 96, 64, 64, 32), (130, 70, 64, 64, 0), (64, 64, 64, 64, 8)])
def test_split_and_combine_match_a1111_exactly(w: int, h: int, tw: int, th: int, o: int) -> None:
    image = noise_image(w, h, 0)
    grid = split_grid(image, tw, th, o)
    ys, xs = a1111_starts(h, th, o), a1111_starts(w, tw, o)
    assert [y for y, _, _ in grid.rows] == ys
    assert all([x for x, _, _ in row] == xs for _, _, row in grid.rows)
    arr = np.asarray(image)
    for y, _, row in grid.rows:
        for x, _, tile in row:
            assert tile.size == (tw, th)
            assert np.array_equal(np.asarray(tile), arr[y : y + th, x : x + tw])
    # new, unrelated tile contents: the blend is visible everywhere in the overlaps
    new = [noise_image(tw, th, 100 + k) for k in range(len(grid.tiles))]
    got = np.asarray(combine_grid(grid.with_tiles(new)))
    by_pos = {(y, x): np.asarray(new[i * len(xs) + j]) for i, y in enumerate(ys) for j, x in enumerate(xs)}
    assert got.shape == (h, w, 3)
    assert np.array_equal(got, a1111_combine(by_pos, ys, xs, w, h, th, tw, o))
    # the untouched tiles put back give the image back where no blend mixes two different sources
    if o == 0 or len(ys) * len(xs) == 1:
        assert np.array_equal(np.asarray(combine_grid(grid)), arr)


def test_upscale_step_follows_a1111() -> None:
    image = noise_image(50, 30, 1)
    assert target_size(50, 30, 1.5) == (72, 40)
    want = image.resize((75, 45), Image.Resampling.LANCZOS).resize((72, 40), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(upscale_image(image, 1.5, "lanczos")), np.asarray(want))
    assert upscale_image(image, 0.5, "lanczos").size == (24, 8)  # not larger: one Lanczos resize to the target
    assert upscale_image(image, 2, "None") is image  # A1111's "None": the image as it is
    with pytest.raises(ConfigError, match="positive"):
        upscale_image(image, 0, "lanczos")
    with pytest.raises(ConfigError, match="needs the engine"):
        upscale_image(image, 2, "4x-UltraSharp")


def test_seed_rule_of_a1111_batches() -> None:
    # A1111: after each batch p.seed = processed.seed + 1, so batch i starts at seed + i, image k at + k
    assert _tile_runs(5, 2, False) == [(0, 2, 0), (2, 2, 1), (4, 1, 2)]
    assert _tile_runs(5, 2, True) == [(0, 1, 0), (1, 1, 1), (2, 1, 1), (3, 1, 2), (4, 1, 2)]
    assert _tile_runs(3, 1, False) == [(0, 1, 0), (1, 1, 1), (2, 1, 2)]


# ----------------------------------------------------------------------------- end to end on sumie-tiny


class Spy:
    """The engine, with every ``generate`` request and result recorded."""

    def __init__(self, engine: sumie.Engine) -> None:
        self.engine, self.calls = engine, []  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, params: GenerationParams, **kw: Any) -> Any:
        result = self.engine.generate(params, **kw)
        self.calls.append((params, result))
        return result


@pytest.fixture(scope="module")
def engine() -> sumie.Engine:
    e = sumie.load()
    e.show_progress = False
    return e


def source() -> Image.Image:
    """A 48 x 48 picture: a red disc on a blue-green gradient."""
    yy, xx = np.mgrid[0:48, 0:48]
    arr = np.stack([xx * 4, yy * 4, 255 - xx * 2], -1).astype(np.float64)
    disc = (xx - 20) ** 2 + (yy - 26) ** 2 < 100
    arr[disc] = (220, 30, 30)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


BASE = GenerationParams("a red circle", steps=4, seed=10, subseed=3, width=64, height=64, denoising_strength=0.5,
                        batch_size=2, sampler="Euler")


def step_profile(img: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference between neighbouring columns (axis 1) or rows (axis 0), per position."""
    d = np.abs(np.diff(img.astype(np.int64), axis=axis))
    return d.mean(axis=(0, 2) if axis == 1 else (1, 2))


def test_sd_upscale_end_to_end(engine: sumie.Engine) -> None:
    spy = Spy(engine)
    result = sd_upscale(spy, source(), BASE, scale=2, upscaler="lanczos", overlap=32)  # type: ignore[arg-type]
    out = result.images[0]
    assert out.size == (96, 96) and result.grid == (2, 2)
    big = source().resize((96, 96), Image.Resampling.LANCZOS)
    grid = split_grid(big, 64, 64, 32)
    # two batches of two tiles, at seeds 10 and 11 (A1111's rule), each tile the img2img init image at 64 x 64
    assert [(p.seed, len(p.init_images), p.batch_size) for p, _ in spy.calls] == [(10, 2, 2), (11, 2, 2)]
    sent = [im for p, _ in spy.calls for im in p.init_images]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sent, grid.tiles, strict=True))
    assert [r.seeds for _, r in spy.calls] == [[10, 11], [11, 12]]
    tiles = [im for _, r in spy.calls for im in r.images]
    # the result is A1111's combine of the tiles (exact), and the tiles really were blended
    ys = xs = [0, 32]
    by_pos = {(y, x): np.asarray(tiles[i * 2 + j]) for i, y in enumerate(ys) for j, x in enumerate(xs)}
    got = np.asarray(out)
    assert np.array_equal(got, a1111_combine(by_pos, ys, xs, 96, 96, 64, 64, 32))
    hard = np.zeros_like(got)
    for (y, x), t in by_pos.items():
        hard[y : y + 64, x : x + 64] = t
    assert not np.array_equal(got, hard)
    # no hard seam: inside the blend bands the largest step between neighbouring rows / columns is at most 1.5x the
    # largest step inside the tiles themselves; the hard paste breaks that bound at its seam (the tiles of the two
    # batches came out with different backgrounds)
    hard_breaks = False
    for axis in (0, 1):
        blended = step_profile(got, axis)[32:63].max()
        seam = step_profile(hard, axis)[31]
        inside = max(step_profile(np.asarray(t), axis).max() for t in tiles)
        print(f"axis {axis}: blended band max step {blended:.2f}, hard seam step {seam:.2f}, tiles' max {inside:.2f}")
        assert blended <= 1.5 * inside
        hard_breaks |= bool(seam > 1.5 * inside)
    assert hard_breaks
    assert "SD upscale overlap: 32, SD upscale upscaler: Lanczos" in result.infotexts[0]
    assert out.info["parameters"] == result.infotexts[0]


def test_sd_upscale_with_a_tile_controlnet(engine: sumie.Engine, tmp_path: Path) -> None:
    cfg = dataclasses.replace(engine.models.config.unet, in_channels=4)
    path = write_original(tmp_path / "control_tile.safetensors", random_controlnet(cfg, seed=4))
    spy = Spy(engine)
    params = dataclasses.replace(BASE, controlnets=[ControlUnit(model=str(path))])
    result = sd_upscale(spy, source(), params, scale=2, upscaler="lanczos", overlap=32)  # type: ignore[arg-type]
    # one tile a call, at the seeds the batches of two give them; each unit's image is that call's tile
    assert [(p.seed, len(p.init_images)) for p, _ in spy.calls] == [(10, 1), (11, 1), (11, 1), (12, 1)]
    for p, r in spy.calls:
        assert p.controlnets[0].image is p.init_images[0]
        assert "ControlNet 0" in r.infotexts[0]
    plain = Spy(engine)
    sd_upscale(plain, source(), dataclasses.replace(BASE, batch_size=1), scale=2, overlap=32)  # type: ignore[arg-type]
    assert [p.seed for p, _ in plain.calls] == [10, 11, 12, 13]
    with_cn = np.asarray(spy.calls[0][1].images[0]).astype(int)
    without = np.asarray(plain.calls[0][1].images[0]).astype(int)  # same tile, same seed, no ControlNet
    assert np.abs(with_cn - without).max() > 0
    assert result.images[0].size == (96, 96)


def test_sd_upscale_with_an_upscaler_model(engine: sumie.Engine, tmp_path: Path) -> None:
    from test_upscalers import _tiny_file

    from sumie.pipelines.upscale import upscale

    path = _tiny_file(tmp_path / "tiny_x2.pth", seed=3)
    image = source().resize((40, 36))
    big = upscale_image(image, 2, str(path), engine)  # the model (x2) reaches 80 x 72: no Lanczos after it
    assert big.size == target_size(40, 36, 2) == (80, 72)
    assert np.array_equal(np.asarray(big), np.asarray(upscale(engine.manager.get("upscaler", path), image,
                                                              size=(80, 72))))
    spy = Spy(engine)
    result = sd_upscale(spy, image, dataclasses.replace(BASE, steps=2), scale=2, upscaler=str(path),  # type: ignore
                        overlap=16)
    assert result.images[0].size == (80, 72) and "SD upscale upscaler: tiny_x2" in result.infotexts[0]
    assert np.array_equal(np.asarray(spy.calls[0][0].init_images[0]), np.asarray(big.crop((0, 0, 64, 64))))


def test_sd_upscale_errors(engine: sumie.Engine) -> None:
    with pytest.raises(ConfigError, match="smaller than a 512x512 tile"):
        sd_upscale(engine, source(), dataclasses.replace(BASE, width=None, height=None), scale=2)
    with pytest.raises(ConfigError, match="overlap"):
        sd_upscale(engine, source(), BASE, scale=2, overlap=64)
    with pytest.raises(ConfigError, match="takes the image itself"):
        sd_upscale(engine, source(), dataclasses.replace(BASE, init_images=[source()]), scale=2)


def test_cli_upscale_sd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.png"
    source().save(src)
    out = tmp_path / "out.png"
    assert main(["upscale-sd", str(src), "a red circle", "--scale", "2", "--width", "64", "--height", "64",
                 "--overlap", "32", "--steps", "2", "--seed", "5", "-o", str(out), "-q"]) == 0
    with Image.open(out) as im:
        assert im.size == (96, 96)
    assert "SD upscale overlap: 32" in read_png_info(str(out))
    assert "Denoising strength: 0.3" in read_png_info(str(out))  # the command's default
    assert main(["upscale-sd", str(src), "--upscaler", "no-such-model", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
