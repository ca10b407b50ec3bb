"""The synthetic captioned dataset: determinism, captions that parse back, layout rules, the held-out split."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from sumie.errors import ConfigError
from sumie.tiny.synthetic import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELDOUT,
    MIN_CONTRAST,
    POSITIONS,
    SIZE_RANGES,
    ObjectSpec,
    SceneMix,
    SceneSpec,
    TrainSet,
    heldout_prompts,
    make_caption,
    parse_caption,
    realize,
    render,
    render_caption,
    render_mask,
    seen_prompts,
)


def _dist(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def test_samples_are_deterministic_and_seeded() -> None:
    a, b, c = TrainSet(64, 100, seed=1), TrainSet(64, 100, seed=1), TrainSet(64, 100, seed=2)
    for i in (0, 17, 99):
        ia, ta = a[i]
        ib, tb = b[i]
        assert ta == tb and torch.equal(ia, ib)
    assert [a[i][1] for i in range(20)] != [c[i][1] for i in range(20)]
    assert not torch.equal(a[0][0], a[1][0])


def test_tensor_format_and_batching() -> None:
    for res in (64, 128):
        x, caption = TrainSet(res, 10)[3]
        assert x.shape == (3, res, res) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.min() < 0 < x.max()
        assert isinstance(caption, str) and caption
    images, captions = next(iter(torch.utils.data.DataLoader(TrainSet(64, 10), batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and len(captions) == 4
    u8, caps = TrainSet(64, 10).uint8_batch(2, 6)
    assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 64, 64)
    assert caps == [TrainSet(64, 10)[i][1] for i in range(2, 6)]
    assert torch.allclose(u8[1].float() / 127.5 - 1, TrainSet(64, 10)[3][0])


def test_captions_parse_back_to_their_spec_and_vary() -> None:
    ds = TrainSet(64, 3000, seed=5)
    captions = set()
    kinds = {"one": 0, "two": 0, "count": 0, "relation": 0, "background": 0, "position": 0, "size": 0}
    for i in range(3000):
        s = ds.sample(i)
        assert parse_caption(s.caption) == s.spec, s.caption
        captions.add(s.caption)
        spec = s.spec
        kinds[spec.kind] += 1
        kinds["count"] += any(o.count > 1 for o in spec.objects)
        kinds["relation"] += spec.relation is not None
        kinds["background"] += spec.background is not None
        kinds["position"] += any(o.position for o in spec.objects)
        kinds["size"] += any(o.size for o in spec.objects)
    assert len(captions) > 2500  # varied, not a handful of templates
    assert all(v > 200 for v in kinds.values()), kinds
    assert parse_caption("Two blue squares.") == SceneSpec((ObjectSpec("square", "blue", count=2),))
    assert parse_caption("a small red circle in the top left on a white background") == SceneSpec(
        (ObjectSpec("circle", "red", "small", "top left"),), "white")
    assert parse_caption("a green triangle to the left of a purple circle on grey") == SceneSpec(
        (ObjectSpec("triangle", "green"), ObjectSpec("circle", "purple")), "gray", "left of")


@pytest.mark.parametrize("text", ["a red hexagon", "two red circle", "a red circle and", "red circle",
                                  "a white circle on white", "a red circle at the top and a blue square at the top",
                                  "a red circle and a red circle", "a blue circle with a cat",
                                  "a red circle at the top above a blue square"])
def test_bad_prompts_raise_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_caption(text)


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="resolution"):
        TrainSet(60)
    with pytest.raises(ConfigError):
        TrainSet(64, 0)
    with pytest.raises(ConfigError, match="kind"):
        heldout_prompts(3, kind="three")
    with pytest.raises(ConfigError, match="colour"):
        realize(SceneSpec((ObjectSpec("circle", "teal"),)), random.Random(0))
    with pytest.raises(ConfigError, match="count"):
        make_caption(SceneSpec((ObjectSpec("circle", "red", position="top", count=2),)), random.Random(0))


def test_layout_rules() -> None:
    ds = TrainSet(64, 1000, seed=9)
    for i in range(1000):
        scene = ds.sample(i).scene
        cells = [inst.cell for inst in scene.instances]
        assert len(set(cells)) == len(cells)
        for inst, spec_obj in ((inst, o) for grp, o in zip(scene.objects, ds.sample(i).spec.objects, strict=True)
                               for inst in grp):
            lo, hi = SIZE_RANGES[inst.size]
            assert lo <= inst.extent <= hi
            row, col = divmod(inst.cell, 3)
            half = inst.extent / 2
            assert col / 3 + 0.019 < inst.cx - half and inst.cx + half < (col + 1) / 3 - 0.019
            assert row / 3 + 0.019 < inst.cy - half and inst.cy + half < (row + 1) / 3 - 0.019
            assert _dist(COLORS[inst.color], BACKGROUNDS[scene.background]) >= MIN_CONTRAST
            assert (inst.shape, inst.color) == (spec_obj.shape, spec_obj.color)
            assert spec_obj.size in (None, inst.size) and spec_obj.position in (None, POSITIONS[inst.cell])
        if scene.relation is not None:
            (ra, ca), (rb, cb) = divmod(scene.objects[0][0].cell, 3), divmod(scene.objects[1][0].cell, 3)
            assert {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[scene.relation]


def test_rendering_is_antialiased_with_exact_interiors() -> None:
    spec = SceneSpec((ObjectSpec("circle", "red", "large", "center"),), "white")
    scene = realize(spec, random.Random(0))
    arr = np.asarray(render(scene, 64)).astype(int)
    inst = scene.instances[0]
    assert tuple(arr[int(inst.cy * 64), int(inst.cx * 64)]) == COLORS["red"]
    assert tuple(arr[0, 0]) == BACKGROUNDS["white"]
    colors = {tuple(p) for p in arr.reshape(-1, 3)}
    assert len(colors) > 5  # edge pixels blend object and background
    # the anti-aliased coverage matches the circle's area (pi r^2) to 3%
    red, white = np.array(COLORS["red"]), np.array(BACKGROUNDS["white"])
    coverage = ((arr - white) @ (red - white) / ((red - white) @ (red - white))).sum()
    assert coverage == pytest.approx(np.pi * (inst.extent * 64 / 2) ** 2, rel=0.03)


def test_training_split_never_shows_held_out_combinations() -> None:
    ds = TrainSet(64, 3000, seed=11)
    for i in range(3000):
        for inst in ds.sample(i).scene.instances:
            assert (inst.color, inst.shape) not in DEFAULT_HELDOUT.color_shape
            assert (inst.color, POSITIONS[inst.cell]) not in DEFAULT_HELDOUT.color_position
    open_set = TrainSet(64, 3000, seed=11, heldout=None)  # without a split every combination occurs
    seen = {(inst.color, inst.shape) for i in range(3000) for inst in open_set.sample(i).scene.instances}
    assert DEFAULT_HELDOUT.color_shape <= seen


def test_heldout_prompts_state_unseen_combinations() -> None:
    for kind, n_objects in (("one", 1), ("two", 2)):
        prompts = heldout_prompts(120, kind, seed=3)
        assert len(prompts) == 120 and len({c for c, _ in prompts}) == 120
        assert prompts == heldout_prompts(120, kind, seed=3) and prompts != heldout_prompts(120, kind, seed=4)
        shape_pairs = position_pairs = 0
        for caption, spec in prompts:
            assert parse_caption(caption) == spec and len(spec.objects) == n_objects
            assert DEFAULT_HELDOUT.novel(spec)
            shape_pairs += any((o.color, o.shape) in DEFAULT_HELDOUT.color_shape for o in spec.objects)
            position_pairs += any((o.color, o.position) in DEFAULT_HELDOUT.color_position for o in spec.objects)
        assert shape_pairs >= 60 and position_pairs >= 60, (shape_pairs, position_pairs)
    counts = [o.count for _, s in heldout_prompts(120, "one") for o in s.objects]
    assert {1, 2, 3} <= set(counts)


def test_seen_prompts_state_only_trained_combinations() -> None:
    for kind, n_objects in (("one", 1), ("two", 2)):
        prompts = seen_prompts(80, kind, seed=3)
        assert len(prompts) == 80 and len({c for c, _ in prompts}) == 80 and prompts == seen_prompts(80, kind, seed=3)
        for caption, spec in prompts:
            assert parse_caption(caption) == spec and len(spec.objects) == n_objects
            assert not DEFAULT_HELDOUT.novel(spec)
    with pytest.raises(ConfigError, match="kind"):
        seen_prompts(3, kind="three")


def test_render_caption_draws_what_it_says() -> None:
    image, scene = render_caption("three large yellow circles on a black background", 128, seed=4)
    assert image.size == (128, 128) and scene.background == "black"
    assert [(i.shape, i.color, i.size) for i in scene.instances] == [("circle", "yellow", "large")] * 3
    again, _ = render_caption("three large yellow circles on a black background", 128, seed=4)
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_items_equal_the_uint8_batch_rows() -> None:
    """Item i (on-the-fly loading) is row i of uint8_batch (the in-memory cache) mapped by x / 127.5 - 1."""
    ds = TrainSet(64, 2000, seed=0)
    batch, captions = ds.uint8_batch(0, len(ds))
    assert batch.shape == (2000, 3, 64, 64) and batch.dtype == torch.uint8 and len(captions) == 2000
    for i in range(len(ds)):
        image, caption = ds[i]
        assert image.dtype == torch.float32 and caption == captions[i]
        assert torch.equal(image, batch[i].float() / 127.5 - 1.0), i
    assert len(set(captions)) > 100  # and the items vary


def test_masks_cover_exactly_the_object_pixels() -> None:
    """mask > 0 exactly where the image differs from the background; its sum is the drawn shapes' area."""
    ts = TrainSet(64, 30, seed=3)
    area_of = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for i in range(30):
        s = ts.sample(i)
        m = ts.mask(i)
        assert m.shape == (1, 64, 64) and m.dtype == torch.float32 and 0 <= float(m.min()) and float(m.max()) <= 1
        differs = np.abs(np.asarray(s.image, dtype=int) - BACKGROUNDS[s.scene.background]).sum(-1) > 0
        assert np.array_equal(m[0].numpy() > 0, differs)
        area = sum(area_of[x.shape] * (x.extent * 64) ** 2 for x in s.scene.instances)
        assert float(m.sum()) == pytest.approx(area, rel=0.15)
        assert np.array_equal(np.asarray(render_mask(s.scene, 64)), (m[0].numpy() * 255).round().astype(np.uint8))


