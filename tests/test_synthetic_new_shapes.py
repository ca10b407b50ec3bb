"""New shapes (stars, bars) and colour words in the synthetic domain: rendered, captioned, parsed, detected; the
defaults unchanged."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sumie.errors import ConfigError
from sumie.tiny.adherence import default_prompts, detect, score
from sumie.tiny.synthetic import (
    ALL_SHAPES,
    COLORS,
    NEW_SHAPES,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    ObjectSpec,
    SceneMix,
    SceneSpec,
    TrainSet,
    bar_prompts,
    new_shape_prompts,
    parse_caption,
    realize,
    render,
    render_caption,
    render_mask,
    star_prompts,
    word_prompts,
)


@pytest.mark.parametrize("resolution", [64, 128])
def test_detector_tells_the_new_shapes_from_the_other_shapes(resolution: int) -> None:
    wrong = []
    for shape in ALL_SHAPES:
        for size in SIZES:
            for seed in range(12):
                rng = random.Random(f"{shape}{size}{seed}")
                spec = SceneSpec((ObjectSpec(shape, rng.choice(list(COLORS)), size),))
                image = render(realize(spec, rng), resolution)
                found = [o.shape for o in detect(image).objects]
                if found != [shape]:
                    wrong.append((shape, size, seed, found))
    assert wrong == []


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_new_shape_scenes_render_and_score_right(shape: str) -> None:
    ds = TrainSet(64, 120, seed=4, heldout=None, mix=SceneMix(**{shape: 0.5}))
    drawn = right = total = 0
    for i in range(120):
        s = ds.sample(i)
        drawn += sum(inst.shape == shape for inst in s.scene.instances)
        assert {inst.shape for inst in s.scene.instances} <= {shape, *SHAPES}
        result = score(s.image, s.scene.full_spec())
        right += sum(result.values())
        total += len(result)
    assert drawn >= 40 and right / total >= 0.99


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_new_shape_prompts_parse_and_ground_truth_scores_all_right(shape: str) -> None:
    prompts = new_shape_prompts(shape, 20, "one") + new_shape_prompts(shape, 20, "two")
    assert len({p for p, _ in prompts}) == 40
    for caption, spec in prompts:
        assert shape in caption and any(o.shape == shape for o in spec.objects)
        assert parse_caption(caption) == spec
        image, _ = render_caption(caption)
        assert all(score(image, spec).values()), caption
    assert all(o.shape == shape for _, spec in new_shape_prompts(shape, 10, "one") for o in spec.objects)
    assert parse_caption(f"two small red {shape}s on a white background").objects[0] == ObjectSpec(
        shape, "red", "small", None, 2)
    split = default_prompts(5, 5, split=shape)
    assert split == new_shape_prompts(shape, 5, "one") + new_shape_prompts(shape, 5, "two")
    assert split == (star_prompts if shape == "star" else bar_prompts)(5, "one") + (
        star_prompts if shape == "star" else bar_prompts)(5, "two")
    with pytest.raises(ConfigError, match="unknown new shape 'hexagon'"):
        new_shape_prompts("hexagon", 2)


def test_bars_are_three_times_as_wide_as_tall_and_as_wide_as_squares() -> None:
    for size in SIZES:
        for seed in range(6):
            scene = realize(SceneSpec((ObjectSpec("bar", "red", size, "center"),)), random.Random(seed))
            inst = scene.instances[0]
            mask = np.asarray(render_mask(scene, 256)) > 127
            ys, xs = np.nonzero(mask)
            width, height = (xs.max() - xs.min() + 1) / 256, (ys.max() - ys.min() + 1) / 256
            assert SIZE_RANGES[size][0] - 0.01 <= width <= SIZE_RANGES[size][1] + 0.01
            assert width == pytest.approx(inst.extent, abs=2 / 256)
            assert width / height == pytest.approx(3, rel=0.08)
            assert mask.mean() == pytest.approx(width * height, rel=0.05)  # a filled rectangle


def test_detector_bars_need_a_wide_filled_box() -> None:
    """A box at least twice as wide as tall and well filled is a bar; upright, square or ragged ones are not."""
    def shapes(points: list[tuple[int, int]]) -> list[str]:
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(img).polygon(points, fill=COLORS["blue"])
        return [o.shape for o in detect(img).objects]

    def rect(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    assert shapes(rect(20, 28, 37, 33)) == ["bar"]  # 18 x 6
    assert shapes(rect(20, 28, 31, 31)) == ["bar"]  # 12 x 4
    assert shapes(rect(20, 28, 33, 33)) == ["bar"]  # 14 x 6: 2.3:1
    assert shapes(rect(28, 20, 33, 37)) == ["circle"]  # 6 x 18: upright, no bar (not a shape of the domain)
    assert shapes(rect(24, 24, 39, 39)) == ["square"]
    assert shapes(rect(20, 26, 33, 33)) == ["circle"]  # 14 x 8: under 2:1, no bar (nor a square to the moments)
    assert shapes([(20, 34), (44, 34), (32, 26)]) != ["bar"]  # a flat triangle: wide box, half filled


def test_default_data_and_prompts_do_not_change_with_new_shapes() -> None:
    """The default mix draws what it drew before new shapes existed (hash recorded before stars), none anywhere."""
    h = hashlib.sha256()
    ds = TrainSet(64, 40, seed=3)
    for i in range(40):
        s = ds.sample(i)
        h.update(s.caption.encode())
        h.update(s.image.tobytes())
    assert h.hexdigest()[:16] == "857697d779f9aa7b"
    assert SHAPES == ("circle", "square", "triangle")
    for caption, spec in default_prompts(50, 50) + default_prompts(50, 50, split="seen"):
        assert all(o.shape in SHAPES for o in spec.objects)
        assert not any(f" {shape}" in caption for shape in NEW_SHAPES)
    assert ds.mix == SceneMix(star=0.0, bar=0.0)


def test_star_mix_and_prompts_draw_as_before_bars() -> None:
    """A star mix and the star prompts draw what they drew before bars existed (hash recorded before the change)."""
    h = hashlib.sha256()
    ds = TrainSet(64, 40, seed=5, heldout=None, mix=SceneMix(star=0.5))
    for i in range(40):
        s = ds.sample(i)
        h.update(s.caption.encode())
        h.update(s.image.tobytes())
    for caption, _ in star_prompts(20, "one") + star_prompts(20, "two"):
        h.update(caption.encode())
    assert h.hexdigest()[:16] == "b4eee8eb302c1e40"


def test_mix_of_new_shapes() -> None:
    ds = TrainSet(64, 200, seed=1, heldout=None, mix={"star": 0.25, "bar": 0.5})
    shapes = [o.shape for i in range(200) for o in ds.sample(i).spec.objects]
    share = {s: shapes.count(s) / len(shapes) for s in ALL_SHAPES}
    assert share["bar"] == pytest.approx(0.5, abs=0.08) and share["star"] == pytest.approx(0.25, abs=0.07)
    assert SceneMix(bar=0.5).new_shapes == {"star": 0.0, "bar": 0.5}
    with pytest.raises(ConfigError, match="shares of new shapes .* must sum to <= 1"):
        SceneMix(star=0.6, bar=0.6)
    with pytest.raises(ConfigError, match="synthetic mix bar must be a number in"):
        SceneMix.from_options({"bar": "half"})


def test_color_words_rename_captions_and_prompts() -> None:
    ds = TrainSet(64, 30, seed=2, mix={"colors": ["red", "blue"]}, color_words={"red": "crimson"})
    captions = [ds.sample(i).caption for i in range(30)]
    assert all(" red " not in f" {c} " for c in captions)
    assert sum("crimson" in c for c in captions) >= 10
    assert all(o.color in ("red", "blue") for i in range(30) for o in ds.sample(i).spec.objects)
    prompts = word_prompts(15, "one", color_words={"red": "crimson"}) + word_prompts(
        15, "two", color_words={"red": "crimson"})
    for text, spec in prompts:
        assert "crimson" in text and " red " not in f" {text} "
        assert any(o.color == "red" for o in spec.objects)
        assert parse_caption(text.replace("crimson", "red")) == spec
    with pytest.raises(ConfigError, match="unknown colour 'scarlet'"):
        TrainSet(64, 4, color_words={"scarlet": "x"})
    with pytest.raises(ConfigError, match="one lower-case word"):
        word_prompts(2, color_words={"red": "Two Words"})
    with pytest.raises(ConfigError, match="synthetic mix colors"):
        SceneMix(colors=("teal",))
    with pytest.raises(ConfigError, match="synthetic mix star must be a number in"):
        SceneMix(star=1.5)


def test_synthetic_heldout_false_allows_the_heldout_pairs() -> None:
    from sumie.tiny.synthetic import DEFAULT_HELDOUT
    from sumie.training.data import synthetic_dataset

    every = synthetic_dataset({"length": 200, "seed": 1, "heldout": False}, 64)
    split = synthetic_dataset({"length": 200, "seed": 1}, 64)
    assert synthetic_dataset({"length": 200, "seed": 1, "heldout": True}, 64).describe() == split.describe()
    novel = sum(DEFAULT_HELDOUT.novel(every.dataset.sample(i).spec) for i in range(200))
    assert novel >= 30 and not any(DEFAULT_HELDOUT.novel(split.dataset.sample(i).spec) for i in range(200))
    with pytest.raises(ConfigError, match="synthetic heldout must be true or false"):
        synthetic_dataset({"heldout": "no"}, 64)
