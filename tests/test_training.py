"""Training system: config checks, data checks, losses, EMA, VAE and diffusion runs, exact resume, Ctrl-C, export.

The runs are real but tiny (16x16 images of coloured shapes, a 2-level VAE with 8x8 latents, TINY["sd1"]'s UNet
and text encoder) and deterministic on CPU, so "the resumed run equals the uninterrupted one" is checked bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from sumie.checkpoints.io import file_metadata, save_safetensors_atomic
from sumie.checkpoints.loader import load_models
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.errors import ConfigError, SumieError
from sumie.models.vae import DiagonalGaussian
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams
from sumie.training.build import load_vae_file
from sumie.training.config import TrainConfig, config_from_dict, load_config
from sumie.training.data import BatchStream, DataError, FolderDataset, make_buckets, nearest_bucket, synthetic_dataset
from sumie.training.ema import EMA
from sumie.training.losses import (
    NoiseSchedule,
    diffusion_loss,
    foreground_weights,
    min_snr_weights,
    timestep_weights,
    vae_loss,
)
from sumie.training.state import list_checkpoints, load_state
from sumie.training.trainer import Trainer

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 220), "yellow": (240, 220, 30)}
VAE = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8}  # 16x16 images -> 8x8x4 latents


def write_shapes(folder: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """n PNGs of one coloured square or circle on white, with ``.txt`` captions such as "a red circle"."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(["square", "circle"])
        im = Image.new("RGB", (size, size), "white")
        s = size // 2
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + s - 1, y + s - 1], fill=COLORS[color])
        im.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a {color} {shape}\n")
    return folder


def make_config(out: Path, images: Path, **sections: dict) -> TrainConfig:
    """A config dict with defaults for these tests; ``sections`` update [model]/[data]/[train]/[output]."""
    raw: dict[str, dict] = {
        "model": {"vae": dict(VAE)},
        "data": {"folder": str(images), "resolution": 16},
        "train": {"steps": 10, "batch_size": 4, "lr": 1e-3, "seed": 0},
        "output": {"dir": str(out), "checkpoint_every": 0, "sample_every": 0, "log_every": 5},
    }
    for name, values in sections.items():
        raw[name].update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), 48)


@pytest.fixture(scope="module")
def vae_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, object]:
    """Stage 1: a VAE trained for 120 steps; its vae.safetensors feeds every diffusion run below."""
    cfg = make_config(tmp_path_factory.mktemp("vae"), shapes,
                      train={"what": "vae", "steps": 120, "batch_size": 8, "lr": 2e-3},
                      output={"sample_every": 60, "checkpoint_every": 60})
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def diffusion_run(shapes: Path, vae_run: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, object]:
    """Stage 2: UNet + text encoder trained jointly for 200 steps on cached latents of the stage-1 VAE."""
    cfg = make_config(tmp_path_factory.mktemp("diffusion"), shapes,
                      model={"vae_from": str(vae_run[1].export)},
                      data={"cache_latents": True, "caption_dropout": 0.1},
                      train={"steps": 200, "batch_size": 8, "lr": 1e-3, "min_snr_gamma": 5.0, "ema_decay": 0.99},
                      output={"sample_every": 200, "sample_prompts": ["a red square", "a blue circle"],
                              "sample_steps": 6, "checkpoint_every": 100, "keep_checkpoints": 1, "log_every": 50})
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.run()


# ---------------------------------------------------------------- config


def test_config_unknown_key_names_key_section_and_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[data]\nsynthetic = { length = 10 }\n[train]\nwhat = "vae"\nstepz = 5\n')
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in \[train\]; valid keys: what, steps, batch_size"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        config_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'chanels' in \[model.unet\]; valid keys: .*model_channels"):
        config_from_dict({"model": {"unet": {"chanels": 3}}, "data": {"synthetic": {}}})
    with pytest.raises(ConfigError, match=r"unknown key 'colours' in \[data\] synthetic; valid keys: length"):
        from sumie.training.trainer import make_data

        make_data(config_from_dict({"data": {"synthetic": {"colours": 3}}, "train": {"what": "vae"}}))