def test_default_mix_keeps_the_draws_sumie_tiny_was_trained_on() -> None:
    """The shipped model's latent cache and every published evaluation depend on these exact draws."""
    assert [TrainSet(64, 10, seed=1).sample(i).caption for i in range(3)] == [
        "a black square at the top on a gray background",
        "a gray background with a white square and a black triangle",
        "a picture of a large orange triangle in the middle and a red circle in the bottom left",
    ]
    assert TrainSet(64, 10, seed=1, mix={}).sample(2).caption == TrainSet(64, 10, seed=1).sample(2).caption


def test_scene_mix_sets_the_share_of_each_kind_of_caption() -> None:
    def shares(mix: dict[str, float]) -> tuple[float, float, float]:
        specs = [s.spec for s in (TrainSet(64, 600, seed=3, mix=mix).sample(i) for i in range(600))]
        two = [sp for sp in specs if len(sp.objects) == 2]
        placed = sum(sp.relation is not None for sp in two), sum(sp.objects[0].position is not None for sp in two)
        return len(two) / len(specs), placed[0] / max(len(two), 1), placed[1] / max(len(two), 1)

    default_two, _, _ = shares({})
    two, relation, positions = shares({"one": 0.1, "count": 0.0, "two": 0.9, "relation": 0.5, "positions": 0.5})
    assert default_two < 0.45 and two > 0.75  # the held-out pairs reject some draws, so shares sit below the mix
    assert relation > 0.4 and positions > 0.4 and relation + positions > 0.98
    assert shares({"one": 1.0, "count": 0.0, "two": 0.0})[0] == 0.0
    only_counts = [TrainSet(64, 50, seed=0, mix={"one": 0, "count": 1, "two": 0}).sample(i).spec for i in range(50)]
    assert all(len(sp.objects) == 1 and sp.objects[0].count > 1 for sp in only_counts)


@pytest.mark.parametrize(("mix", "message"), [
    ({"two": 0.6}, "must sum to 1, got 1.2"),
    ({"one": 0.5, "count": -0.1, "two": 0.6}, "count must be a number in"),
    ({"relation": 0.8, "positions": 0.5}, "must be <= 1"),
    ({"three": 0.1}, "unknown key 'three' in the synthetic mix; valid keys: one, count, two"),
    ({"one": "half"}, "one must be a number"),
    (0.5, "must be a table"),
])
def test_bad_scene_mix_is_a_clear_error(mix: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainSet(64, 10, mix=mix)  # type: ignore[arg-type]
    assert SceneMix() == SceneMix.from_options({})
