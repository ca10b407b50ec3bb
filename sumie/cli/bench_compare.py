"""``sumie bench --compare diffusers``: Sumie and diffusers on the same checkpoint and settings, each in its own
process, interleaved (Sumie, diffusers, Sumie, ...) so machine load falls on both alike; medians reported.

Each child loads the model (timed), warms up with one short generation at the same size and batch, then times one
generation: seconds per image (wall clock, and the process's CPU seconds: less swayed by other jobs on a shared
machine, though threads that spin-wait count too), UNet seconds per step, text-encoder and VAE-decode seconds
(forward hooks on those modules, the same code for both engines), peak RSS, and peak CUDA memory on a GPU.
Both use Karras sigmas with the chosen sampler (Euler: diffusers' ``EulerDiscreteScheduler``; DPM++ 2M:
``DPMSolverMultistepScheduler``), the same per-image seeds and CPU-generator start noise, and Sumie runs with
``convention="diffusers"``, so the two images should agree closely; their mean absolute difference in uint8 levels
is reported.

diffusers is a bench extra (``pip install 'sumie[bench]'``), imported only inside the child that runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENGINES = ("sumie", "diffusers")
# --sampler name -> (Sumie sampler, diffusers scheduler class); both with Karras sigmas
SAMPLERS = {"euler": ("Euler", "EulerDiscreteScheduler"), "dpmpp_2m": ("DPM++ 2M", "DPMSolverMultistepScheduler")}
DTYPES = ("fp32", "fp16", "bf16")
PROMPT, NEGATIVE = "a photo of a cat sitting on a wooden table, best quality", "blurry, low quality"
RESULT_PREFIX = "sumie-bench-result: "
INSTALL_HINT = "pip install 'sumie[bench]'"
# per-engine fields whose median is reported, and the ones a ratio (diffusers / sumie) is printed for
FIELDS = ("import_s", "load_s", "warmup_s", "seconds_per_image", "cpu_seconds_per_image", "unet_s_per_step",
          "text_encoder_s", "vae_s", "peak_rss_mib", "peak_cuda_mib")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One generation setting, as both children receive it (JSON on the command line)."""

    model: str
    size: int
    steps: int = 20
    sampler: str = "euler"
    cfg: float = 7.0
    batch: int = 1
    seed: int = 1
    threads: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    warmup_steps: int = 2
    config_dir: str = ""  # the diffusers config folder (bench_diffusers.write_config_folder)
    out_dir: str = ""  # where the child writes its images
    compile_unet: bool = False  # Sumie's opt-in compiled UNet (compiled during the warm-up)
    weight_packing: str = "auto"  # Sumie's prepacked CPU convolutions: auto (the default), on, off

    @property
    def seeds(self) -> list[int]:
        """Image k of the batch gets seed + k (Sumie's rule; diffusers gets one generator per image)."""
        return [self.seed + k for k in range(self.batch)]


def sampler_key(name: str) -> str:
    """``euler`` / ``dpmpp_2m`` from either spelling (``Euler``, ``DPM++ 2M``); a ConfigError otherwise."""
    from sumie.errors import ConfigError

    key = name.strip().lower().replace("++", "pp").replace(" ", "_")
    if key not in SAMPLERS:
        raise ConfigError(f"--sampler {name!r}: --compare runs {' or '.join(SAMPLERS)} (Karras sigmas on both sides)")
    return key


RANDOM_MODELS = {"sd15": ("sd1", "float32"), "sdxl": ("sdxl", "float16")}  # the dtypes of the published files


def make_random(kind: str, out: str | Path, seed: int = 0) -> None:
    """Write a random-weight checkpoint at the real shapes and key layout (SD1.5 fp32, SDXL fp16), atomically."""
    import torch

    from sumie.checkpoints.io import save_safetensors_atomic
    from sumie.checkpoints.save import random_single_file
    from sumie.configs import FAMILIES

    family, dtype = RANDOM_MODELS[kind]
    sd = random_single_file(FAMILIES[family], seed=seed)
    for k, v in sd.items():  # one tensor at a time: SDXL holds 14 GB in float32 before this
        if v.is_floating_point():
            sd[k] = v.to(getattr(torch, dtype))
    save_safetensors_atomic(sd, out)


# ----------------------------------------------------------------------------------------------------- in a child


