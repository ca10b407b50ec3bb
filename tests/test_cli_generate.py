"""The generation commands of the ``sumie`` CLI on a tiny random SD1 checkpoint (64x64, 2-3 steps).

A few runs go through a real subprocess (exit codes, one-line errors without traceback, a fresh process re-creating
an image bit for bit); the rest call :func:`sumie.cli.main.main` in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from safetensors.torch import save_file

import sumie.cli.main as cli
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.models.taesd import TAESD
from sumie.pipelines.control import ProgressEvent
from sumie.pipelines.infotext import parse_infotext
from sumie.pipelines.output import read_png_info

FAST = ["--width", "64", "--height", "64", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint, a TAESD file, an init image and masks of its size and of another size."""
    root = tmp_path_factory.mktemp("cli")
    model = root / "tiny_sd1.safetensors"
    save_file(random_single_file(TINY["sd1"], seed=0), str(model))
    taesd = root / "taesd.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in TAESD().state_dict().items()}, str(taesd))
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    ImageDraw.Draw(image).ellipse((10, 10, 50, 40), fill=(20, 60, 220))
    image.save(root / "init.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    mask.save(root / "mask.png")
    mask.resize((32, 32)).save(root / "small_mask.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    return {"model": model, "taesd": taesd, "image": root / "init.png", "mask": root / "mask.png",
            "small_mask": root / "small_mask.png", "broken": root / "broken.png"}


def sumie_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m sumie ARGS`` in a fresh process (on the suite's thread count: OMP_NUM_THREADS, see conftest.py)."""
    return subprocess.run([sys.executable, "-m", "sumie", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def all_files(folder: Path) -> list[str]:
    """Every file under folder, hidden and temporary ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------- subprocess runs


def test_generate_writes_pngs_with_parameters(files: dict[str, Path], tmp_path: Path) -> None:
    r = sumie_cli("generate", "a cat <hypernet:detail:0.7>, best quality", "--negative-prompt", "blurry", "--seed",
                  "42", "--batch-size", "2", "--sampler", "Euler a", "--model", files["model"], *FAST, "-o", "out",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all_files(tmp_path / "out") == ["00000-42.png", "00001-43.png"]  # A1111 numbering, seed + k
    assert r.stdout.split() == ["wrote", str(Path("out/00000-42.png")), "wrote", str(Path("out/00001-43.png"))]
    # tags of an unsupported kind: one clear warning, the tag stays in the metadata (A1111 writes the prompt as typed)
    lines = [line for line in r.stderr.splitlines() if "<hypernet:detail:0.7>" in line]
    assert len(lines) == 1 and lines[0].startswith("sumie: warning: extra networks of kind 'hypernet' are not "
                                                   "supported")
    assert "Traceback" not in r.stderr
    with Image.open(tmp_path / "out" / "00001-43.png") as im:
        assert im.format == "PNG" and im.size == (64, 64)
        text = im.info["parameters"]
    fields = parse_infotext(text)
    assert fields["Prompt"] == "a cat <hypernet:detail:0.7>, best quality"
    assert fields["Negative prompt"] == "blurry"
    assert (fields["Steps"], fields["Sampler"], fields["Seed"], fields["Size-1"]) == ("2", "Euler a", "43", "64")
    assert fields["Model"] == "tiny_sd1"

    r = sumie_cli("pnginfo", "out/00001-43.png", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == text + "\n"


def test_from_png_recreates_the_image_bit_for_bit(files: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first.png"
    assert main(["generate", "a lighthouse, (stormy sea:1.2)", "-n", "fog", "--seed", "7", "--cfg-scale", "5.5",
                 "--sampler", "DPM++ 2M", "--scheduler", "Karras", "--subseed", "3", "--subseed-strength", "0.3",
                 "--model", str(files["model"]), *FAST, "-o", str(first)]) == 0
    r = sumie_cli("generate", "--from-png", first, "--model", files["model"], "--dtype", "fp32", "--device", "cpu",
                  "-q", "-o", "again.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # same model, every field applied: no warning
    again = tmp_path / "again.png"
    assert np.array_equal(pixels(first), pixels(again))
    assert read_png_info(again) == read_png_info(first)

    # options given on the command line override the stored ones
    assert main(["generate", "--from-png", str(first), "--seed", "8", "--model", str(files["model"]), "-q",
                 "-o", str(tmp_path / "other.png")]) == 0
    other = parse_infotext(read_png_info(tmp_path / "other.png") or "")
    assert other["Seed"] == "8" and other["Prompt"] == "a lighthouse, (stormy sea:1.2)" and other["CFG scale"] == "5.5"
    assert not np.array_equal(pixels(first), pixels(tmp_path / "other.png"))


BAD_INPUTS = {  # command and arguments (after the FAST options, so they override them), message
    "unknown sampler": (["generate", "x", "--sampler", "Euler z"], "unknown sampler 'Euler z'"),
    "size not a multiple of 8": (["generate", "x", "--width", "60"], "--width 60 is not a multiple of 8; use 56 or 64"),
    "steps below 1": (["generate", "x", "--steps", "0"], "--steps must be at least 1"),
    "mask of another size": (["inpaint", "{image}", "{small_mask}", "x"], "is 32x32 but the image is 64x64"),
    "unreadable image": (["img2img", "{broken}", "x"], "not an image"),
    "missing model": (["generate", "x", "--model", "{missing}"], "no such file"),
    "empty model": (["generate", "x", "--model", ""], "the model path is empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_no_file(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    argv, message = BAD_INPUTS[case]
    names = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "missing.safetensors")}
    command, *rest = [a.format(**names) for a in argv]
    r = sumie_cli(command, "--model", files["model"], *FAST, "-o", tmp_path / "out", *rest, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sumie: error: ") and message in lines[0], r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()  # no image, no temporary file, not even the folder


# ------------------------------------------------------------------------------------------- in-process runs


def test_img2img_inpaint_outpaint_run(files: dict[str, Path], tmp_path: Path) -> None:
    model = ["--model", str(files["model"])]
    out = tmp_path / "out"
    assert main(["img2img", str(files["image"]), "a dog", "--denoising-strength", "0.6", "--seed", "1", *model,
                 *FAST, "-o", str(out)]) == 0
    assert main(["inpaint", str(files["image"]), str(files["mask"]), "a dog", "--inpainting-fill", "latent_noise",
                 "--mask-blur", "2", "--seed", "2", *model, *FAST, "-o", str(out)]) == 0
    assert main(["inpaint", str(files["image"]), str(files["mask"]), "a dog", "--only-masked", "--invert-mask",
                 "--seed", "3", *model, *FAST, "-o", str(out)]) == 0
    assert main(["outpaint", str(files["image"]), "a dog", "--left", "16", "--bottom", "8", "--seed", "4", *model,
                 "--steps", "2", "-q", "-o", str(out)]) == 0
    assert all_files(out) == ["00000-1.png", "00001-2.png", "00002-3.png", "00003-4.png"]
    f = [parse_infotext(read_png_info(out / n) or "") for n in all_files(out)]
    assert f[0]["Denoising strength"] == "0.6" and "Mask blur" not in f[0]
    assert (f[1]["Masked content"], f[1]["Mask blur"]) == ("latent noise", "2")
    assert (f[2]["Inpaint area"], f[2]["Mask mode"]) == ("Only masked", "Inpaint not masked")
    with Image.open(out / "00003-4.png") as im:
        assert im.size == (80, 72)  # the canvas: 16 pixels on the left, 8 at the bottom
    assert (f[3]["Masked content"], f[3]["Denoising strength"]) == ("fill", "0.8")
    # the kept part is the original (pasted back as A1111 does) away from the seams (overlap 8 + blur radius 10)
    assert np.array_equal(pixels(out / "00003-4.png")[:40, 16 + 24 :], pixels(files["image"])[:40, 24:])
    # an img2img image re-created: the init image comes from the command line, the rest from the metadata
    assert main(["img2img", str(files["image"]), "--from-png", str(out / "00000-1.png"), *model, "-q",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(out / "00000-1.png"), pixels(tmp_path / "again.png"))
    # an inpainted image re-created with its mask settings
    assert main(["inpaint", str(files["image"]), str(files["mask"]), "--from-png", str(out / "00001-2.png"), *model,
                 "-q", "-o", str(tmp_path / "again2.png")]) == 0
    assert np.array_equal(pixels(out / "00001-2.png"), pixels(tmp_path / "again2.png"))


def test_hires_and_convention_options(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "hires.png"
    assert main(["generate", "x", "--hires-scale", "1.5", "--hires-steps", "1", "--hires-upscaler", "lanczos",
                 "--seed", "5", "--convention", "diffusers", "--model", str(files["model"]), *FAST,
                 "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (96, 96)
    f = parse_infotext(read_png_info(out) or "")
    assert (f["Hires upscale"], f["Hires steps"], f["Hires upscaler"], f["Convention"]) == (
        "1.5", "1", "Lanczos", "diffusers")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(files["model"]), "-q", "-o", str(again)]) == 0
    assert np.array_equal(pixels(out), pixels(again))


def test_outputs_never_overwrite_without_flag(files: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(files["model"])]
    target = tmp_path / "one.png"
    target.write_bytes(b"keep me")
    assert main(["generate", "x", *model, *FAST, "-o", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_bytes() == b"keep me"
    assert main(["generate", "x", "--seed", "9", *model, *FAST, "--overwrite", "-o", str(target)]) == 0
    assert parse_infotext(read_png_info(target) or "")["Seed"] == "9"
    # a folder keeps counting after the largest number in it
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "00041-1.png").write_bytes(b"old")
    assert main(["generate", "x", "--seed", "9", "--n-iter", "2", *model, *FAST, "-o", str(folder)]) == 0
    assert all_files(folder) == ["00041-1.png", "00042-9.png", "00043-10.png"]
    capsys.readouterr()
    # one file cannot hold two images; a name of a type Sumie does not write is refused
    assert main(["generate", "x", "--batch-size", "2", *model, *FAST, "-o", str(tmp_path / "two.png")]) == 2
    assert main(["generate", "x", *model, *FAST, "-o", str(tmp_path / "x.gif")]) == 2
    assert main(["generate", "x", *model, *FAST, "--quality", "0", "-o", str(tmp_path / "q.jpg")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "names one file but the run makes 2 images" in err[0] and "PNG, JPEG or WebP" in err[1]
    assert "--quality must be in [1, 100]" in err[2]
    assert not (tmp_path / "two.png").exists() and not (tmp_path / "x.gif").exists()


def test_jpeg_and_webp_outputs_carry_the_parameters(files: dict[str, Path], tmp_path: Path) -> None:
    model = ["--model", str(files["model"])]
    assert main(["generate", "x", "--seed", "5", *model, *FAST, "-o", str(tmp_path / "one.jpg")]) == 0
    assert main(["generate", "x", "--seed", "5", *model, *FAST, "--format", "webp", "--quality", "90",
                 "-o", str(tmp_path / "dir")]) == 0
    assert all_files(tmp_path / "dir") == ["00000-5.webp"]
    for path, fmt in ((tmp_path / "one.jpg", "JPEG"), (tmp_path / "dir" / "00000-5.webp", "WEBP")):
        with Image.open(path) as im:
            assert im.format == fmt and im.size == (64, 64)
        assert parse_infotext(read_png_info(path) or "")["Seed"] == "5"


def test_preview_writes_taesd_previews_and_cleans_up(files: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, tuple[int, int]]] = []
    original = cli._Outputs.preview

    def spy(self: cli._Outputs, images: list[Image.Image]) -> None:
        original(self, images)
        with Image.open(self.preview_path) as im:
            seen.append((len(images), im.size))

    monkeypatch.setattr(cli._Outputs, "preview", spy)
    out = tmp_path / "out"
    assert main(["generate", "x", "--batch-size", "2", "--preview", "--preview-every", "1", "--taesd",
                 str(files["taesd"]), "--model", str(files["model"]), *FAST, "-o", str(out)]) == 0
    assert seen == [(2, (128, 64))] * 2  # every step, the batch side by side
    assert len(all_files(out)) == 2 and not (out / "preview.png").exists()

    def broken(self: object, *args: object, **kwargs: object) -> None:
        event = ProgressEvent("first", 0, 1, 1, 2, 1, 2, 0.1, 0.1, [Image.new("RGB", (64, 64))])
        kwargs["progress"](event)  # type: ignore[operator]
        raise cli.SumieError("sampling failed")

    from sumie.pipelines.engine import Engine

    monkeypatch.setattr(Engine, "generate", broken)
    assert main(["generate", "x", "--preview", "--taesd", str(files["taesd"]), "--model", str(files["model"]),
                 *FAST, "-o", str(tmp_path / "failed")]) == 2
    assert not (tmp_path / "failed").exists()  # the preview written before the failure is gone, and its folder


def test_pnginfo_json_and_missing_parameters(files: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dog\nSteps: 3, Sampler: Euler a, CFG scale: 6, Seed: 3, "
                                "Size: 64x64, Model hash: 0123456789, Model: other")
    Image.new("RGB", (8, 8)).save(image, pnginfo=info)
    assert main(["pnginfo", str(image), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["Prompt"], d["Negative prompt"], d["Steps"], d["Size-1"]) == ("a cat", "dog", "3", "64")
    # an A1111 image (GPU noise source, another model): made again, with one warning line for each difference
    assert main(["generate", "--from-png", str(image), "--model", str(files["model"]), "-q",
                 "-o", str(tmp_path / "again.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(e.startswith("sumie: warning: ") for e in err)
    assert "RNG: GPU" in err[0] and "model 'other' (hash 0123456789)" in err[1]
    assert parse_infotext(read_png_info(tmp_path / "again.png") or "")["Seed"] == "3"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["pnginfo", str(plain)]) == 2
    assert main(["generate", "--from-png", str(plain), "--model", str(files["model"])]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("holds no generation parameters" in e for e in err)


@pytest.mark.parametrize(("argv", "message"), [
    (["--refiner-switch-at", "0.5"], "--refiner-switch-at needs --refiner"),
    (["--subseed-strength", "2"], "--subseed-strength must be in [0, 1]"),
    (["--device", "nonsense"], "unknown device 'nonsense'"),
])
def test_more_bad_options(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          argv: list[str], message: str) -> None:
    assert main(["generate", "x", "--model", str(files["model"]), "-o", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_each_network_takes_its_own_dtype(files: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sumie

    engines = []
    load = sumie.load
    monkeypatch.setattr(sumie, "load", lambda *a, **k: engines.append(load(*a, **k)) or engines[-1])
    argv = ["generate", "x", "--model", str(files["model"]), "--width", "64", "--height", "64", "--steps", "2",
            "--device", "cpu", "-q", "--dtype", "bf16", "--vae-dtype", "fp32", "--text-encoder-dtype", "fp32"]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 0
    m = engines[0].models
    assert next(m.unet.parameters()).dtype == torch.bfloat16 and m.vae.dtype == torch.float32
    assert next(m.text_encoders[0].parameters()).dtype == torch.float32
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (64, 64)
    assert main([*argv[:-6], "--dtype", "bf16", "-o", str(tmp_path / "b.png")]) == 0  # one dtype for all
    m = engines[1].models
    assert m.vae.dtype == torch.bfloat16 and next(m.text_encoders[0].parameters()).dtype == torch.bfloat16
