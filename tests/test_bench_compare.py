"""``sumie bench --compare diffusers`` on tiny random models: the rows, the parity of the two engines' images, the
diffusers configs it writes, and its errors. Structure and counts only, never timings."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sumie.checkpoints.loader import inspect_checkpoint
from sumie.checkpoints.save import random_single_file
from sumie.cli import bench_compare
from sumie.cli.bench_compare import FIELDS, RunSpec, make_random, run_compare, sampler_key
from sumie.cli.bench_diffusers import text_config, unet_config, vae_config, write_config_folder
from sumie.cli.main import main
from sumie.configs import FAMILIES, TINY, ModelConfig
from sumie.errors import ConfigError
from sumie.models.clip import CLIPTextModel
from sumie.models.unet import UNetModel
from sumie.models.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]


def tiny_sdxl() -> ModelConfig:
    """Tiny SDXL whose two text encoders differ in width (diffusers tells them apart by width, as 768 vs 1280)."""
    c = TINY["sdxl"]
    g = dataclasses.replace(c.text_encoders[1], width=128, heads=2, intermediate=256, projection_dim=128)
    unet = dataclasses.replace(c.unet, context_dim=64 + 128, adm_in_channels=128 + 6 * 256)
    return dataclasses.replace(c, text_encoders=(c.text_encoders[0], g), unet=unet)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "tiny-sd1.safetensors"
    save_file(random_single_file(TINY["sd1"], seed=3), str(path))
    return path


def check_report(report: dict[str, Any], family: str, steps: int) -> None:
    assert report["family"] == family and report["steps"] == steps and report["dtype"] == "fp32"
    assert report["machine"]["diffusers"] == diffusers.__version__ and report["machine"]["torch"] == torch.__version__
    (row,) = report["rows"]
    assert row["size"] == 64
    for engine in ("sumie", "diffusers"):
        r = row[engine]
        assert r["unet_calls"] == steps  # one (batched cond + uncond) UNet call a step, in both engines
        for f in FIELDS[:-1]:
            assert r[f] > 0, (engine, f)
        assert r["peak_cuda_mib"] is None  # on the CPU
        assert r["unet_s_per_step"] * steps < r["seconds_per_image"]
        assert len(r["seconds_per_image_each"]) == report["repeat"]
    for f in FIELDS[:-1]:
        assert row["ratio"][f] == pytest.approx(row["diffusers"][f] / row["sumie"][f], rel=1e-2, abs=1e-3)
    # same sampler, sigmas, seeds and start noise: the same image within a level (it discriminates: std >> 1)
    assert row["image_std_uint8"] > 10
    assert row["mean_abs_diff_uint8"] < 1.0


def test_compare_runs_both_engines_end_to_end(tiny_sd1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--compare", "diffusers", str(tiny_sd1), "--sizes", "64", "--steps", "2", "--warmup-steps",
               "1", "--sampler", "euler", "--threads", "1", "--weight-packing", "on", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    check_report(report, "sd1", 2)  # the same image as diffusers' with every convolution packed
    assert report["weight_packing"] == "on"


@pytest.mark.slow
def test_compare_sdxl_dpmpp_2m_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny-sdxl.safetensors"
    save_file(random_single_file(tiny_sdxl(), seed=4), str(path))
    rc = main(["bench", "--compare", "diffusers", "--model", str(path), "--sizes", "64", "--steps", "3",
               "--warmup-steps", "1", "--sampler", "DPM++ 2M", "--threads", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    check_report(report, "sdxl", 3)
    text = bench_compare.format_report(report)
    assert "64x64  sumie" in text and "64x64  diffusers" in text and "ratio d/s" in text
    assert "peak CUDA" not in text


# --------------------------------------------------------------------------------- the diffusers configs it writes


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_configs_build_the_same_networks(family: str) -> None:
    """The diffusers/transformers networks of the written configs have Sumie's parameters (full size, on meta)."""
    cfg = FAMILIES[family]
    with torch.device("meta"):
        pairs = [(UNetModel(cfg.unet), diffusers.UNet2DConditionModel.from_config(unet_config(cfg.unet))),
                 (AutoencoderKL(cfg.vae), diffusers.AutoencoderKL.from_config(vae_config(cfg.vae, family == "sdxl")))]
        for i, t in enumerate(cfg.text_encoders):
            arch = "CLIPTextModelWithProjection" if i else "CLIPTextModel"
            conf = transformers.CLIPTextConfig(**{k: v for k, v in text_config(t, arch).items() if k != "model_type"})
            pairs.append((CLIPTextModel(t), getattr(transformers, arch)(conf)))
    for ours, theirs in pairs:
        ours_n, theirs_n = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())
        assert ours_n == theirs_n, (type(ours).__name__, ours_n, theirs_n)


