"""The adherence detector: right on clean renders, wrong on perturbed ones; run_adherence with fake engines."""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sumie.errors import ConfigError
from sumie.pipelines.params import GenerationParams
from sumie.tiny.adherence import default_prompts, detect, evaluate, label_components, run_adherence, score
from sumie.tiny.synthetic import (
    BACKGROUNDS,
    COLORS,
    MIN_CONTRAST,
    SHAPES,
    SIZE_RANGES,
    Instance,
    Scene,
    TrainSet,
    heldout_prompts,
    parse_caption,
    realize,
    render,
    render_caption,
    sample_spec,
    seen_prompts,
    to_tensor,
)


def _accuracy(scores: list[dict[str, bool]]) -> float:
    values = [v for s in scores for v in s.values()]
    return sum(values) / len(values)


@pytest.mark.parametrize("resolution, n", [(64, 300), (128, 80)])
def test_detector_is_right_on_clean_renders(resolution: int, n: int) -> None:
    ds = TrainSet(resolution, n, seed=21, heldout=None)
    full, stated = [], []
    for i in range(n):
        s = ds.sample(i)
        det = detect(s.image)
        full.append(score(s.image, s.scene.full_spec(), det))  # every instance's colour, shape, size, cell
        stated.append(score(s.image, s.spec, det))
    assert _accuracy(full) >= 0.99 and _accuracy(stated) >= 0.99
    for attr in ("color", "shape", "size", "position", "count", "background", "relation"):
        values = [v for s in full for k, v in s.items() if k.split("_")[0] == attr]
        assert len(values) >= 5 and sum(values) / len(values) >= 0.98, attr


def _contrasting(colors: list[str], background: str) -> list[str]:
    bg = np.array(BACKGROUNDS[background], dtype=float)
    return [c for c in colors if np.linalg.norm(np.array(COLORS[c], dtype=float) - bg) >= MIN_CONTRAST]


