"""Stars and colour words in the synthetic domain: rendered, captioned, parsed, detected; the defaults unchanged."""

from __future__ import annotations

import hashlib
import random

import pytest

from sumie.errors import ConfigError
from sumie.tiny.adherence import default_prompts, detect, score
from sumie.tiny.synthetic import (
    ALL_SHAPES,
    COLORS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneMix,
    SceneSpec,
    TrainSet,
    parse_caption,
    realize,
    render,
    render_caption,
    star_prompts,
    word_prompts,
)


@pytest.mark.parametrize("resolution", [64, 128])
def test_detector_tells_stars_from_the_other_shapes(resolution: int) -> None:
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


def test_star_scenes_render_and_score_right() -> None:
    ds = TrainSet(64, 120, seed=4, heldout=None, mix=SceneMix(star=0.5))
    stars = scores = 0
    right = total = 0
    for i in range(120):
        s = ds.sample(i)
        stars += sum(inst.shape == "star" for inst in s.scene.instances)
        result = score(s.image, s.scene.full_spec())
        scores += 1
        right += sum(result.values())
        total += len(result)
    assert stars >= 40 and right / total >= 0.99


def test_star_prompts_parse_and_ground_truth_scores_all_right() -> None:
    prompts = star_prompts(20, "one") + star_prompts(20, "two")
    assert len({p for p, _ in prompts}) == 40
    for caption, spec in prompts:
        assert "star" in caption and any(o.shape == "star" for o in spec.objects)
        assert parse_caption(caption) == spec
        image, _ = render_caption(caption)
        assert all(score(image, spec).values()), caption
    assert all(o.shape == "star" for _, spec in star_prompts(10, "one") for o in spec.objects)
    assert parse_caption("two small red stars on a white background").objects[0] == ObjectSpec("star", "red", "small",
                                                                                                None, 2)


def test_default_data_and_prompts_do_not_change_with_stars() -> None:
    """The default mix draws what it drew before stars existed (hash recorded before the change), no stars anywhere."""
    h = hashlib.sha256()
    ds = TrainSet(64, 40, seed=3)
    for i in range(40):
        s = ds.sample(i)
        h.update(s.caption.encode())
        h.update(s.image.tobytes())
    assert h.hexdigest()[:16] == "857697d779f9aa7b"
    assert SHAPES == ("circle", "square", "triangle")
    for caption, spec in default_prompts(50, 50) + default_prompts(50, 50, split="seen"):
        assert "star" not in caption and all(o.shape != "star" for o in spec.objects)
    assert ds.mix == SceneMix(star=0.0)


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