def test_published_sdxl_numbers() -> None:
    u = unet_config(FAMILIES["sdxl"].unet)
    assert u["attention_head_dim"] == [5, 10, 20] and u["transformer_layers_per_block"] == [1, 2, 10]
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert u["projection_class_embeddings_input_dim"] == 2816 and u["cross_attention_dim"] == 2048
    s = unet_config(FAMILIES["sd1"].unet)
    assert s["attention_head_dim"] == 8 and s["cross_attention_dim"] == 768 and not s["use_linear_projection"]


def test_tokenizer_files_match_sumie(tmp_path: Path) -> None:
    """transformers' CLIPTokenizer from the written files gives Sumie's ids, padding with EOS / '!'."""
    from sumie.prompts.tokenizer import CLIPTokenizer as Ours

    root = write_config_folder(FAMILIES["sdxl"], tmp_path / "c", "EulerDiscreteScheduler")
    text = "a photo of a cat, best quality; Ünïcode & <tags>"
    ours = Ours().encode(text)
    for sub, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        tok = transformers.CLIPTokenizer.from_pretrained(root / sub)
        ids = tok(text, padding="max_length", max_length=77).input_ids
        assert ids[1:len(ours) + 1] == list(ours) and ids[-1] == pad
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "EulerDiscreteScheduler"


# ------------------------------------------------------------------------------------------------------ errors


def test_other_families_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="runs SD1.x and SDXL base"):
        write_config_folder(FAMILIES["sd2"], tmp_path, "EulerDiscreteScheduler")
    with pytest.raises(ConfigError, match="runs SD1.x and SDXL base"):
        write_config_folder(FAMILIES["sdxl_refiner"], tmp_path, "EulerDiscreteScheduler")


