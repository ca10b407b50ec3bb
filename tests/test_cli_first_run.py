"""What a new user hits first in the CLI: bad flags are one ``sumie: error:`` line (exit 2, no traceback, nothing
written), ignored flags are one ``sumie: warning:`` line, checkpoint writers create folders and fail cleanly, and
--width/--height follow the model's VAE factor (4 for the embedded sumie-tiny, 8 for SD).

Exit codes and stderr come from real ``python -m sumie`` processes; image contents from in-process runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sumie.checkpoints.io import load_state_dict
from sumie.checkpoints.loader import stored_dtype, vae_downscale
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.pipelines.infotext import parse_infotext
from sumie.pipelines.output import read_png_info

torch.set_num_threads(1)

FAST = ["--steps", "2", "--dtype", "fp32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random SD1 checkpoint (VAE factor 8) as .safetensors and as a torch.save pickle, and its VAE."""
    root = tmp_path_factory.mktemp("first_run")
    sd = random_single_file(TINY["sd1"], seed=0)
    model = root / "tiny_sd1.safetensors"
    save_file(sd, str(model))
    ckpt = root / "tiny_sd1.ckpt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, ckpt)
    vae = root / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")},
              str(vae))
    return {"model": model, "ckpt": ckpt, "vae": vae}


def sumie_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m sumie ARGS`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sumie", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def all_files(folder: Path) -> list[str]:
    """Every file and folder under folder, hidden and temporary ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("sumie: error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


BAD_FLAGS = {  # arguments (model: "tiny" = the embedded sumie-tiny), the words of the message
    "seed too large": (["--seed", "99999999999999999999"],
                       ["--seed 99999999999999999999 is out of range", "18446744073709551615", "-1 for a random"]),
    "seed + k too large": (["--seed", str(2**64 - 1), "--batch-size", "2", "-o", "out"],
                           ["with 2 images", "use a seed up to 18446744073709551614"]),
    "negative seed": (["--seed", "-5"], ["--seed must be -1 (random) or a number from 0 to"]),
    "negative eta": (["--sampler", "Euler a", "--eta", "-3"], ["--eta must be in [0, 100]", "got -3.0"]),
    "eta nan": (["--sampler", "Euler a", "--eta", "nan"], ["--eta must be in [0, 100]"]),
    "s-noise negative": (["--sampler", "Euler a", "--s-noise", "-1"], ["--s-noise must be in [0, 100]"]),
    "eta without eta": (["--sampler", "DPM++ 2M", "--eta", "0.5"], ["sampler DPM++ 2M has no eta; leave --eta out"]),
    "s-noise without s-noise": (["--sampler", "DPM++ 2M", "--s-noise", "0.5"],
                                ["sampler DPM++ 2M has no sigma noise; leave --s-noise out", "Euler a"]),
    "format against suffix": (["--format", "webp", "-o", "e.png"],
                              ["--format webp does not match -o e.png (a PNG file name)", "e.webp"]),
    "width on sumie-tiny": (["--width", "61", "--height", "60", "--model", "tiny"],
                            ["--width 61 is not a multiple of 4; use 60 or 64"]),
    "height on sd1 (pickle: checked after the load)": (["--height", "60", "--model", "{ckpt}"],
                                                       ["--height 60 is not a multiple of 8; use 56 or 64"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_error_line_and_nothing_written(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    argv, words = BAD_FLAGS[case]
    argv = [a.format(ckpt=files["ckpt"]) for a in argv]
    model = [] if "--model" in argv else ["--model", str(files["model"])]
    if "--model" in argv and argv[argv.index("--model") + 1] == "tiny":
        i = argv.index("--model")
        argv = argv[:i] + argv[i + 2 :]  # no --model: the embedded sumie-tiny
    out = [] if "-o" in argv else ["-o", "out.png"]
    r = sumie_cli("generate", "a red circle", *model, *FAST, *out, *argv, cwd=tmp_path)
    assert_one_error(r, *words)
    assert all_files(tmp_path) == []  # no image, no temporary file, no folder


def test_checkpoint_writers_create_missing_folders(files: dict[str, Path], tmp_path: Path) -> None:
    r = sumie_cli("convert", files["model"], "-o", "new/deeper/x.safetensors", "--dtype", "fp16", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = tmp_path / "new" / "deeper" / "x.safetensors"
    assert all_files(tmp_path) == ["new", "new/deeper", "new/deeper/x.safetensors"]
    assert stored_dtype(out) == "float16" and set(load_state_dict(out)) == set(load_state_dict(files["model"]))
    r = sumie_cli("random-checkpoint", "sd1", "--tiny", "made/r.safetensors", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "made" / "r.safetensors").is_file(), r.stderr
    r = sumie_cli("bake-vae", files["model"], files["vae"], "-o", "baked/b.safetensors", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "baked" / "b.safetensors").is_file(), r.stderr


@pytest.mark.parametrize("command", ["convert", "random-checkpoint", "bake-vae"])
def test_checkpoint_writers_fail_cleanly(files: dict[str, Path], tmp_path: Path, command: str) -> None:
    """A parent "folder" that is a file: one error line, the file untouched, no temporary file, no folder."""
    (tmp_path / "blocker").write_bytes(b"keep me")
    target = "blocker/sub/x.safetensors"
    argv = {"convert": [files["model"], "-o", target, "--dtype", "fp16"],
            "random-checkpoint": ["sd1", "--tiny", target],
            "bake-vae": [files["model"], files["vae"], "-o", target]}[command]
    r = sumie_cli(command, *argv, cwd=tmp_path)
    assert_one_error(r, f"cannot write {target}: ", "check that the folder is writable")
    assert all_files(tmp_path) == ["blocker"] and (tmp_path / "blocker").read_bytes() == b"keep me"


def test_random_checkpoint_seed_range(tmp_path: Path) -> None:
    r = sumie_cli("random-checkpoint", "sd1", "--tiny", "r.safetensors", "--seed", str(2**64), cwd=tmp_path)
    assert_one_error(r, "--seed must be a number from 0 to 18446744073709551615")
    assert all_files(tmp_path) == []


def test_a_failed_write_removes_the_folders_it_made(tmp_path: Path) -> None:
    from sumie.checkpoints.io import save_safetensors_atomic

    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory, after the folder exists
        save_safetensors_atomic({"a": shared, "b": shared}, tmp_path / "a" / "b" / "x.safetensors")
    assert all_files(tmp_path) == []


def test_stored_dtype_counts_pickle_tensors(files: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed.ckpt"  # by elements: 2,010 fp32 against 500 fp16 (the last tensors: 10 and 500)
    torch.save({"a": torch.zeros(1000), "b": torch.zeros(1000), "c": torch.zeros(10),
                "d": torch.zeros(500, dtype=torch.float16), "i": torch.zeros(9000, dtype=torch.int64)}, mixed)
    assert stored_dtype(mixed) == "float32"
    assert stored_dtype(files["ckpt"]) == "float16"  # every floating tensor of the pickle is fp16
    assert stored_dtype(files["model"]) == "float32"
    assert main(["info", str(files["ckpt"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_dtype"] == "float16"


def test_vae_factor_from_headers(files: dict[str, Path]) -> None:
    from sumie.checkpoints.embedded import embedded_path

    assert vae_downscale(embedded_path()) == 4  # sumie-tiny's VAE has three levels
    assert vae_downscale(files["model"]) == 8
    assert vae_downscale(embedded_path(), vae=files["vae"]) == 8  # a --vae decides
    assert vae_downscale(files["ckpt"]) is None  # a pickle would have to be read in full: checked after the load


def test_width_60_on_sumie_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sixty.png"
    assert main(["generate", "a red circle on a white background", "--width", "60", "--height", "60", *FAST,
                 "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (60, 60)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_quality_with_png_warns(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(files["model"]), "--width", "64", "--height", "64", "--seed", "3"]
    assert main(["generate", "x", *model, *FAST, "--quality", "90", "-o", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sumie: warning: --quality 90 is ignored: PNG is lossless (--quality sets JPEG and WebP quality; "
                   "use --format jpg or webp, or an -o name ending in .jpg or .webp)"]
    assert main(["generate", "x", *model, *FAST, "--quality", "90", "-o", str(tmp_path / "dir")]) == 0
    assert "--quality 90 is ignored" in capsys.readouterr().err  # a folder of PNGs (the default --format) too
    # a --format that agrees with the suffix is fine (jpg and jpeg are one format), and --quality applies
    assert main(["generate", "x", *model, *FAST, "--format", "jpg", "--quality", "90",
                 "-o", str(tmp_path / "b.jpeg")]) == 0
    assert capsys.readouterr().err == ""
    with Image.open(tmp_path / "b.jpeg") as im:
        assert im.format == "JPEG"


def test_s_noise_is_recorded_only_where_the_sampler_uses_it(files: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(files["model"]), "--width", "64", "--height", "64", "--seed", "4"]

    def run(name: str, *extra: str) -> dict[str, object]:
        assert main(["generate", "x", *model, *FAST, *extra, "-o", str(tmp_path / name)]) == 0
        return parse_infotext(read_png_info(tmp_path / name) or "")

    plain = run("euler.png", "--sampler", "Euler")
    ignored = run("euler_s.png", "--sampler", "Euler", "--s-noise", "0.5")
    assert capsys.readouterr().err.strip() == ("sumie: warning: --s-noise has no effect with sampler Euler (it scales "
                                               "only churn noise, which is off); it is ignored and not written to "
                                               "the image's parameters")
    assert "Sigma noise" not in ignored and ignored == plain
    assert np.array_equal(pixels(tmp_path / "euler.png"), pixels(tmp_path / "euler_s.png"))
    used = run("ancestral.png", "--sampler", "Euler a", "--s-noise", "0.5")
    assert capsys.readouterr().err == "" and used["Sigma noise"] == "0.5"
    off = run("eta0.png", "--sampler", "Euler a", "--eta", "0", "--s-noise", "0.5")
    assert "at eta 0 it adds no noise" in capsys.readouterr().err
    assert "Sigma noise" not in off and off["Eta"] == "0"


def test_the_api_reports_an_ignored_s_noise_in_the_result(files: dict[str, Path]) -> None:
    import sumie
    from sumie.pipelines.params import GenerationParams

    engine = sumie.load(files["model"])
    engine.show_progress = False
    result = engine.generate(GenerationParams(prompt="x", sampler="Euler", s_noise=0.5, steps=1, seed=1))
    assert len(result.warnings) == 1 and "s_noise has no effect with sampler Euler" in result.warnings[0]
    assert "Sigma noise" not in result.infotexts[0]
    with pytest.raises(ConfigError, match=r"^width 60 is not a multiple of 8; use 56 or 64"):
        engine.generate(GenerationParams(prompt="x", width=60, height=64, steps=1))
