"""The embedded default model sumie-tiny: found without a model argument, loaded by the ordinary loader, and good.

These tests run the shipped weights (sumie/data/sumie-tiny.safetensors) on the CPU: a 64-px image takes well
under a second, so the default suite can afford to check that the model draws what a prompt asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

import sumie
from sumie.checkpoints import embedded
from sumie.checkpoints.embedded import DEFAULT_MODEL, embedded_path, resolve_model
from sumie.errors import ConfigError
from sumie.eval.adherence import score
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams
from sumie.serve.cli import main


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


def test_shipped_file_is_small_fp16_single_file_with_its_config() -> None:
    path = embedded_path()
    assert path.stat().st_size < 32 * 2**20  # 27.2 MiB today (the issue aims at 25 MB: see the model card)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F16"}
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


@pytest.mark.parametrize("prompt", ["a red circle on a black background", "a blue square on a white background"])
def test_default_model_follows_background_and_colour(engine: Engine, prompt: str) -> None:
    """Default settings, seeds 0-7: the stated background is right in at least 6 images and the object's colour
    in at least 5 (measured with the shipped file: background 8 and 8, colour 8 and 7). Shapes and positions are
    not yet reliable (docs/sumie-tiny.md), so not asserted."""
    images = engine.generate(GenerationParams(prompt=prompt, seed=0, batch_size=8)).images
    scores = [score(image, prompt) for image in images]
    background, colour = sum(s["background"] for s in scores), sum(s["color"] for s in scores)
    assert background >= 6 and colour >= 5, (background, colour)


def test_cli_generate_and_info_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle on a black background", "--seed", "3", "-o", str(out), "-q"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and "Model: sumie-tiny" in image.info["parameters"]
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1" and info["stored_dtype"] == "float16"
