"""The embedded default model sumie-tiny: found without a model argument, loaded by the ordinary loader, and good.

These tests run the shipped weights (sumie/data/sumie-tiny.safetensors) on the CPU: a 64-px image takes well
under a second, so the default suite can afford to check that the model draws what a prompt asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sumie
from sumie.checkpoints import embedded
from sumie.checkpoints.embedded import DEFAULT_MODEL, embedded_path, resolve_model
from sumie.checkpoints.io import file_metadata
from sumie.checkpoints.loader import load_models
from sumie.cli.main import main
from sumie.errors import ConfigError
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams
from sumie.tiny.adherence import score


def test_resolve_model_names_and_paths(tmp_path: Path) -> None:
    path = embedded_path()
    assert path.name == "sumie-tiny.safetensors" and path.parent.name == "data" and path.is_file()
    assert resolve_model(None) == path and resolve_model(DEFAULT_MODEL) == path
    assert resolve_model(tmp_path / "x.safetensors") == tmp_path / "x.safetensors"  # anything else is a path
    with pytest.raises(ConfigError, match="no embedded model named 'sd15'"):
        embedded_path("sd15")


def test_missing_embedded_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(embedded._FILES, DEFAULT_MODEL, "gone.safetensors")
    with pytest.raises(ConfigError, match="missing from this install.*reinstall Sumie"):
        sumie.load()
    assert main(["generate", "a red circle", "-q"]) == 2
    err = capsys.readouterr().err
    assert "missing from this install" in err and "Traceback" not in err


def test_shipped_file_is_small_single_file_with_its_config() -> None:
    path = embedded_path()
    assert path.stat().st_size < 25 * 2**20  # 24.2 MiB: fp16, the token embedding in fp8 (sumie convert)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    token_table = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert dtypes.pop(token_table) == "F8_E4M3" and set(dtypes.values()) == {"F16"}
    assert meta["sumie.resolution"] == "64" and json.loads(meta["sumie.config"])["family"] == "sd1"
    assert any(k.startswith("model.diffusion_model.") for k in keys)  # original single-file key layout
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)


@pytest.fixture(scope="module")
def engine() -> Engine:
    e = sumie.load()
    e.show_progress = False
    return e


def test_default_load_is_64px_sd1(engine: Engine) -> None:
    assert engine.models.config.family == "sd1" and engine.models.native_size == 64
    assert engine.models.source == str(embedded_path())
    image = engine.generate(GenerationParams(prompt="a red circle", seed=1, steps=4)).images[0]
    assert image.size == (64, 64)


def test_the_file_recommends_its_cfg_scale(engine: Engine, tmp_path: Path) -> None:
    """sumie-tiny carries sumie.cfg_scale = 3 (measured best); a request without a scale uses it, one with wins."""
    assert engine.models.cfg_scale == 3.0 and engine.default_cfg_scale == 3.0
    plain = engine.generate(GenerationParams(prompt="a red circle", seed=1, steps=3))
    assert plain.params.cfg_scale == 3.0 and "CFG scale: 3," in plain.infotexts[0]
    explicit = engine.generate(GenerationParams(prompt="a red circle", seed=1, steps=3, cfg_scale=7.0))
    assert explicit.params.cfg_scale == 7.0 and "CFG scale: 7," in explicit.infotexts[0]
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(explicit.images[0]))
    tensors, meta = load_file(embedded_path()), file_metadata(embedded_path())
    for value, expected in (("abc", 7.0), ("-1", 7.0), ("nan", 7.0), ("4.5", 4.5)):
        path = tmp_path / f"m-{value}.safetensors"
        save_file(tensors, str(path), metadata={**meta, "sumie.cfg_scale": value})
        assert Engine(load_models(path)).default_cfg_scale == expected


@pytest.mark.parametrize("prompt", ["a red circle on a black background", "a blue square on a white background"])
def test_default_model_follows_background_and_colour(engine: Engine, prompt: str) -> None:
    """Default settings (CFG 3 from the file), seeds 0-7: the stated background is right in at least 6 images and
    the object's colour in at least 6 (measured with the shipped file: 8/8 and 8/8 for both prompts)."""
    images = engine.generate(GenerationParams(prompt=prompt, seed=0, batch_size=8)).images
    scores = [score(image, prompt) for image in images]
    background, colour = sum(s["background"] for s in scores), sum(s["color"] for s in scores)
    assert background >= 6 and colour >= 6, (background, colour)


def test_cli_generate_and_info_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle on a black background", "--seed", "3", "-o", str(out), "-q"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and "Model: sumie-tiny" in image.info["parameters"]
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1" and info["stored_dtype"] == "float16"


@pytest.mark.parametrize("prompt", ["a green circle in the top right on a white background",
                                    "a large orange square at the bottom left on black"])
def test_default_model_puts_the_shape_where_the_prompt_says(engine: Engine, prompt: str) -> None:
    """Default settings, seeds 0-7: the shape is in the named cell of the 3x3 grid in at least 6 images (measured
    with v4, v5 and the shipped file v6: 8/8 for both prompts; v3 placed shapes right about a quarter of the time)."""
    images = engine.generate(GenerationParams(prompt=prompt, seed=0, batch_size=8)).images
    placed = sum(score(image, prompt)["position"] for image in images)
    assert placed >= 6, placed


def test_default_model_draws_two_objects_with_their_own_colours(engine: Engine) -> None:
    """Default settings, seeds 0-7, a two-object prompt: each object's colour and shape right in at least 6 images
    (measured with the shipped file v6: 8/8 for all four, both objects present in 7 of 8)."""
    prompt = "a yellow square and a blue triangle on a white background"
    scores = [score(image, prompt) for image in engine.generate(GenerationParams(prompt=prompt, seed=0,
                                                                                 batch_size=8)).images]
    right = {k: sum(s[k] for s in scores) for k in ("color_1", "shape_1", "color_2", "shape_2", "count")}
    assert min(right.values()) >= 6, right