def test_bad_model_path_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", "diffusers", str(tmp_path / "missing.safetensors"), "--sizes", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.safetensors: no such file" in err
    assert main(["bench", "--compare", "diffusers", str(tmp_path), "--sizes", "64"]) == 2
    assert "takes a single-file checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--sizes", "100"], "100 is not a multiple of 64"),
    (["--sizes", "256,big"], "give sizes in pixels"),
    (["--sampler", "Euler a"], "--compare runs euler or dpmpp_2m"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--model", "x.safetensors"], "give the model once"),
])
def test_bad_options(tiny_sd1: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", "diffusers", str(tiny_sd1), *argv]) == 2
    assert message in capsys.readouterr().err


def test_compile_with_cold_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--cold", "--compile"]) == 2
    assert "--compile with --cold" in capsys.readouterr().err


def test_no_model_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", "diffusers"]) == 2
    assert "--make-random sd15" in capsys.readouterr().err


def test_missing_diffusers_names_the_extra(tiny_sd1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = metadata.version

    def without_diffusers(name: str) -> str:
        if name == "diffusers":
            raise metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(metadata, "version", without_diffusers)
    with pytest.raises(ConfigError, match=r"pip install 'sumie\[bench\]'"):
        run_compare(str(tiny_sd1), sizes=[64], steps=1)


def test_child_without_diffusers_is_one_error_line(tiny_sd1: Path, tmp_path: Path) -> None:
    """The diffusers child in an environment without diffusers: exit 2 and the install hint, no traceback."""
    spec = json.dumps(dataclasses.asdict(RunSpec(model=str(tiny_sd1), size=64, config_dir=str(tmp_path))))
    code = ("import sys; sys.modules['diffusers'] = None; from sumie.cli.bench_compare import child_main; "
            f"sys.exit(child_main(['diffusers', {spec!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "sumie: error: bench --compare diffusers needs diffusers: pip install 'sumie[bench]'"


def test_failed_child_is_reported(tiny_sd1: Path, tmp_path: Path) -> None:
    """A child that fails (here: no config folder for diffusers) gives a SumieError naming the engine."""
    from sumie.errors import SumieError

    spec = RunSpec(model=str(tiny_sd1), size=64, steps=1, warmup_steps=1, config_dir=str(tmp_path / "none"),
                   out_dir=str(tmp_path), threads=1)
    with pytest.raises(SumieError, match=r"the diffusers run failed \(exit 1\): .*model_index.json"):
        bench_compare._spawn("diffusers", spec, timeout=300)


def test_sampler_names() -> None:
    assert sampler_key("Euler") == sampler_key("euler") == "euler"
    assert sampler_key("DPM++ 2M") == sampler_key("dpmpp_2m") == "dpmpp_2m"


# ----------------------------------------------------------------------------------------------- medians, ratios


def test_rows_take_medians_and_ratios(tmp_path: Path) -> None:
    a, b = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    a[:4] = 200
    b[:4] = 196  # 4 levels on half the pixels: mean |diff| 2
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")

    def run(engine: str, s: float, image: str) -> dict[str, Any]:
        return {"import_s": 1.0, "load_s": 2 * s, "warmup_s": 3 * s, "seconds_per_image": s,
                "cpu_seconds_per_image": 2 * s,
                "unet_s_per_step": s / 20, "text_encoder_s": 0.1, "vae_s": 0.2, "peak_rss_mib": 100 * s,
                "peak_cuda_mib": None, "unet_calls": 20, "images": [str(tmp_path / image)], "engine": engine}

    runs = {"sumie": [run("sumie", s, "a.png") for s in (3.0, 1.0, 2.0)],
            "diffusers": [run("diffusers", s, "b.png") for s in (5.0, 4.0, 90.0)]}
    row = bench_compare._row(256, runs)
    assert row["sumie"]["seconds_per_image"] == 2.0 and row["diffusers"]["seconds_per_image"] == 5.0
    assert row["sumie"]["seconds_per_image_each"] == [3.0, 1.0, 2.0]
    assert row["ratio"]["seconds_per_image"] == 2.5 and row["ratio"]["peak_rss_mib"] == 2.5
    assert row["ratio"]["peak_cuda_mib"] is None and row["diffusers"]["peak_cuda_mib"] is None
    assert row["mean_abs_diff_uint8"] == 2.0
    machine = {"cpu": "Test CPU", "cpus": 2, "torch": "t", "diffusers": "d", "date": "2026-01-01 00:00 UTC",
               "loadavg_start": [1.0, 1.0, 1.0]}
    report = {"model": "/x/sd15.safetensors", "family": "sd1", "steps": 20, "sampler": "euler", "schedule": "Karras",
              "cfg": 7.0, "batch": 1, "device": "cpu", "dtype": "fp32", "threads": 2, "repeat": 3,
              "machine": machine, "loadavg_end": [3.0, 2.0, 1.0], "rows": [row]}
    md = bench_compare.format_markdown(report)
    assert md.count("|") == bench_compare.MARKDOWN_HEADER.splitlines()[0].count("|")
    assert "| sd15.safetensors | 256² | 20 |" in md and "| 2.00 / 5.00 | **2.50x** |" in md
    assert "| Test CPU (2 CPUs) | t, d | 2026-01-01 00:00 UTC | 1.0 -> 3.0 |" in md
    assert "compiled" not in md
    compiled = bench_compare.format_markdown({**report, "compile_unet": True})
    assert "euler (Karras), CFG 7, Sumie's UNet compiled (warm-up 6 s) |" in compiled  # the median warm-up, 3 * 2.0
    assert "warm-up s" in bench_compare.format_report(report)
    off = {**report, "weight_packing": "off"}
    assert "CFG 7, Sumie's weight packing off |" in bench_compare.format_markdown(off)
    assert "(interleaved), Sumie's weight packing off" in bench_compare.format_report(off)
    assert "packing" not in bench_compare.format_markdown({**report, "weight_packing": "auto"})
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    assert main(["bench", "--from-json", str(saved), "--markdown"]) == 0
    text = bench_compare.format_report(report)
    assert re.search(r"256x256  ratio d/s +2.50x +2.50x", text) and "median of 3 (interleaved)" in text
    assert main(["bench", "--from-json", str(tmp_path / "a.png")]) == 2
    assert "not comparable" not in text
    assert bench_compare.ONE_STEP_NOTE in bench_compare.format_report({**report, "steps": 1})


def test_one_step_note_holds_for_diffusers_scheduler() -> None:
    """The 1-step note's claim, read from diffusers itself: with the configs the bench writes, one Euler step starts
    at t = 0 (sigma 0.029) where two start at sigma_max (14.6), as A1111's and Sumie's Karras schedules always do."""
    from sumie.cli.bench_diffusers import SCHEDULER

    sched = diffusers.EulerDiscreteScheduler.from_config(SCHEDULER, use_karras_sigmas=True)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [0.0] and sched.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    sched.set_timesteps(2)
    assert sched.sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)
    assert "0.029" in bench_compare.ONE_STEP_NOTE and "14.6" in bench_compare.ONE_STEP_NOTE


# ------------------------------------------------------------------------------------------------ --make-random


@pytest.mark.parametrize(("kind", "dtype"), [("sd15", torch.float32), ("sdxl", torch.float16)])
def test_make_random_writes_the_published_dtype(kind: str, dtype: torch.dtype, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import sumie.configs

    monkeypatch.setattr(sumie.configs, "FAMILIES", TINY)  # the tiny configs: same key layout, seconds to write
    out = tmp_path / f"{kind}.safetensors"
    assert main(["bench", "--make-random", kind, "-o", str(out)]) == 0
    assert "random weights" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {{torch.float32: "F32", torch.float16: "F16"}[dtype], "I64"}
    assert inspect_checkpoint(out).config.family == {"sd15": "sd1", "sdxl": "sdxl"}[kind]
    assert main(["bench", "--make-random", kind, "-o", str(out)]) == 2  # no overwrite without --overwrite
    assert "already exists" in capsys.readouterr().err
    make_random(kind, out, seed=1)
    assert out.is_file()


def test_make_random_needs_an_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--make-random", "sd15"]) == 2
    assert "needs -o FILE" in capsys.readouterr().err