def _relation_holds(rel: str, cell_a: int, cell_b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(cell_a, 3), divmod(cell_b, 3)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def _move(inst: Instance, cell: int) -> Instance:
    row, col = divmod(cell, 3)
    return dataclasses.replace(inst, cell=cell, cx=(col + 0.5) / 3, cy=(row + 0.5) / 3)


def _perturb(scene: Scene, what: str, rng: random.Random) -> Scene:
    """The scene with one instance's ``what`` changed (or an extra object / another background)."""
    inst = scene.objects[0][0]
    free = [c for c in range(9) if c not in {i.cell for i in scene.instances}]
    if what == "color":
        new = dataclasses.replace(inst, color=rng.choice(_contrasting([c for c in COLORS if c != inst.color],
                                                                      scene.background)))
    elif what == "shape":
        new = dataclasses.replace(inst, shape=rng.choice([s for s in SHAPES if s != inst.shape]))
    elif what == "size":
        size = "small" if inst.size == "large" else "large"
        new = dataclasses.replace(inst, size=size, extent=float(np.mean(SIZE_RANGES[size])))
    elif what == "position":
        if scene.relation is not None:  # keep the relation true: only the position may be wrong
            other = scene.objects[1][0].cell
            free = [c for c in free if _relation_holds(scene.relation, c, other)] or free
        new = _move(inst, rng.choice(free))
    elif what == "count":
        extra = _move(inst, rng.choice(free))
        return dataclasses.replace(scene, objects=((*scene.objects[0], extra), *scene.objects[1:]))
    else:  # background
        colors = [i.color for i in scene.instances]
        options = [b for b in BACKGROUNDS if b != scene.background and len(_contrasting(colors, b)) == len(colors)]
        return dataclasses.replace(scene, background=rng.choice(options))
    return dataclasses.replace(scene, objects=((new, *scene.objects[0][1:]), *scene.objects[1:]))


@pytest.mark.parametrize("what", ["color", "shape", "size", "position", "count", "background"])
def test_detector_catches_perturbed_renders(what: str) -> None:
    rng = random.Random(f"perturb:{what}")
    for trial in range(40):
        spec = sample_spec(rng, None, kind="one" if trial % 2 else "two")
        scene = realize(spec, rng)
        full = scene.full_spec()
        assert all(score(render(scene, 64), full).values())
        bad = score(render(_perturb(scene, what, rng), 64), full)
        key = what if what in ("count", "background") or len(full.objects) == 1 else f"{what}_1"
        assert bad[key] is False, (trial, what, bad)
        others = {k: v for k, v in bad.items() if k != key}
        assert all(others.values()), (trial, what, bad)  # only the perturbed attribute is wrong


def test_relation_is_checked() -> None:
    spec = parse_caption("a red circle to the left of a blue square")
    scene = realize(spec, random.Random(3))
    assert score(render(scene, 64), spec)["relation"]
    a, b = scene.objects[0][0], scene.objects[1][0]
    swapped = dataclasses.replace(scene, objects=((_move(a, b.cell),), (_move(b, a.cell),)))
    result = score(render(swapped, 64), spec)
    assert result["relation"] is False and result["color_1"] and result["shape_2"]


def _bfs_labels(mask: np.ndarray) -> np.ndarray:
    """Reference 4-connected labelling by breadth-first search (label = smallest flat index)."""
    h, w = mask.shape
    out = np.full(mask.shape, -1, dtype=np.int64)
    for start in range(h * w):
        y, x = divmod(start, w)
        if not mask[y, x] or out[y, x] >= 0:
            continue
        out[y, x] = start
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and out[ny, nx] < 0:
                    out[ny, nx] = start
                    queue.append((ny, nx))
    return out


def test_connected_components_match_bfs() -> None:
    gen = np.random.default_rng(0)
    for density in (0.3, 0.55, 0.7):
        mask = gen.random((40, 33)) < density
        assert np.array_equal(label_components(mask), _bfs_labels(mask))
    spiral = np.zeros((21, 21), dtype=bool)  # one long winding component
    spiral[::4, 1:-1] = True
    spiral[1::8, -2] = spiral[3::8, -2] = spiral[5::8, 1] = spiral[7::8, 1] = True
    assert np.array_equal(label_components(spiral), _bfs_labels(spiral))


def test_noise_and_blank_images_score_low() -> None:
    gen = np.random.default_rng(1)
    prompts = heldout_prompts(20, "one") + heldout_prompts(20, "two")
    noise = [gen.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in prompts]
    assert evaluate(noise, [s for _, s in prompts])["all"]["attributes_right"] < 0.35
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    result = score(blank, parse_caption("two red circles on a gray background"))
    assert result == {"color": False, "shape": False, "count": False, "background": True}


def test_inputs_agree_and_errors() -> None:
    image, _ = render_caption("a small green circle at the bottom and a big orange square", 64, seed=2)
    spec = parse_caption("a small green circle at the bottom and a big orange square")
    as_pil = score(image, spec)
    assert all(as_pil.values())
    assert score(np.asarray(image), spec) == as_pil == score(to_tensor(image), spec)
    assert score(image, "a small green circle at the bottom and a big orange square") == as_pil
    with pytest.raises(ConfigError, match="spec"):
        evaluate([image], [])
    with pytest.raises(ConfigError, match="shape"):
        score(torch.zeros(64, 64), spec)


class _RenderEngine:
    """Fake engine: draws the prompt's ground truth (or noise), recording the params it was given."""

    default_cfg_scale = 4.5

    def __init__(self, noise: bool = False) -> None:
        self.noise, self.calls = noise, []

    def generate(self, params: GenerationParams) -> SimpleNamespace:
        self.calls.append(params)
        size = params.width or 64
        if self.noise:
            pixels = np.random.default_rng(params.seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
            return SimpleNamespace(images=[Image.fromarray(pixels)])
        return SimpleNamespace(images=[render_caption(params.prompt, size, params.seed)[0]])


def test_run_adherence_with_fake_engines() -> None:
    prompts = heldout_prompts(15, "one", seed=1) + heldout_prompts(15, "two", seed=1)
    engine = _RenderEngine()
    steps_seen = []
    report = run_adherence(engine, prompts, cfg_scale=5.0, steps=12, sampler="Euler a", seed=100, n=2, cfg_rescale=0.7,
                           progress=lambda done, total: steps_seen.append((done, total)))
    assert report["one"]["attributes_right"] >= 0.99 and report["two"]["attributes_right"] >= 0.99
    assert report["all"]["n_images"] == 60 and steps_seen[-1] == (60, 60)
    assert {"color", "shape", "count"} <= set(report["one"]["per_attribute"])
    assert "relation" in report["two"]["per_attribute"] or "position" in report["two"]["per_attribute"]
    assert [c.seed for c in engine.calls] == list(range(100, 160))
    assert {(c.cfg_scale, c.cfg_rescale, c.steps, c.sampler, c.width) for c in engine.calls} == {
        (5.0, 0.7, 12, "Euler a", None)}
    assert report["records"][3]["prompt"] == prompts[1][0] and report["records"][3]["seed"] == 103
    assert report["settings"]["n_prompts"] == 30 and report["seconds_per_image"] > 0
    noisy = run_adherence(_RenderEngine(noise=True), prompts, seed=100, resolution=64)
    assert noisy["one"]["attributes_right"] < 0.35 and noisy["two"]["attributes_right"] < 0.35
    assert noisy["settings"]["cfg_scale"] == 4.5 and noisy["settings"]["cfg_rescale"] == 0.0  # None: the model's
    with pytest.raises(ConfigError):
        run_adherence(engine, [], seed=0)
    by_caption = run_adherence(engine, ["two blue squares", "a red circle above a green square"], resolution=128)
    assert by_caption["all"]["attributes_right"] == 1.0 and engine.calls[-1].width == 128


def test_clean_renders_of_heldout_prompts_score_perfectly_at_128() -> None:
    prompts = heldout_prompts(25, "one", seed=8) + heldout_prompts(25, "two", seed=8)
    images = [render_caption(c, 128, seed=k)[0] for k, (c, _) in enumerate(prompts)]
    report = evaluate(images, [s for _, s in prompts])
    assert report["all"]["images_all_right"] == 1.0
    assert report["one"]["n_images"] == 25 and report["two"]["n_images"] == 25


def test_default_prompts_splits() -> None:
    assert default_prompts(3, 2, seed=5) == heldout_prompts(3, "one", 5) + heldout_prompts(2, "two", 5)
    assert default_prompts(3, 2, seed=5, split="seen") == seen_prompts(3, "one", 5) + seen_prompts(2, "two", 5)
    with pytest.raises(ConfigError, match="unknown prompt split 'train'; use heldout or seen"):
        default_prompts(split="train")
