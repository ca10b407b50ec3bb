"""Data-parallel training: 2 processes (gloo, CPU) equal 1 process at the same global batch; sharding; resume.

The workers are real processes (``torch.multiprocessing`` spawn, and ``torchrun`` for the CLI) on a tiny config:
16x16 synthetic shapes, a 2-level VAE with 8x8 latents, TINY["sd1"]'s UNet and text encoder. One process and two
compute the same batch in a different float summation order (per-rank means, gradient all-reduce), so the
comparison has a stated fp32 tolerance; two 2-process runs (uninterrupted and resumed) are compared exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.save import random_single_file
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.training.build import build_models, export_vae
from sumie.training.config import config_from_dict
from sumie.training.data import BatchStream, collate, shard_span, synthetic_dataset
from sumie.training.distributed import dist_env, process_group
from sumie.training.state import list_checkpoints, load_state
from sumie.training.trainer import Trainer

VAE = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 8}  # 16x16 images -> 8x8x4 latents
STEPS, LR = 4, 1e-3
# fp32, the same batch summed in another order (measured here: losses 8e-8 relative, weights 2.4e-5 absolute)
LOSS_RTOL = 1e-6
# AdamW turns a gradient's rounding noise into an update of up to lr: weights within 2% of STEPS * lr
WEIGHT_ATOL = 0.02 * STEPS
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 captioned 16x16 PNGs of a coloured square on a coloured background."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        bg, fg = (torch.rand(2, 3, generator=g) * 255).to(torch.uint8).tolist()
        x, y = torch.randint(0, 8, (2,), generator=g).tolist()
        im = Image.new("RGB", (16, 16), tuple(bg))
        im.paste(tuple(fg), (x, y, x + 8, y + 8))
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a zorbish square at {x} {y} number {i}\n")
    return folder


def _raw(out: Path, what: str, images: Path, vae: Path | None = None, **train: Any) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {
        "model": {"vae": dict(VAE)} if vae is None else {"vae_from": str(vae)},
        "data": {"folder": str(images), "resolution": 16, "caption_dropout": 0.3, "flip": True},
        "train": {"what": what, "steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": LR, "seed": 3,
                  "warmup_steps": 2, "lr_schedule": "cosine", "ema_decay": 0.9, **train},
        "output": {"dir": str(out), "checkpoint_every": 0, "sample_every": 0, "log_every": 1},
    }
    if what == "diffusion":
        raw["train"].update({"prediction": "v", "min_snr_gamma": 5.0, "timestep_bias_strategy": "later",
                             "timestep_bias_multiplier": 3.0})
    if what == "vae":
        raw["train"].update({"edge_weight": 0.5, "multiscale_weight": 0.5, "kl_weight": 1e-3})
    return raw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, raw: dict, resume: str | None, stop_at: int, result: str) -> None:
    """One rank: torchrun's environment, the process group, a Trainer run; the losses to ``result``.rank.json."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)  # what [train] threads does in the CLI: this process's setting

    def stop(trainer: Trainer, step: int, loss: float) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    with process_group("cpu") as env:
        assert env is not None and env.rank == rank and env.world_size == world
        trainer = Trainer(config_from_dict(raw), resume=resume, hooks=[stop], progress=False)
        assert trainer.dist is not None and trainer.dist.world_size == world
        r = trainer.run()
    Path(f"{result}.{rank}.json").write_text(json.dumps({"losses": r.losses, "step": r.step,
                                                         "interrupted": r.interrupted,
                                                         "export": str(r.export) if r.export else None}))


def run_ranks(raw: dict, world: int, tmp: Path, resume: Path | None = None, stop_at: int = -1) -> list[dict]:
    """Run ``world`` spawned ranks to the end; every rank's result."""
    result = str(tmp / f"result-{_free_port()}")
    mp.start_processes(_worker, args=(world, _free_port(), raw, str(resume) if resume else None, stop_at, result),
                       nprocs=world, join=True, start_method="spawn")
    return [json.loads(Path(f"{result}.{r}.json").read_text()) for r in range(world)]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    """Same tensors, every element within WEIGHT_ATOL * lr."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=WEIGHT_ATOL * lr, msg=k)


@pytest.fixture(scope="module")
def vae_file(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight VAE of the tiny shape (diffusion runs need a VAE file)."""
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    cfg = config_from_dict(_raw(path.parent / "unused", "vae", images))
    export_vae(path, build_models(cfg).vae)
    return path


# ---------------------------------------------------------------- sharding and environment