class StageTimer:
    """Seconds spent inside named modules, from forward pre/post hooks (CUDA work synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.sync: Callable[[], None] = lambda: None
        if device.startswith("cuda"):
            import torch

            self.sync = torch.cuda.synchronize
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._start: dict[int, float] = {}
        self._handles: list[Any] = []

    def attach(self, stage: str, module: Any) -> None:
        """Count the time of every call of ``module`` under ``stage``."""
        self.seconds.setdefault(stage, 0.0)
        self.calls.setdefault(stage, 0)

        def before(mod: Any, args: Any) -> None:
            self.sync()
            self._start[id(mod)] = time.perf_counter()

        def after(mod: Any, args: Any, out: Any) -> None:
            self.sync()
            self.seconds[stage] += time.perf_counter() - self._start.pop(id(mod))
            self.calls[stage] += 1

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def reset(self) -> None:
        """Zero the counts (after the warm-up)."""
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _sumie_child(spec: RunSpec) -> tuple[Callable[[int], list[Any]], dict[str, list[Any]]]:
    """Load with Sumie; a function steps -> PIL images, and the modules of each stage."""
    import sumie
    from sumie.pipelines.params import GenerationParams

    engine = sumie.load(spec.model, dtype=_torch_dtype(spec.dtype), device=spec.device)
    engine.show_progress = False
    engine.set_weight_packing(spec.weight_packing)  # type: ignore[arg-type]
    if spec.compile_unet:
        engine.compile_unet()
    models = engine.models

    def generate(steps: int) -> list[Any]:
        params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=spec.size,
                                  height=spec.size, sampler=SAMPLERS[spec.sampler][0], scheduler="Karras",
                                  cfg_scale=spec.cfg, seed=spec.seed, batch_size=spec.batch, convention="diffusers")
        return list(engine.generate(params).images)

    return generate, {"unet": [models.unet], "text_encoder": list(models.text_encoders),
                      "vae": [models.vae.decoder]}


def _diffusers_child(spec: RunSpec) -> tuple[Callable[[int], list[Any]], dict[str, list[Any]]]:
    """Load with diffusers' ``from_single_file`` (configs from ``spec.config_dir``); the same two things."""
    import diffusers
    import torch

    from sumie.checkpoints.loader import stored_dtype

    info = json.loads((Path(spec.config_dir) / "model_index.json").read_text())
    cls = getattr(diffusers, info["_class_name"])
    extra = {} if "text_encoder_2" in info else {"safety_checker": None, "requires_safety_checker": False}
    # loaded at the file's own dtype, then cast: with torch_dtype=float32, from_single_file holds the whole fp16
    # state dict beside the fp32 networks (SDXL: ~21 GB at its peak instead of ~14 GB)
    stored = getattr(torch, stored_dtype(spec.model))
    pipe = cls.from_single_file(spec.model, config=spec.config_dir, local_files_only=True, torch_dtype=stored,
                                **extra).to(spec.device, _torch_dtype(spec.dtype))
    scheduler_cls = getattr(diffusers, SAMPLERS[spec.sampler][1])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)

    def generate(steps: int) -> list[Any]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in spec.seeds]  # Sumie's per-image CPU noise
        return list(pipe([PROMPT] * spec.batch, negative_prompt=[NEGATIVE] * spec.batch, num_inference_steps=steps,
                         guidance_scale=spec.cfg, width=spec.size, height=spec.size, generator=generators).images)

    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    return generate, {"unet": [pipe.unet], "text_encoder": encoders, "vae": [pipe.vae.decoder]}


def _import(engine: str) -> None:
    """Import what the engine's child needs (timed apart from the model load)."""
    import sumie.pipelines.engine  # noqa: F401

    if engine == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            from sumie.errors import ConfigError

            raise ConfigError(f"bench --compare diffusers needs diffusers: {INSTALL_HINT}") from None


