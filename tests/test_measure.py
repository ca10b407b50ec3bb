"""``sumie bench`` and ``sumie eval adherence`` on a tiny random model: structure and counts, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_file(random_single_file(TINY["sd1"], seed=3), str(path))
    return path


def test_bench_reports_where_the_time_goes(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--model", str(tiny_model), "--steps", "3", "--width", "64", "--height", "64", "--runs", "1",
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == "64x64" and report["steps"] == 3 and report["family"] == "sd1"
    assert report["unet_calls"] == 3  # DPM++ 2M: one (batched cond+uncond) UNet call a step
    assert 0 < report["unet_seconds"] <= report["seconds_per_image"]


def test_eval_adherence_compares_cfg_scales(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "adherence", "--model", str(tiny_model), "--n-one", "2", "--n-two", "1", "--steps", "2",
               "--cfg-scale", "1", "7", "--resolution", "64", "--json"])
    assert rc == 0
    reports = json.loads(capsys.readouterr().out)
    assert set(reports) == {"1.0", "7.0"}
    for r in reports.values():
        assert r["all"]["n_images"] == 3 and 0.0 <= r["all"]["attributes_right"] <= 1.0
        assert r["one"]["n_images"] == 2 and r["two"]["n_images"] == 1
        assert r["settings"]["split"] == "heldout"


@pytest.mark.parametrize("split", ["seen", "bar"])
def test_eval_adherence_on_other_splits(tiny_model: Path, split: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "adherence", "--model", str(tiny_model), "--n-one", "1", "--n-two", "1", "--steps", "2",
               "--split", split, "--resolution", "64"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith(f"CFG 7.0 ({split} prompts): attributes right: one-object ") and "(2 images" in out


def test_eval_adherence_takes_the_cfg_rescale(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "adherence", "--model", str(tiny_model), "--n-one", "1", "--n-two", "0", "--steps", "2",
            "--resolution", "64", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["7.0"]
    assert main([*argv, "--cfg-rescale", "0.7"]) == 0
    rescaled = json.loads(capsys.readouterr().out)["7.0"]
    assert plain["settings"]["cfg_rescale"] == 0.0 and rescaled["settings"]["cfg_rescale"] == 0.7
    assert plain["settings"]["cfg_scale"] == rescaled["settings"]["cfg_scale"] == 7.0  # the file names no default


def test_eval_adherence_ceiling_scores_vae_round_trips_of_ground_truth(capsys: pytest.CaptureFixture[str]) -> None:
    import sumie
    from sumie.pipelines import vae_io
    from sumie.pipelines.images import to_tensor
    from sumie.tiny.adherence import default_prompts, evaluate, run_ceiling
    from sumie.tiny.synthetic import render_caption

    engine = sumie.load()  # the embedded sumie-tiny: a trained VAE, so the round trips keep most attributes
    prompts = default_prompts(3, 2, seed=0, split="bar")
    report = run_ceiling(engine.models.vae, prompts, seed=5, resolution=64)
    images = []
    for i, (caption, _) in enumerate(prompts):  # the same computation by hand: render with seed 5 + i, encode, decode
        latent = vae_io.encode(engine.models.vae, to_tensor(render_caption(caption, 64, seed=5 + i)[0]))
        images.append(vae_io.decode_images(engine.models.vae, latent)[0])
    by_hand = evaluate(images, [spec for _, spec in prompts])
    assert report["all"] == by_hand["all"] and [r["scores"] for r in report["records"]] == by_hand["scores"]
    assert report["settings"]["reference"].startswith("vae round trip") and report["all"]["n_images"] == 5
    truth = evaluate([render_caption(c, 64, seed=5 + i)[0] for i, (c, _) in enumerate(prompts)],
                     [spec for _, spec in prompts])
    assert truth["all"]["attributes_right"] == 1.0 > by_hand["all"]["attributes_right"]  # the VAE is what costs
    assert main(["eval", "adherence", "--ceiling", "--split", "bar", "--n-one", "2", "--n-two", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VAE round trip of ground truth (bar prompts): attributes right: one-object ")
    assert main(["eval", "adherence", "--ceiling", "--lora", "x.safetensors"]) == 2
    assert "--ceiling" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--steps", "0"], ["eval", "adherence", "--steps", "0"],
                                  ["eval", "adherence", "--n-one", "0", "--n-two", "0"],
                                  ["eval", "adherence", "--cfg-rescale", "1.5"],
                                  ["bench", "--vae", "no-such-vae.safetensors"],
                                  ["eval", "adherence", "--vae", "no-such-vae.safetensors"]])
def test_bad_values_are_one_line_errors(tiny_model: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--model", str(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sumie: error: ")
    assert "--vae" not in argv or "no-such-vae.safetensors: no such file" in err[0]  # the VAE is loaded