def test_config_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[train\] lr must be a number"):
        config_from_dict({"data": {"synthetic": {}}, "train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"\[train\] what must be one of diffusion, vae"):
        config_from_dict({"data": {"synthetic": {}}, "train": {"what": "unet"}})
    with pytest.raises(ConfigError, match=r"\[output\] export_dtype must be one of float32, float16, bfloat16"):
        config_from_dict({"data": {"synthetic": {}}, "output": {"export_dtype": "fp8"}})
    with pytest.raises(ConfigError, match="needs exactly one of folder"):
        config_from_dict({"train": {"what": "vae"}})
    with pytest.raises(ConfigError, match=r"timestep_bias_strategy must be one of none, earlier, later, range"):
        config_from_dict({"data": {"synthetic": {}}, "train": {"timestep_bias_strategy": "late"}})
    with pytest.raises(ConfigError, match=r"timestep_bias_portion must be in \(0, 1\]"):
        config_from_dict({"data": {"synthetic": {}}, "train": {"timestep_bias_portion": 1.5}})
    with pytest.raises(ConfigError, match="0 <= begin < end <= 1000"):
        config_from_dict({"data": {"synthetic": {}}, "train": {"timestep_bias_begin": 600, "timestep_bias_end": 500}})
    with pytest.raises(ConfigError, match="context_dim 32 must equal the text encoder width 64"):
        config_from_dict({"data": {"synthetic": {}}, "model": {"unet": {"context_dim": 32}}})
    with pytest.raises(ConfigError, match="invalid TOML"):
        (tmp_path / "bad.toml").write_text("[train\n")
        load_config(tmp_path / "bad.toml")
    cfg = load_config(_write(tmp_path / "sub" / "ok.toml", '[data]\nfolder = "imgs"\n[output]\nsample_every = 0\n'))
    assert cfg.data.folder == (tmp_path / "sub" / "imgs").resolve()  # relative to the config file
    with pytest.raises(ConfigError, match="needs a trained VAE"):
        Trainer(make_config(tmp_path / "o", write_shapes(tmp_path / "d", 2)), progress=False)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- data


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        FolderDataset(tmp_path / "empty", 16)
    with pytest.raises(DataError, match="no such folder"):
        FolderDataset(tmp_path / "missing", 16)


def test_images_without_captions_are_named_and_counted(tmp_path: Path) -> None:
    folder = write_shapes(tmp_path / "d", 8)
    for i in (2, 5):
        (folder / f"img{i:03d}.txt").unlink()
    with pytest.raises(DataError, match=r"2 of 8 images .* no \.txt caption file: img002\.png, img005\.png"):
        FolderDataset(folder, 16)
    ds = FolderDataset(folder, 16, missing_captions="empty")
    assert ds.load(2)[1] == "" and ds.load(3)[1].startswith("a ")


def test_unreadable_images_are_named(tmp_path: Path) -> None:
    folder = write_shapes(tmp_path / "d", 6)
    (folder / "img004.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = (folder / "img001.png").read_bytes()
    (folder / "img001.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=r"2 of 6 images .* cannot be read: img001\.png, img004\.png"):
        FolderDataset(folder, 16)


def test_cli_train_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    cfg = _write(tmp_path / "run.toml", '[data]\nfolder = "empty"\n[train]\nwhat = "vae"\n')
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no images found" in err
    _write(cfg, '[train]\nwhat = "vae"\nbatch = 4\n')
    assert main(["train", str(cfg)]) == 2
    assert "unknown key 'batch' in [train]" in capsys.readouterr().err
    _write(cfg, '[data]\nsynthetic = { length = 10, mix = { two = 0.6 } }\n[train]\nwhat = "vae"\n')
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one + count + two must sum to 1, got 1.2" in err
    assert not (tmp_path / "runs").exists()


def test_synthetic_mix_is_part_of_the_data_name_that_keys_the_latent_cache() -> None:
    default = synthetic_dataset({"length": 8}, 64).describe()
    mixed = synthetic_dataset({"length": 8, "mix": {"one": 0.3, "count": 0.1, "two": 0.6}}, 64)
    same = synthetic_dataset({"length": 8, "mix": {"two": 0.6, "count": 0.1, "one": 0.3}}, 64)
    assert mixed.describe() != default and mixed.describe() == same.describe()
    assert [mixed.load(i)[1] for i in range(8)] != [synthetic_dataset({"length": 8}, 64).load(i)[1] for i in range(8)]


def test_center_crop_and_aspect_buckets(tmp_path: Path) -> None:
    assert (64, 64) in make_buckets(64, 16) and (48, 80) in make_buckets(64, 16)
    assert all(w * h <= 64 * 64 and max(w / h, h / w) <= 2 for w, h in make_buckets(64, 16))
    assert nearest_bucket((300, 100), make_buckets(64, 16)) == (64, 32)  # 3:1 -> the widest bucket, 2:1
    folder = tmp_path / "d"
    folder.mkdir()
    for i, size in enumerate([(40, 20), (20, 40), (30, 30), (42, 21)]):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).rectangle([0, 0, size[0] // 2 - 1, size[1] - 1], fill="black")  # left half black
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("x")
    square = FolderDataset(folder, 16)
    x, _ = square.load(0)  # 40x20 -> 32x16 -> centre 16x16: left half black, right half white
    assert x.shape == (3, 16, 16) and x[:, :, :8].max() < -0.9 and x[:, :, 8:].min() > 0.9
    bucketed = FolderDataset(folder, 16, buckets=True, bucket_step=8)
    assert [bucketed.bucket_of(i) for i in range(4)] == [(16, 8), (8, 16), (16, 16), (16, 8)]
    stream = BatchStream(bucketed, 2, seed=0)
    for _ in range(6):
        batch = next(stream)  # items of one bucket per batch
        assert len({bucketed.bucket_of(s.index) for s in batch.samples}) == 1


# ---------------------------------------------------------------- losses, EMA


def test_forward_process_targets_and_min_snr() -> None:
    sched = NoiseSchedule.sd()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    xt = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    v = sched.target(x0, eps, t, "v")
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)  # x0 from (x_t, v)
    assert sched.target(x0, eps, t, "eps") is eps
    snr = sched.snr(t)
    assert snr[0] > 1000 and snr[-1] < 5e-3  # SD: alpha_bar(0) = 0.99915, alpha_bar(999) = 0.0047
    w_eps, w_v = min_snr_weights(snr, 5.0, "eps"), min_snr_weights(snr, 5.0, "v")
    torch.testing.assert_close(w_eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    torch.testing.assert_close(w_v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w_eps[-1] == 1.0 and w_eps[0] < 0.01


def test_timestep_bias_matches_diffusers_strategies() -> None:
    assert timestep_weights(1000, "none") is None
    later = timestep_weights(1000, "later", 0.25, 4.0)
    assert later is not None and later[:750].eq(1).all() and later[750:].eq(4).all()
    earlier = timestep_weights(1000, "earlier", 0.1, 0.5)
    assert earlier is not None and earlier[:100].eq(0.5).all() and earlier[100:].eq(1).all()
    band = timestep_weights(1000, "range", multiplier=3.0, begin=200, end=500)
    assert band is not None and band[200:500].eq(3).all() and band[:200].eq(1).all() and band[500:].eq(1).all()
    with pytest.raises(ValueError, match="unknown timestep bias strategy 'late'"):
        timestep_weights(1000, "late")
    t = NoiseSchedule.sd().sample_timesteps(40_000, torch.Generator().manual_seed(0), later)
    assert t.min() >= 0 and t.max() <= 999
    share = float((t >= 750).double().mean())
    assert share == pytest.approx(4 * 250 / (750 + 4 * 250), abs=0.01)  # 57% instead of 25%


def test_vae_loss_terms() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = DiagonalGaussian(torch.zeros(2, 8, 8, 8))  # N(0, I): KL 0
    loss, parts = vae_loss(x, x, post, kl_weight=1.0, edge_weight=1.0, multiscale_weight=1.0)
    assert float(loss) == 0.0 and parts == {"rec": 0.0, "kl": 0.0, "edge": 0.0, "ms": 0.0}
    post = DiagonalGaussian(torch.cat([torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)], 1))  # mean 1: KL 1/2 each
    loss, parts = vae_loss(x, x + 0.5, post, kl_weight=1e-6, recon_kind="l2")
    assert parts["rec"] == pytest.approx(0.25) and parts["kl"] == pytest.approx(0.5 * 4 * 64 / (3 * 256))


def test_ema_warmup_update_and_swap() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, start=0, warmup=True)
    assert ema.decay_at(1) == 0.0 and ema.decay_at(2) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(10_000) == 0.9
    fixed = EMA([p], decay=0.9, warmup=False)
    with torch.no_grad():
        p.fill_(1.0)
    fixed.update(1)  # first update copies
    with torch.no_grad():
        p.fill_(2.0)
    fixed.update(2)
    torch.testing.assert_close(fixed.shadow[0], torch.full((3,), 1.1))
    with fixed.swapped():
        torch.testing.assert_close(p.data, torch.full((3,), 1.1))
    torch.testing.assert_close(p.data, torch.full((3,), 2.0))


# ---------------------------------------------------------------- runs


@torch.no_grad()
def _recon_error(vae: torch.nn.Module, data: FolderDataset) -> float:
    x = torch.stack([data.load(i)[0] for i in range(len(data))])
    return float((vae.decode(vae.encode(x).mode()) - x).abs().mean())


def test_vae_training_reduces_reconstruction_error(vae_run: tuple, shapes: Path) -> None:
    trainer, result = vae_run
    first, last = statistics.mean(result.losses[:10]), statistics.mean(result.losses[-10:])
    assert last < 0.5 * first, (first, last)  # measured: 0.53 -> 0.15
    data = FolderDataset(shapes, 16)
    trained = load_vae_file(result.export, trainer.models.config.vae)
    torch.manual_seed(0)
    from sumie.models.vae import AutoencoderKL

    assert _recon_error(trained, data) < 0.5 * _recon_error(AutoencoderKL(trained.config), data)  # 0.15 vs 0.94
    assert trained.config.scaling_factor != 0.18215  # 1 / std of its own latents
    assert (result.export.parent / "samples" / "step_00000060.png").is_file()


def test_diffusion_training_loss_falls(diffusion_run: tuple) -> None:
    trainer, result = diffusion_run
    assert result.step == 200 and not result.interrupted and len(result.losses) == 200
    first, last = statistics.mean(result.losses[:20]), statistics.mean(result.losses[-20:])
    assert last < 0.5 * first, (first, last)  # measured: 0.68 -> 0.088
    out = trainer.out
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [50, 100, 150, 200] and all(r["loss"] > 0 for r in log)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000200"]  # keep_checkpoints = 1
    assert Image.open(out / "samples" / "step_00000200.png").size == (32, 16)
    assert (out / "latents.pt").is_file()


def test_export_loads_and_generates(diffusion_run: tuple) -> None:
    trainer, result = diffusion_run
    models = load_models(result.export)
    assert file_metadata(result.export)["sumie.resolution"] == "16"
    assert models.config == trainer.models.config and models.prediction_source == "sumie.config metadata"
    sd = load_file(result.export)
    with trainer.ema.swapped():  # the export holds the EMA weights
        for k, v in trainer.models.unet.state_dict().items():
            assert torch.equal(sd["model.diffusion_model." + k], v)
    images = Engine(models).generate(GenerationParams(prompt="a red square", steps=4, seed=1, width=16,
                                                      height=16, sampler="Euler")).images
    assert images[0].size == (16, 16)
    te0 = trainer.models.text_encoders[0]
    assert te0.training and any(p.requires_grad for p in te0.parameters())  # trained jointly with the UNet


def test_export_float16_and_native_size(diffusion_run: tuple) -> None:
    trainer, result = diffusion_run
    params = GenerationParams(prompt="a red square", steps=4, seed=1, sampler="Euler")  # no width/height given
    full = Engine(load_models(result.export)).generate(params).images[0]
    assert full.size == (16, 16)  # the native size comes from the file's sumie.resolution metadata
    cfg = trainer.cfg
    trainer.cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, export="half.safetensors",
                                                                      export_dtype="float16"))
    try:
        half_path = trainer.export()
    finally:
        trainer.cfg = cfg
    half, full_sd = load_file(half_path), load_file(result.export)
    assert half.keys() == full_sd.keys()
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    assert all(torch.equal(half[k], v.half()) for k, v in full_sd.items())
    assert half_path.stat().st_size < 0.6 * result.export.stat().st_size
    image = Engine(load_models(half_path)).generate(params).images[0]
    diff = torch.from_numpy(np.asarray(image, dtype=np.float32) - np.asarray(full, dtype=np.float32))
    assert diff.abs().mean() < 2.0  # fp16 storage, fp32 compute: within ~1 level on average


def test_zero_terminal_snr_run_exports_a_ztsnr_v_model(shapes: Path, vae_run: tuple, tmp_path: Path) -> None:
    base = {"model": {"vae_from": str(vae_run[1].export)}, "train": {"steps": 2, "zero_terminal_snr": True}}
    with pytest.raises(ConfigError, match="zero_terminal_snr needs v-prediction"):
        Trainer(make_config(tmp_path / "eps", shapes, **base), progress=False)
    cfg = make_config(tmp_path / "v", shapes, model=base["model"], train={**base["train"], "prediction": "v"},
                      output={"cfg_scale": 2.5})
    trainer = Trainer(cfg, progress=False)
    assert trainer.schedule.alphas_cumprod[-1] < 1e-7  # the rescaled schedule: (almost) pure noise at t = 999
    result = trainer.run()
    models = load_models(result.export)
    assert models.zero_terminal_snr and models.config.prediction == "v"
    assert "ztsnr" in load_file(result.export)
    assert file_metadata(result.export)["sumie.cfg_scale"] == "2.5" and models.cfg_scale == 2.5
    result_image = Engine(models).generate(GenerationParams(prompt="a red square", steps=4, seed=1))
    assert result_image.images[0].size == (16, 16)
    assert result_image.params.cfg_scale == 2.5 and "CFG scale: 2.5," in result_image.infotexts[0]  # the file's
    with pytest.raises(ConfigError, match=r"\[output\] cfg_scale must be >= 0"):
        make_config(tmp_path / "x", shapes, output={"cfg_scale": -1.0})


def _resume_config(out: Path, shapes: Path, vae: Path) -> TrainConfig:
    """On-the-fly VAE encoding, grad accumulation, v, warmup + cosine, timestep bias: all must resume exactly."""
    return make_config(out, shapes, model={"vae_from": str(vae)},
                       train={"steps": 10, "batch_size": 3, "grad_accum": 2, "prediction": "v", "min_snr_gamma": 5.0,
                              "warmup_steps": 3, "lr_schedule": "cosine", "ema_decay": 0.9,
                              "timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0},
                       data={"caption_dropout": 0.3}, output={"checkpoint_every": 4, "keep_checkpoints": 2})


@pytest.fixture(scope="module")
def uninterrupted(shapes: Path, vae_run: tuple, tmp_path_factory: pytest.TempPathFactory) -> object:
    return Trainer(_resume_config(tmp_path_factory.mktemp("full"), shapes, vae_run[1].export), progress=False).run()


def test_checkpoint_resume_reproduces_the_run_exactly(uninterrupted: object, shapes: Path, vae_run: tuple,
                                                      tmp_path: Path) -> None:
    cfg = _resume_config(tmp_path, shapes, vae_run[1].export)

    def ctrl_c(trainer: Trainer, step: int, loss: float) -> None:
        if step == 6:
            raise KeyboardInterrupt

    first = Trainer(cfg, hooks=[ctrl_c], progress=False).run()
    assert first.interrupted and first.step == 6 and first.export is None
    assert first.checkpoint == tmp_path / "checkpoints" / "step_00000006"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    state = load_state(first.checkpoint)  # a loadable checkpoint
    assert state["step"] == 6 and state["data"] == {"epoch": 0, "position": 12}
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        Trainer(cfg, progress=False)
    second = Trainer(cfg, resume=tmp_path, progress=False).run()
    assert first.losses + second.losses == uninterrupted.losses  # bit for bit
    a, b = load_file(uninterrupted.export), load_file(second.export)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_interrupt_inside_a_step_saves_the_last_finished_step(uninterrupted: object, shapes: Path, vae_run: tuple,
                                                              tmp_path: Path) -> None:
    cfg = _resume_config(tmp_path, shapes, vae_run[1].export)
    trainer = Trainer(cfg, progress=False)
    calls = {"n": 0}
    encode = trainer.encode_text

    def interrupted_encode(captions: list[str]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 12:  # second micro-batch of step 6: the step never happened
            raise KeyboardInterrupt
        return encode(captions)

    trainer.encode_text = interrupted_encode  # type: ignore[method-assign]
    first = trainer.run()
    assert first.interrupted and first.step == 5 and first.checkpoint.name == "step_00000005"
    second = Trainer(cfg, resume=first.checkpoint, progress=False).run()
    assert first.losses + second.losses == uninterrupted.losses


def test_resume_checks_the_model(uninterrupted: object, shapes: Path, vae_run: tuple, tmp_path: Path) -> None:
    cfg = _resume_config(tmp_path, shapes, vae_run[1].export)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unet={"model_channels": 64}))
    with pytest.raises(ConfigError, match="model differs"):
        Trainer(cfg, resume=uninterrupted.checkpoint, progress=False)
    with pytest.raises(SumieError, match="no training checkpoint found"):
        Trainer(cfg, resume=tmp_path, progress=False)


def test_fine_tune_a_checkpoint(shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "tiny_sd1.safetensors"
    save_safetensors_atomic(random_single_file(TINY["sd1"]), ckpt)
    cfg = _write(tmp_path / "ft.toml", f'[model]\ninit_from = "{ckpt.name}"\n[data]\nfolder = "{shapes}"\n'
                 'resolution = 32\n[train]\nsteps = 3\nbatch_size = 2\nlr = 1e-4\n[output]\ndir = "run"\n'
                 'sample_every = 0\n')
    assert main(["train", str(cfg)]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    before, after = load_models(ckpt), load_models(tmp_path / "run" / "model.safetensors")
    assert after.config == before.config  # same layout and config
    b, a = before.unet.state_dict(), after.unet.state_dict()
    assert any(not torch.equal(b[k], a[k]) for k in b)  # the UNet trained
    for old, new in ((before.vae, after.vae), (before.text_encoders[0], after.text_encoders[0])):
        assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())  # frozen
    images = Engine(after).generate(GenerationParams(prompt="a red square", steps=2, seed=0, width=32, height=32))
    assert images.images[0].size == (32, 32)


def test_cli_synthetic_vae_run_and_resume_with_more_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = ('[model.vae]\nch = 16\nch_mult = [1, 2]\nnum_res_blocks = 1\nnorm_groups = 8\n'
            '[data]\nsynthetic = {{ length = 16, resolution = 32 }}\n'
            '[train]\nwhat = "vae"\nsteps = {steps}\nbatch_size = 4\n[output]\ndir = "run"\nsample_every = 2\n')
    cfg = _write(tmp_path / "vae.toml", text.format(steps=2))
    assert main(["train", str(cfg)]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    _write(cfg, text.format(steps=3))
    assert main(["train", str(cfg)]) == 2  # a fresh run would overwrite the first one's checkpoints
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]
    vae = load_vae_file(tmp_path / "run" / "vae.safetensors", TINY["sd1"].vae)
    assert vae.config.ch == 16 and vae.downscale == 2
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000003.png")
    assert grid.size == (8 * 32, 2 * 32)  # 8 images over their reconstructions


# ---------------------------------------------------------------- foreground-weighted loss


def test_foreground_weights_and_weighted_mse() -> None:
    mask = torch.tensor([[[[0.0, 0.5], [1.0, 0.0]]]])
    w = foreground_weights(mask, 5.0)
    assert torch.equal(w, torch.tensor([[[[1.0, 3.0], [5.0, 1.0]]]]))
    pred, target = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    pred[0, 0, 1, 0] = 3.0  # error 4 on a foreground pixel of channel 0
    expected = (1 + 3 + 5 * 4 + 1 + 1 + 3 + 5 + 1) / 8
    assert float(diffusion_loss(pred, target, None, w)) == pytest.approx(expected)
    assert float(diffusion_loss(pred, target, torch.tensor([2.0]), w)) == pytest.approx(2 * expected)


def test_folder_masks_follow_the_image_crop(tmp_path: Path) -> None:
    """cat.mask.png is not an image of its own, and is cropped (and mirrored) exactly as cat.png."""
    for name, box in (("a", (2, 3, 9, 12)), ("b", (14, 1, 22, 6))):
        im, mask = Image.new("RGB", (24, 16), "white"), Image.new("L", (24, 16), 0)
        ImageDraw.Draw(im).rectangle(box, fill=(220, 30, 30))
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        im.save(tmp_path / f"{name}.png")
        mask.save(tmp_path / f"{name}.mask.png")
        (tmp_path / f"{name}.txt").write_text("a red square")
    Image.new("RGB", (24, 16), "white").save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("nothing")
    data = FolderDataset(tmp_path, 16, crop="random")
    assert len(data) == 3 and data.has_masks()
    for i in range(2):
        for seed in (0, 5, 11):
            for flip in (False, True):
                x, _ = data.load(i, flip, seed)
                m = data.load_mask(i, flip, seed)
                assert m is not None and m.shape == (1, 16, 16)
                red = (x[0] > 0.5) & (x[1] < 0)
                assert torch.equal(red, m[0] > 0.5)
    assert data.load_mask(2) is None
    assert not FolderDataset(write_shapes(tmp_path / "plain", 2), 16).has_masks()


def _random_checkpoint(folder: Path) -> Path:
    path = folder / "random.safetensors"
    save_safetensors_atomic(random_single_file(TINY["sd1"]), path)
    return path


def _synthetic_config(tmp_path: Path, **train: object) -> TrainConfig:
    """A random-weight TINY sd1 checkpoint fine-tuned on 8 synthetic images of 64 px."""
    return config_from_dict({
        "model": {"init_from": str(_random_checkpoint(tmp_path))},
        "data": {"synthetic": {"length": 8, "seed": 1}, "resolution": 64},
        "train": {"steps": 1, "batch_size": 4, **train},
        "output": {"dir": str(tmp_path / "out"), "sample_every": 0, "checkpoint_every": 0}})


def test_trainer_draws_biased_timesteps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(_synthetic_config(tmp_path, batch_size=8, timestep_bias_strategy="later",
                                        timestep_bias_portion=0.1, timestep_bias_multiplier=1e6), progress=False)
    unet, seen = trainer.models.unet, []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, t, *a, **k: (seen.append(t.clone()), forward(x, t, *a, **k))[1])
    for _ in range(3):
        batch = next(trainer.stream)
        with torch.no_grad():
            trainer._diffusion_loss(batch.samples, batch.images, batch.captions)
    t = torch.cat(seen)
    assert len(t) == 24 and bool((t >= 900).all())  # uniform draws would put ~21 of 24 below 900


def test_foreground_weight_scales_the_loss_on_masked_pixels(tmp_path: Path) -> None:
    """Same run, same batch: the loss is linear in foreground_weight and grows with it (the mask is not empty)."""
    base = _synthetic_config(tmp_path)
    losses = []
    for w in (1.0, 2.0, 3.0):
        trainer = Trainer(dataclasses.replace(base, train=dataclasses.replace(base.train, foreground_weight=w)),
                          progress=False)
        batch = next(trainer.stream)
        with torch.no_grad():
            losses.append(float(trainer._diffusion_loss(batch.samples, batch.images, batch.captions)[0]))
    assert losses[1] > losses[0] * 1.001
    assert losses[2] - losses[0] == pytest.approx(2 * (losses[1] - losses[0]), rel=1e-4)
    data = synthetic_dataset({"length": 8, "seed": 1}, 64)
    masks = trainer._latent_masks(batch.samples, (8, 8))
    full = data.load_mask(batch.samples[0].index)
    assert full is not None and masks.shape == (4, 1, 8, 8)
    assert torch.allclose(masks[0], torch.nn.functional.avg_pool2d(full, 8))
    assert torch.equal(data.load_mask(3, flip=True), data.load_mask(3).flip(-1))


def test_foreground_weight_needs_masks(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="foreground_weight must be > 0"):
        make_config(tmp_path, shapes, train={"foreground_weight": 0.0})
    with pytest.raises(ConfigError, match="foreground_weight only applies"):
        make_config(tmp_path, shapes, train={"what": "vae", "foreground_weight": 4.0})
    cfg = config_from_dict({"model": {"init_from": str(_random_checkpoint(tmp_path))},
                            "data": {"folder": str(shapes), "resolution": 16},
                            "train": {"foreground_weight": 4.0}, "output": {"dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=r"needs masks.*\.mask\.png beside each image"):
        Trainer(cfg, progress=False)


def test_decoder_only_run_keeps_the_encoder_and_the_latent_scale(vae_run: tuple, shapes: Path, tmp_path: Path) -> None:
    trainer, result = vae_run
    cfg = make_config(tmp_path / "dec", shapes, model={"vae_from": str(result.export)},
                      train={"what": "vae", "steps": 30, "batch_size": 8, "lr": 2e-3, "train_vae_encoder": False})
    dec = Trainer(cfg, progress=False)
    trained_params = {id(p) for p in dec.params}
    assert trained_params == {id(p) for p in (*dec.models.vae.decoder.parameters(),
                                              *dec.models.vae.post_quant_conv.parameters())}
    out = dec.run()
    before = load_vae_file(result.export, trainer.models.config.vae)
    after = load_vae_file(out.export, trainer.models.config.vae)
    b, a = before.state_dict(), after.state_dict()
    enc = [k for k in b if k.startswith(("encoder.", "quant_conv."))]
    assert enc and all(torch.equal(b[k], a[k]) for k in enc)  # the latent space is the same
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor  # not measured again
    data = FolderDataset(shapes, 16)
    assert _recon_error(after, data) < _recon_error(before, data)  # measured: 0.154 -> 0.145


def test_decoder_only_needs_a_trained_vae(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vae_from"):
        make_config(tmp_path, shapes, train={"what": "vae", "train_vae_encoder": False})
    with pytest.raises(ConfigError, match=r"train_vae_encoder only applies to what = \"vae\""):
        make_config(tmp_path, shapes, model={"vae_from": "x.safetensors"}, train={"train_vae_encoder": False})


TINY_RECIPES = Path(__file__).parent.parent / "recipes" / "sumie-tiny"
# the stages, adapters (lora-*, embedding-*: trained on the shipped file) and experiments/ (tried, not shipped); not
# the config.toml copies inside runs/
RECIPES = sorted(p for p in TINY_RECIPES.rglob("*.toml") if "runs" not in p.relative_to(TINY_RECIPES).parts)
STAGES = [p for p in RECIPES if p.parent == TINY_RECIPES and p.name.startswith("stage-")]
TRAIN_SCRIPT = Path(__file__).parent.parent / "scripts" / "train-sumie-tiny.sh"


def _export_path(cfg: TrainConfig) -> Path:
    """Where a run writes its final file (Trainer.export): ``[output] export``, vae.safetensors for a VAE run."""
    name = cfg.output.export
    if cfg.train.what == "vae" and name == "model.safetensors":
        name = "vae.safetensors"
    return (cfg.output.dir / name).resolve()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.relative_to(TINY_RECIPES).as_posix() for p in RECIPES])
def test_shipped_recipes_are_valid_configs(recipe: Path) -> None:
    cfg = load_config(recipe)
    runs = (TINY_RECIPES / "runs").resolve()  # paths are relative to the recipe's folder: experiments/ uses ../runs
    assert cfg.output.dir.resolve().parent == runs and cfg.train.steps > 0
    for source in (cfg.model.init_from, cfg.model.vae_from):
        assert source is None or source.resolve().parent.parent == runs
    if cfg.train.what == "diffusion":  # every diffusion stage starts from a trained VAE or an earlier export
        assert cfg.model.vae_from is not None or cfg.model.init_from is not None
    header = recipe.read_text(encoding="utf-8")
    if cfg.train.what in ("lora", "embedding"):  # an adapter on the embedded model (init_from left out)
        assert recipe.parent == TINY_RECIPES and cfg.model.init_from is None
    else:
        stage = int(re.fullmatch(r"stage-(\d\d)-[a-z0-9-]+", recipe.stem).group(1))  # type: ignore[union-attr]
        assert header.startswith(f"# Stage {stage} of sumie-tiny")  # the file name's stage is the one it describes
    assert f"#   sumie train {recipe.relative_to(TINY_RECIPES.parent.parent).as_posix()}\n" in header


def test_recipes_are_found() -> None:
    numbers = [int(p.name[6:8]) for p in STAGES]
    assert numbers == list(range(1, 11)) and len(RECIPES) >= 11


def test_training_script_chains_the_stages() -> None:
    """scripts/train-sumie-tiny.sh runs every stage in order, and each reads only what an earlier stage wrote."""
    text = TRAIN_SCRIPT.read_text(encoding="utf-8")
    calls = re.findall(r"^run_stage (\S+) (\S+) (\S+)$", text, re.M)
    assert [name for name, _, _ in calls] == [p.name for p in STAGES]
    runs = TINY_RECIPES / "runs"
    written: set[Path] = set()
    for name, folder, file in calls:
        cfg = load_config(TINY_RECIPES / name)
        for source in (cfg.model.init_from, cfg.model.vae_from):
            assert source is None or source.resolve() in written, f"{name} reads {source}, no earlier stage writes it"
        assert _export_path(cfg) == (runs / folder / file).resolve()  # the file the script checks for "stage done"
        written.add(_export_path(cfg))
    written |= {(runs / p).resolve() for p in re.findall(r'"\$R/runs/([^"]+\.safetensors)"', text)}  # bake, convert
    for recipe in RECIPES:
        if recipe not in STAGES:  # an experiment starts from a file the script makes
            cfg = load_config(recipe)
            assert all(s is None or s.resolve() in written for s in (cfg.model.init_from, cfg.model.vae_from))
