"""Measure the speed options that change the image (README "Speed options that change the image").

    PYTHONPATH=. python scripts/bench-speed-options.py generate [--model FILE] [--size 256] [--steps 20] [--rounds 5]
    PYTHONPATH=. python scripts/bench-speed-options.py train [--steps 8] [--batch-size 32]

``generate``: seconds per image (CPU seconds of the process, which a busy shared machine disturbs far less than wall
seconds, and wall seconds) of each option against the plain run, medians over ``rounds`` rounds in which every
variant runs once (interleaved, the order rotated each round, after a 1-step warm-up), and the image difference to
the plain run: mean |diff| in uint8 levels and PSNR. Without ``--model``: sumie-tiny at 64 px. ``--model`` takes a
checkpoint, e.g. a random-weight SD1.5 file from ``sumie random-checkpoint sd1 FILE``. TAESD decode uses a
random-weight TAESD (its time is what matters; its image is noise) and only where the VAE downscales 8x.

``train``: sumie-tiny fine-tuning steps (UNet + text encoder, 64 px, cached latents) with and without
``gradient_checkpointing``, each in a fresh process: median seconds per step (wall and CPU) after 2 warm-up steps,
and the peak
resident memory of the process (``ru_maxrss``) over that of the same process before its first step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS: dict[str, dict[str, object]] = {
    "plain": {},
    "ToMe 0.5": {"token_merging_ratio": 0.5},
    "ToMe 0.3": {"token_merging_ratio": 0.3},
    "DeepCache N=3, depth 0": {"deepcache_interval": 3},
    "DeepCache N=3, depth 2": {"deepcache_interval": 3, "deepcache_depth": 2},
    "NGMS 1.0": {"s_min_uncond": 1.0},
    "NGMS 1.0, all steps": {"s_min_uncond": 1.0, "s_min_uncond_all": True},
    "NGMS 2.0": {"s_min_uncond": 2.0},
    "Skip Early CFG 0.2": {"skip_early_cond": 0.2},
    "TAESD decode": {"taesd_decode": True},
}


def _generate(args: argparse.Namespace) -> None:
    import torch

    import sumie
    from sumie.models.taesd import TAESD
    from sumie.pipelines.params import GenerationParams

    torch.set_num_threads(args.threads)
    engine = sumie.load(args.model)
    engine.show_progress = False
    variants = dict(VARIANTS)
    if engine.models.vae.downscale == 8:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            engine.taesd = TAESD(encoder=False).eval()
    else:
        variants.pop("TAESD decode")
    size = args.size or None  # None: the model's native size

    def once(kw: dict[str, object], steps: int) -> tuple[float, float, np.ndarray]:
        p = GenerationParams(prompt="a red circle on a blue background", negative_prompt="blurry", steps=steps,
                             width=size, height=size, seed=1, sampler="DPM++ 2M", cfg_scale=7.0, **kw)  # type: ignore
        t0, c0 = time.perf_counter(), time.process_time()
        image = engine.generate(p).images[0]
        return time.perf_counter() - t0, time.process_time() - c0, np.asarray(image).astype(np.float64)

    if args.variants:
        variants = {n: variants[n] for n in args.variants.split(";") if n in variants}
    names = list(variants)
    once({}, 1)  # warm-up (allocator, lazy initialisation)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    images: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            w, c, im = once(variants[n], args.steps)
            wall[n].append(w)
            cpu[n].append(c)
            images[n] = im
            print(f"round {r} {n}: wall {w:.2f} s, cpu {c:.2f} s", file=sys.stderr, flush=True)
    base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    rows = []
    for n in names:
        mw, mc = statistics.median(wall[n]), statistics.median(cpu[n])
        diff = np.abs(images[n] - images["plain"])
        mse = float((diff ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        rows.append({"variant": n, "cpu_s_per_image": round(mc, 3), "cpu_speedup": round(base_c / mc, 3),
                     "wall_s_per_image": round(mw, 3), "wall_speedup": round(base_w / mw, 3),
                     "mean_abs_diff": round(float(diff.mean()), 2), "psnr_db": round(psnr, 1)})
    print(json.dumps({"model": str(args.model or "sumie-tiny"), "size": size, "steps": args.steps,
                      "rounds": args.rounds, "threads": args.threads, "rows": rows}, indent=1))
    print("| variant | CPU s/image | speed-up | wall s/image | speed-up | mean abs diff (uint8) | PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['cpu_s_per_image']} | {row['cpu_speedup']}x | {row['wall_s_per_image']} | "
              f"{row['wall_speedup']}x | {row['mean_abs_diff']} | {row['psnr_db']} |")


def _train_one(args: argparse.Namespace) -> None:
    """One training measurement in this process (called by ``train`` in a fresh process per variant)."""
    import torch

    from sumie.checkpoints.embedded import resolve_model
    from sumie.training.config import config_from_dict
    from sumie.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({
            "model": {"init_from": str(resolve_model(None))},
            "data": {"synthetic": {"length": 256, "seed": 1}, "resolution": 64, "cache_latents": True},
            "train": {"what": "diffusion", "train_text_encoder": True, "steps": args.steps + 2,
                      "batch_size": args.batch_size, "lr": 1e-4, "seed": 0,
                      "gradient_checkpointing": args.checkpointing},
            "output": {"dir": tmp, "checkpoint_every": 0, "sample_every": 0},
        })
        trainer = Trainer(cfg, progress=False)
        trainer.prepare()
        trainer.train_step()  # warm-up
        trainer.train_step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times, cpu = [], []
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"checkpointing": args.checkpointing, "s_per_step": statistics.median(times),
                      "cpu_s_per_step": statistics.median(cpu), "peak_rss_mib": peak / 1024,
                      "rss_before_mib": before / 1024}))


def _train(args: argparse.Namespace) -> None:
    results = []
    for r in range(args.rounds):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            cmd = [sys.executable, __file__, "train-one", "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads)] + (["--checkpointing"] if flag else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
    for flag in (False, True):
        runs = [x for x in results if x["checkpointing"] == flag]
        print(json.dumps({"gradient_checkpointing": flag,
                          "s_per_step": round(statistics.median(x["s_per_step"] for x in runs), 3),
                          "cpu_s_per_step": round(statistics.median(x["cpu_s_per_step"] for x in runs), 3),
                          "peak_rss_mib": round(statistics.median(x["peak_rss_mib"] for x in runs)),
                          "peak_minus_before_mib": round(statistics.median(
                              x["peak_rss_mib"] - x["rss_before_mib"] for x in runs))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", type=Path, default=None)
    g.add_argument("--size", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--variants", default="", help="';'-separated names of VARIANTS (default: all)")
    for name in ("train", "train-one"):
        t = sub.add_parser(name)
        t.add_argument("--steps", type=int, default=8)
        t.add_argument("--batch-size", type=int, default=32)
        t.add_argument("--rounds", type=int, default=2)
        t.add_argument("--threads", type=int, default=1)
        t.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    {"generate": _generate, "train": _train, "train-one": _train_one}[args.what](args)


if __name__ == "__main__":
    main()