def _peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def run_child(engine: str, spec: RunSpec) -> dict[str, Any]:
    """Load, warm up, time one generation; the figures of this process."""
    import torch

    torch.set_num_threads(spec.threads)  # this process is the bench's own child: its thread count is ours to set
    t0 = time.perf_counter()
    _import(engine)
    import_s = time.perf_counter() - t0
    load = _sumie_child if engine == "sumie" else _diffusers_child
    t0 = time.perf_counter()
    with torch.inference_mode():
        generate, stages = load(spec)
        load_s = time.perf_counter() - t0
        timer = StageTimer(spec.device)
        for stage, modules in stages.items():
            for m in modules:
                timer.attach(stage, m)
        t_warm = time.perf_counter()
        generate(spec.warmup_steps)
        warmup_s = time.perf_counter() - t_warm
        timer.reset()
        if spec.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        images = generate(spec.steps)
        if spec.device.startswith("cuda"):
            torch.cuda.synchronize()
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if timer.calls["unet"] == 0:
        raise RuntimeError(f"{engine}: the UNet hook saw no call; the timings would be wrong")
    paths = []
    for i, im in enumerate(images):
        paths.append(str(Path(spec.out_dir) / f"{engine}-{i}.png"))
        im.save(paths[-1])
    return {
        "engine": engine, "import_s": import_s, "load_s": load_s, "warmup_s": warmup_s,
        "seconds_per_image": total / spec.batch,
        "cpu_seconds_per_image": cpu / spec.batch,
        "unet_s_per_step": timer.seconds["unet"] / spec.steps, "unet_calls": timer.calls["unet"],
        "text_encoder_s": timer.seconds["text_encoder"], "vae_s": timer.seconds["vae"],
        "peak_rss_mib": _peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if spec.device.startswith("cuda") else None,
        "images": paths,
    }


def child_main(argv: list[str]) -> int:
    """``python -m sumie.cli.bench_compare ENGINE SPEC_JSON``: one result line on stdout, or one error line."""
    from sumie.errors import SumieError

    engine, spec = argv[0], RunSpec(**json.loads(argv[1]))
    try:
        result = run_child(engine, spec)
    except SumieError as e:
        print(f"sumie: error: {e}", file=sys.stderr)
        return 2
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------- the parent


def check_diffusers() -> str:
    """diffusers' version, or a ConfigError naming the extra to install."""
    from importlib import metadata

    from sumie.errors import ConfigError

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"bench --compare diffusers needs diffusers, which is not installed: {INSTALL_HINT}") \
            from None


def _spawn(engine: str, spec: RunSpec, timeout: float) -> dict[str, Any]:
    """Run one child and parse its result line; a failure is a SumieError with the child's last line."""
    from sumie.errors import SumieError

    package_root = str(Path(__file__).resolve().parents[2])  # the children import this very sumie
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "sumie.cli.bench_compare", engine, json.dumps(dataclasses.asdict(spec))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SumieError(f"bench --compare: the {engine} run at {spec.size}px took over {timeout:.0f} s; "
                         "try smaller --sizes or fewer --steps") from None
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line.removeprefix(RESULT_PREFIX)))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or ["no output"]
    last = lines[-1].removeprefix("sumie: error: ")
    raise SumieError(f"bench --compare: the {engine} run failed (exit {r.returncode}): {last}")


def _mean_abs_diff(a: list[str], b: list[str]) -> float:
    """Mean |difference| in uint8 levels between two lists of same-size images."""
    import numpy as np
    from PIL import Image

    def u8(path: str) -> Any:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

    return float(np.mean([np.abs(u8(x) - u8(y)).mean() for x, y in zip(a, b, strict=True)]))


def _image_std(paths: list[str]) -> float:
    """Standard deviation of the images' uint8 levels (near 0: flat images, a difference would mean nothing)."""
    import numpy as np
    from PIL import Image

    return float(np.std([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in paths]))


def machine() -> dict[str, Any]:
    """CPU model and count, OS, Python, torch and diffusers versions, date (UTC)."""
    from importlib import metadata

    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        diffusers_version: str | None = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        diffusers_version = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cpus": os.cpu_count(), "os": platform.platform(terse=True), "python":
            platform.python_version(), "torch": torch.__version__, "diffusers": diffusers_version,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_start": [round(x, 2) for x in load] if load else None}


@contextmanager
def _config_folder(model: str, sampler: str) -> Iterator[tuple[Path, Any]]:
    """A temporary folder holding the diffusers configs of ``model``, and Sumie's detected config."""
    from sumie.checkpoints.loader import inspect_checkpoint
    from sumie.cli.bench_diffusers import write_config_folder
    from sumie.errors import ConfigError

    path = Path(model)
    if path.is_dir():
        raise ConfigError(f"{model}: a folder; --compare diffusers takes a single-file checkpoint (.safetensors)")
    config = inspect_checkpoint(path).config  # a clear error for a missing or unknown file
    with tempfile.TemporaryDirectory(prefix="sumie-bench-") as tmp:
        yield write_config_folder(config, Path(tmp) / "configs", SAMPLERS[sampler][1]), config


