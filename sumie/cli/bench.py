"""``sumie bench``: where the time of one image goes (load, text encoding, UNet steps, VAE decode), warm in this
process (:func:`run_bench`) or cold, as a user's first ``sumie generate`` (:func:`run_cold`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_bench(model: str | Path | None, *, vae: str | Path | None = None, steps: int = 20, width: int | None = None,
              height: int | None = None, sampler: str = "DPM++ 2M", cfg_scale: float | None = None, runs: int = 3,
              dtype: torch.dtype | None = None, device: str = "cpu", threads: int | None = None,
              compile_unet: bool = False, weight_packing: str = "auto") -> dict[str, Any]:
    """Median seconds per image over ``runs`` generations after one warm-up, plus the share of each stage
    (``compile_unet``: the opt-in compiled UNet, compiled during the warm-up; ``weight_packing``: the CPU
    convolutions' mode, auto / on / off)."""
    import torch

    import sumie
    from sumie.pipelines.denoise import ModelHooks
    from sumie.pipelines.params import GenerationParams

    dtype = dtype or torch.float32

    if threads:
        torch.set_num_threads(threads)
    engine, load_s = _timed(lambda: sumie.load(model, dtype=dtype, device=device, vae=vae))
    engine.show_progress = False
    engine.set_weight_packing(weight_packing)  # type: ignore[arg-type]
    if compile_unet:
        engine.compile_unet()
    cfg = engine.models.config
    unet_calls = 0
    unet_time = 0.0

    def counted(apply: Any, x: Any, sigma: Any, **kwargs: Any) -> Any:  # around each model call: the UNet's time
        nonlocal unet_calls, unet_time
        out, dt = _timed(lambda: apply(x, sigma, **kwargs))
        unet_calls += 1
        unet_time += dt
        return out

    hooks = ModelHooks(wrappers=[counted])
    params = GenerationParams(prompt="a red circle on a blue background", steps=steps, width=width, height=height,
                              sampler=sampler, cfg_scale=cfg_scale, seed=1)
    _timed(lambda: engine.generate(params, hooks=hooks))  # warm-up (allocator, kernels)
    totals, unets, calls = [], [], []
    for i in range(runs):
        unet_calls, unet_time = 0, 0.0
        result, total = _timed(lambda i=i: engine.generate(GenerationParams(**{**params.__dict__, "seed": i + 2}),
                                                           hooks=hooks))
        totals.append(total)
        unets.append(unet_time)
        calls.append(unet_calls)
    size = result.images[0].size
    return {
        "model": engine.models.source,
        "family": cfg.family,
        "size": f"{size[0]}x{size[1]}",
        "steps": steps,
        "sampler": sampler,
        "cfg_scale": result.params.cfg_scale,  # the model's default when none was given
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_s": round(load_s, 3),
        "seconds_per_image": round(statistics.median(totals), 3),
        "unet_seconds": round(statistics.median(unets), 3),
        "unet_calls": calls[0],
        "other_seconds": round(statistics.median(t - u for t, u in zip(totals, unets, strict=True)), 3),
        "runs": runs,
    }


COLD_PROMPT = "a red circle on a white background"


def _child_command(model: str | Path | None, vae: str | Path | None, steps: int, width: int | None,
                   height: int | None, sampler: str, cfg_scale: float | None, out: Path) -> list[str]:
    """``python -m sumie generate ...`` as a user would type it (default device and dtype), quiet, one PNG."""
    cmd = [sys.executable, "-m", "sumie", "generate", COLD_PROMPT, "-o", str(out), "--overwrite", "-q",
           "--steps", str(steps), "--sampler", sampler, "--seed", "1"]
    for flag, value in (("--model", model), ("--vae", vae), ("--width", width), ("--height", height),
                        ("--cfg-scale", cfg_scale)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def _child_timings(stderr: str) -> dict[str, float]:
    """The ``sumie: timings: {...}`` line a child prints when SUMIE_BENCH_TIMINGS is set."""
    from sumie.errors import SumieError

    for line in stderr.splitlines():
        if line.startswith("sumie: timings: "):
            return {k: float(v) for k, v in json.loads(line.removeprefix("sumie: timings: ")).items()}
    raise SumieError("bench --cold: the child process printed no timings; is this sumie the one on its path?")


def run_cold(model: str | Path | None, *, vae: str | Path | None = None, steps: int = 20, width: int | None = None,
             height: int | None = None, sampler: str = "DPM++ 2M", cfg_scale: float | None = None, runs: int = 5,
             threads: int | None = None) -> dict[str, Any]:
    """Median wall seconds from starting a fresh ``sumie generate`` process to its PNG being written, over ``runs``
    processes, split into startup (interpreter, imports, checks), model load and generation."""
    from sumie.cli.main import TIMINGS_ENV
    from sumie.errors import SumieError

    package_root = str(Path(__file__).resolve().parents[2])  # the children import this very sumie
    env = {**os.environ, TIMINGS_ENV: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="sumie-bench-") as tmp:
        out = Path(tmp) / "cold.png"
        cmd = _child_command(model, vae, steps, width, height, sampler, cfg_scale, out)
        for _ in range(runs):
            start = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=1800)
            exited = time.time()
            if r.returncode != 0 or not out.is_file():
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise SumieError(f"bench --cold: `sumie generate` failed (exit {r.returncode}): {last}")
            t = _child_timings(r.stderr)
            rows.append({"wall_s": t["written"] - start, "startup_s": t["load_start"] - start,
                         "load_s": t["load_end"] - t["load_start"], "generate_s": t["generate_end"] - t["load_end"],
                         "save_s": t["written"] - t["generate_end"], "exit_s": exited - t["written"]})
    report: dict[str, Any] = {"model": str(model) if model is not None else "sumie-tiny", "steps": steps,
                              "sampler": sampler, "runs": runs, "cpu": platform.processor() or platform.machine(),
                              "cpus": os.cpu_count()}
    for key in rows[0]:
        report[key] = round(statistics.median(r[key] for r in rows), 3)
    report["wall_s_each"] = [round(r["wall_s"], 3) for r in rows]
    return report
