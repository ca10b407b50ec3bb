"""``sumie bench``: where the time of one image goes (load, text encoding, UNet steps, VAE decode)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_bench(model: str | Path | None, *, vae: str | Path | None = None, steps: int = 20, width: int | None = None,
              height: int | None = None, sampler: str = "DPM++ 2M", cfg_scale: float | None = None, runs: int = 3,
              dtype: torch.dtype = torch.float32, device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Median seconds per image over ``runs`` generations after one warm-up, plus the share of each stage."""
    import sumie
    from sumie.pipelines.params import GenerationParams

    if threads:
        torch.set_num_threads(threads)
    engine, load_s = _timed(lambda: sumie.load(model, dtype=dtype, device=device, vae=vae))
    engine.show_progress = False
    cfg = engine.models.config
    unet_calls = 0
    unet_time = 0.0
    inner = engine.models.unet.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal unet_calls, unet_time
        out, dt = _timed(lambda: inner(*args, **kwargs))
        unet_calls += 1
        unet_time += dt
        return out

    engine.models.unet.forward = counted  # type: ignore[method-assign]
    params = GenerationParams(prompt="a red circle on a blue background", steps=steps, width=width, height=height,
                              sampler=sampler, cfg_scale=cfg_scale, seed=1)
    _timed(lambda: engine.generate(params))  # warm-up (allocator, kernels)
    totals, unets, calls = [], [], []
    for i in range(runs):
        unet_calls, unet_time = 0, 0.0
        result, total = _timed(lambda i=i: engine.generate(GenerationParams(**{**params.__dict__, "seed": i + 2})))
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