def test_shards_of_a_batch_are_its_rows_in_order() -> None:
    for n in range(1, 11):
        for world in (1, 2, 3, 4):
            spans = [shard_span(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            assert max(h - lo for lo, h in spans) - min(h - lo for lo, h in spans) <= 1
    data = synthetic_dataset({"length": 10}, 32)
    whole = BatchStream(data, 4, seed=5, flip=True)
    ranks = [BatchStream(data, 4, seed=5, flip=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary (10 items: 2 full batches per epoch)
        full = next(whole)
        parts = [next(s) for s in ranks]
        assert [p.offset for p in parts] == [0, 2] and all(p.total == 4 for p in parts)
        assert parts[0].samples + parts[1].samples == full.samples
        assert torch.equal(torch.cat([p.images for p in parts]), full.images)
        assert parts[0].captions + parts[1].captions == full.captions
    assert all(s.state_dict() == whole.state_dict() for s in ranks)  # one position for every rank
    workers = BatchStream(data, 4, seed=5, flip=True, rank=1, world_size=2, num_workers=1)
    again = BatchStream(data, 4, seed=5, flip=True)
    for _ in range(3):
        b, ref = next(workers), next(again)
        assert b.samples == ref.samples[2:] and torch.equal(b.images, collate(data, ref.samples).images[2:])


def test_torchrun_environment_is_read_and_checked() -> None:
    assert dist_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    got = dist_env(env)
    assert got is not None and (got.rank, got.world_size, got.local_rank) == (1, 2, 1)
    assert dist_env({**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None  # one process: plain run
    with pytest.raises(ConfigError, match=r"MASTER_PORT missing: start it with torchrun --nproc_per_node N"):
        dist_env({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(ConfigError, match="RANK 2 is outside WORLD_SIZE 2"):
        dist_env({**env, "RANK": "2"})
    with pytest.raises(ConfigError, match="must be integers"):
        dist_env({**env, "WORLD_SIZE": "two"})
    with process_group("cpu") as none:  # outside torchrun nothing is initialised
        assert none is None and not torch.distributed.is_initialized()


def _grads_worker(rank: int, world: int, port: int, result: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from sumie.training.distributed import Dist

    with process_group("cpu"):
        d = Dist.current(torch.device("cpu"))
        assert d is not None and (d.rank, d.world_size) == (rank, world)
        params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
        params[0].grad = torch.full((3,), float(rank + 1))  # every rank
        if rank == 1:
            params[1].grad = torch.tensor([1.0, 2.0, 3.0])  # one rank only (its word was not dropped)
        d.all_reduce_grads(params)  # params[2]: no rank
        total = d.sum([0.5 * (rank + 1)])
        weights = [torch.full((2, 2), float(rank)), torch.arange(4.0) * (rank + 1)]
        d.broadcast_(weights)
        torch.save({"grads": [p.grad for p in params], "sum": total, "weights": weights}, f"{result}.{rank}.pt")


def test_gradient_sum_over_ranks_keeps_the_meaning_of_no_gradient(tmp_path: Path) -> None:
    result = str(tmp_path / "grads")
    mp.start_processes(_grads_worker, args=(2, _free_port(), result), nprocs=2, join=True, start_method="spawn")
    for r in range(2):
        got = torch.load(f"{result}.{r}.pt")
        assert torch.equal(got["grads"][0], torch.full((3,), 3.0))
        assert torch.equal(got["grads"][1], torch.tensor([1.0, 2.0, 3.0]))  # zeros from rank 0, as one process
        assert got["grads"][2] is None  # AdamW skips it, as in one process
        assert got["sum"] == [1.5]
        assert torch.equal(got["weights"][0], torch.zeros(2, 2)) and torch.equal(got["weights"][1], torch.arange(4.0))


def test_batches_smaller_than_the_process_count_are_a_config_error(tmp_path: Path, images: Path) -> None:
    from sumie.training.distributed import Dist

    cfg = config_from_dict(_raw(tmp_path, "vae", images, batch_size=2))
    with pytest.raises(ConfigError, match=r"3 processes need batches of at least 3 images, but a batch holds 2"):
        Trainer(cfg, dist=Dist(0, 3, torch.device("cpu")), progress=False)


# ---------------------------------------------------------------- 2 processes = 1 process


def _check_equal(one: Any, one_dir: Path, two: list[dict], two_dir: Path, lr: float = LR) -> None:
    """A 2-process run (``two``: each rank's result) matches the 1-process run: losses, log, weights, export."""
    assert two[0]["losses"] == two[1]["losses"]  # every rank has the global (all-reduced) loss
    assert two[0]["losses"] == pytest.approx(one.losses, rel=LOSS_RTOL, abs=0)
    assert one.losses != pytest.approx([one.losses[0]] * len(one.losses))  # the runs did train
    log1 = [json.loads(x) for x in (one_dir / "loss.jsonl").read_text().splitlines()]
    log2 = [json.loads(x) for x in (two_dir / "loss.jsonl").read_text().splitlines()]  # rank 0's, once
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, STEPS + 1))
    for a, b in zip(log1, log2, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k != "sec":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k  # sums of such losses, grad norm, lr
    s1, s2 = load_state(one.checkpoint), load_state(list_checkpoints(two_dir)[-1])
    for m1, m2 in ((s1["modules"][k], s2["modules"][k]) for k in s1["modules"]):
        _close(m1, m2, lr)
        assert not all(torch.equal(v, m2[k]) for k, v in m1.items())  # two computations, not one file twice
    assert s2["data"] == s1["data"] and torch.equal(s2["generator"], s1["generator"])  # same draws, same order
    assert len(s2["rng_ranks"]) == 2 and s1["rng_ranks"] == []
    export = Path(two[0]["export"])
    assert two[1]["export"] == str(export) and export.parent == two_dir
    _close(load_file(one.export), load_file(export), lr)
    assert not [p.name for p in two_dir.rglob("*tmp*")]  # nothing half-written by a second writer


@pytest.fixture(scope="module")
def two_diffusion(images: Path, vae_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A 2-process diffusion run (on-the-fly VAE encoding, grad accumulation, caption dropout, flips, v, min-SNR)."""
    tmp = tmp_path_factory.mktemp("two")
    return tmp / "run", run_ranks(_raw(tmp / "run", "diffusion", images, vae_file), 2, tmp)


def test_two_processes_equal_one_diffusion(images: Path, vae_file: Path, two_diffusion: tuple, tmp_path: Path) -> None:
    one = Trainer(config_from_dict(_raw(tmp_path, "diffusion", images, vae_file)), progress=False).run()
    _check_equal(one, tmp_path, two_diffusion[1], two_diffusion[0])


def test_two_processes_equal_one_vae(images: Path, tmp_path: Path) -> None:
    one = Trainer(config_from_dict(_raw(tmp_path / "one", "vae", images)), progress=False).run()
    two = run_ranks(_raw(tmp_path / "two", "vae", images), 2, tmp_path)
    _check_equal(one, tmp_path / "one", two, tmp_path / "two")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY["sd1"] with random weights as a single file (what adapters train on)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors_atomic(random_single_file(TINY["sd1"], seed=3), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cache_latents", "lora", "embedding"])
def test_two_processes_equal_one_other_runs(variant: str, images: Path, vae_file: Path, tiny_ckpt: Path,
                                            tmp_path: Path) -> None:
    def raw(out: Path) -> dict:
        if variant == "cache_latents":
            r = _raw(out, "diffusion", images, vae_file)
            r["data"]["cache_latents"] = True
            return r
        r = _raw(out, "diffusion", images, vae_file)
        r["model"] = {"init_from": str(tiny_ckpt)}
        r["data"]["resolution"] = 32
        for k in ("prediction", "min_snr_gamma", "timestep_bias_strategy", "timestep_bias_multiplier"):
            del r["train"][k]
        r["train"].update({"what": variant, "ema_decay": 0.0, "lr": 1e-2})
        if variant == "lora":
            r["lora"] = {"rank": 4, "alpha": 2.0, "targets": ["attention", "text_encoder"]}
        else:
            r["train"].update({"embedding_name": "zorbish", "init_word": "square", "lr": 5e-2})
        return r

    one = Trainer(config_from_dict(raw(tmp_path / "one")), progress=False).run()
    two = run_ranks(raw(tmp_path / "two"), 2, tmp_path)
    _check_equal(one, tmp_path / "one", two, tmp_path / "two", raw(tmp_path)["train"]["lr"])


@pytest.mark.slow
def test_two_process_resume_is_exact_and_a_checkpoint_moves_between_world_sizes(images: Path, vae_file: Path,
                                                                                 two_diffusion: tuple,
                                                                                 tmp_path: Path) -> None:
    full = two_diffusion[1]
    part_raw = _raw(tmp_path / "part", "diffusion", images, vae_file)
    first = run_ranks(part_raw, 2, tmp_path, stop_at=2)
    assert all(r["interrupted"] and r["step"] == 2 for r in first)
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000002"
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == [ckpt.name]
    second = run_ranks(part_raw, 2, tmp_path, resume=ckpt)
    assert first[0]["losses"] + second[0]["losses"] == full[0]["losses"]  # bit for bit
    a, b = load_file(full[0]["export"]), load_file(second[0]["export"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    # the checkpoint does not depend on the world size: one process continues where two stopped
    one = Trainer(config_from_dict(part_raw), resume=ckpt, progress=False).run()
    assert one.losses == pytest.approx(full[0]["losses"][2:], rel=LOSS_RTOL, abs=0)


def test_cli_under_torchrun(images: Path, vae_file: Path, tmp_path: Path) -> None:
    lines = [f'[model]\nvae_from = "{vae_file}"', f'[data]\nfolder = "{images}"\nresolution = 16',
             '[train]\nsteps = 2\nbatch_size = 4\nthreads = 1', '[output]\ndir = "run"\nsample_every = 0']
    (tmp_path / "run.toml").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "sumie", "train",
           "run.toml"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 2 steps; wrote") == 1  # rank 0 reports
    assert load_file(tmp_path / "run" / "model.safetensors")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