def run_compare(model: str, *, sizes: list[int], steps: int = 20, sampler: str = "euler", cfg: float = 7.0,
                batch: int = 1, repeat: int = 1, threads: int | None = None, device: str = "cpu",
                dtype: str = "fp32", warmup_steps: int = 2, timeout: float = 3600, compile_unet: bool = False,
                weight_packing: str = "auto", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sumie against diffusers at each size: per-engine medians over ``repeat`` interleaved child pairs, the ratios
    diffusers / Sumie, and the mean |diff| between their images."""
    import torch

    from sumie.errors import ConfigError

    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    for name, v in (("steps", steps), ("batch", batch), ("repeat", repeat), ("warmup-steps", warmup_steps)):
        if v < 1:
            raise ConfigError(f"--{name} must be at least 1, got {v}")
    for s in sizes:
        if s < 64 or s % 64:
            raise ConfigError(f"--sizes: {s} is not a multiple of 64 (at least 64)")
    check_diffusers()
    threads = threads or torch.get_num_threads()
    host = machine()
    rows = []
    with _config_folder(model, sampler) as (config_dir, config), tempfile.TemporaryDirectory() as images:
        for size in sizes:
            runs: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
            for rep in range(repeat):
                for engine in ENGINES:
                    out = Path(images) / f"{size}-{rep}"
                    out.mkdir(exist_ok=True)
                    spec = RunSpec(model=str(model), size=size, steps=steps, sampler=sampler, cfg=cfg, batch=batch,
                                   threads=threads, device=device, dtype=dtype, warmup_steps=warmup_steps,
                                   config_dir=str(config_dir), out_dir=str(out), compile_unet=compile_unet,
                                   weight_packing=weight_packing)
                    if progress:
                        progress(f"{size}x{size} run {rep + 1}/{repeat}: {engine}")
                    runs[engine].append(_spawn(engine, spec, timeout))
            rows.append(_row(size, runs))
    return {"model": str(model), "family": config.family, "steps": steps, "sampler": sampler,
            "schedule": "Karras", "cfg": cfg, "batch": batch, "device": device, "dtype": dtype, "threads": threads,
            "repeat": repeat, "warmup_steps": warmup_steps, "compile_unet": compile_unet,
            "weight_packing": weight_packing, "machine": host,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "rows": rows}


def _row(size: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per engine, ratios diffusers / Sumie (above 1: Sumie is faster or smaller), image difference."""
    row: dict[str, Any] = {"size": size}
    for engine, rs in runs.items():
        row[engine] = {f: (round(statistics.median(r[f] for r in rs), 4) if rs[0][f] is not None else None)
                       for f in FIELDS}
        row[engine]["seconds_per_image_each"] = [round(r["seconds_per_image"], 3) for r in rs]
        row[engine]["unet_calls"] = rs[0]["unet_calls"]
    s, d = row["sumie"], row["diffusers"]
    row["ratio"] = {f: (round(d[f] / s[f], 3) if s[f] and d[f] is not None else None) for f in FIELDS}
    row["mean_abs_diff_uint8"] = round(_mean_abs_diff(runs["sumie"][0]["images"], runs["diffusers"][0]["images"]), 3)
    row["image_std_uint8"] = round(_image_std(runs["sumie"][0]["images"]), 2)
    return row


COLUMNS = (("s/image", "seconds_per_image"), ("CPU s/image", "cpu_seconds_per_image"),
           ("UNet s/step", "unet_s_per_step"), ("text s", "text_encoder_s"), ("VAE s", "vae_s"), ("load s", "load_s"),
           ("import s", "import_s"), ("warm-up s", "warmup_s"), ("peak RSS MiB", "peak_rss_mib"),
           ("peak CUDA MiB", "peak_cuda_mib"))


def _sumie_options(report: dict[str, Any], warmup_s: float | None = None) -> str:
    """How Sumie ran when not as by default: ", Sumie's UNet compiled", ", Sumie's weight packing on"."""
    warm = f" (warm-up {warmup_s:.0f} s)" if warmup_s is not None else ""
    packing = report.get("weight_packing", "auto")
    packing = {True: "auto", False: "off"}.get(packing, packing)  # reports of commit f0d4764 held a bool
    return ((f", Sumie's UNet compiled{warm}" if report.get("compile_unet") else "")
            + (f", Sumie's weight packing {packing}" if packing != "auto" else ""))


# diffusers' "linspace" timestep spacing (SD1.x / SDXL scheduler configs) puts a lone step at t = 0
ONE_STEP_NOTE = ("note: with 1 step the images are not comparable: diffusers' linspace timestep spacing takes its one "
                 "step from t = 0 (sigma 0.029), A1111 and Sumie from the schedule's sigma_max (14.6 for SD); "
                 "compare speed only, or use 2 steps or more")


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table: one line per engine and size, then the ratios."""
    m = report["machine"]
    lines = [f"model: {report['model']} ({report['family']}), {report['sampler']} ({report['schedule']}), "
             f"{report['steps']} steps, CFG {report['cfg']:g}, batch {report['batch']}, {report['dtype']} "
             f"{report['device']}, {report['threads']} threads, median of {report['repeat']} (interleaved)"
             + _sumie_options(report),
             f"machine: {m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}, diffusers {m['diffusers']}, {m['date']}, "
             f"load average {m['loadavg_start']} -> {report['loadavg_end']}"]
    columns = COLUMNS if report["device"].startswith("cuda") else COLUMNS[:-1]
    order = [f for _, f in columns]
    table = [("size", "engine", *(h for h, _ in columns))]
    for row in report["rows"]:
        size = f"{row['size']}x{row['size']}"
        for engine in ENGINES:
            table.append((size, engine, *(_num(row[engine].get(f)) for f in order)))
        table.append((size, "ratio d/s", *(_num(row["ratio"].get(f), "x") for f in order)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              for r in table]
    for row in report["rows"]:
        ratio = row["ratio"]
        lines.append(f"{row['size']}x{row['size']}: diffusers / Sumie seconds per image "
                     f"{_num(ratio['seconds_per_image'], 'x')}, peak RSS {_num(ratio['peak_rss_mib'], 'x')}; the "
                     f"images differ by {row['mean_abs_diff_uint8']:.3f} uint8 levels on average (image std "
                     f"{row['image_std_uint8']:.1f})")
    if report["steps"] == 1:
        lines.append(ONE_STEP_NOTE)
    return "\n".join(lines)


MARKDOWN_HEADER = ("| model | size | steps | sampler | batch | dtype, device | s/image Sumie / diffusers | ratio | "
                   "CPU s/image ratio | UNet s/step S / D | text s S / D | VAE s S / D | load s S / D | "
                   "peak RSS MiB S / D | image diff | runs | machine | torch, diffusers | date | load avg |\n"
                   "|" + "---|" * 20)


def format_markdown(report: dict[str, Any]) -> str:
    """One Markdown table row per size (for docs/benchmarks.md), each with its machine, versions and date."""
    m = report["machine"]
    out = []
    for row in report["rows"]:
        s, d, r = row["sumie"], row["diffusers"], row["ratio"]

        def pair(f: str, s: dict[str, Any] = s, d: dict[str, Any] = d) -> str:
            return f"{_num(s[f])} / {_num(d[f])}"

        load = f"{m['loadavg_start'][0]:.1f} -> {report['loadavg_end'][0]:.1f}" if m["loadavg_start"] else "-"
        out.append(" | ".join(["", Path(report["model"]).name, f"{row['size']}²", str(report["steps"]),
                               f"{report['sampler']} (Karras), CFG {report['cfg']:g}"
                               + _sumie_options(report, s["warmup_s"]), str(report["batch"]),
                               f"{report['dtype']} {report['device']}, {report['threads']} threads",
                               pair("seconds_per_image"), f"**{_num(r['seconds_per_image'], 'x')}**",
                               _num(r["cpu_seconds_per_image"], "x"), pair("unet_s_per_step"),
                               pair("text_encoder_s"), pair("vae_s"), pair("load_s"),
                               f"{pair('peak_rss_mib')} ({_num(r['peak_rss_mib'], 'x')})",
                               f"{row['mean_abs_diff_uint8']:.2f}", str(report["repeat"]),
                               f"{m['cpu']} ({m['cpus']} CPUs)", f"{m['torch']}, {m['diffusers']}", m["date"], load,
                               ""]).strip())
    return "\n".join(out)


def _num(v: float | None, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{suffix}" if abs(v) < 100 else f"{v:.0f}{suffix}"


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
