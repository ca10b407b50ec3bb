"""``sumie bench`` and ``sumie eval adherence``: measurements, printed as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sumie.cli.speed import add_weight_packing_arg
from sumie.errors import ConfigError


def add_parsers(sub: Any, model_arg: Any) -> None:
    """Register ``bench`` and ``eval`` on the CLI's sub-parser collection."""
    p = sub.add_parser("bench", help="time one image: seconds per image, UNet share, load time (--cold: the "
                       "first image of a fresh `sumie generate` process)")
    model_arg(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--cfg-scale", type=float, help="CFG scale (default: the model's, 7 if it names none)")
    p.add_argument("--cold", action="store_true",
                   help="time fresh `sumie generate` processes from start to PNG written (startup, load, "
                        "generation), instead of warm images in this process")
    p.add_argument("--runs", type=int, help="timed runs, median reported (default: 3 warm runs after one "
                   "warm-up; 5 with --cold)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="Sumie's UNet through torch.compile with frozen weights (opt-in; compiled in the warm-up, "
                        "minutes on a CPU; not with --cold)")
    add_weight_packing_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("checkpoint", nargs="?", metavar="MODEL", help="the checkpoint (as --model)")
    c = p.add_argument_group("comparison with diffusers (--compare diffusers; needs pip install 'sumie[bench]')")
    c.add_argument("--compare", choices=["diffusers"], help="run Sumie and diffusers on MODEL, each in its own "
                   "process, interleaved; print both and the ratios diffusers / Sumie")
    c.add_argument("--sizes", default="256,512", help="square sizes, comma-separated (default: 256,512)")
    c.add_argument("--cfg", type=float, dest="cfg_scale", help="as --cfg-scale (default with --compare: 7)")
    c.add_argument("--batch", type=int, default=1, help="images per generation")
    c.add_argument("--repeat", type=int, default=1, help="(Sumie, diffusers) process pairs per size; medians")
    c.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up generation in each process")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    c.add_argument("--markdown", action="store_true", help="print table rows for docs/benchmarks.md")
    c.add_argument("--from-json", metavar="FILE", help="format a report saved with --json instead of running")
    c.add_argument("--make-random", choices=["sd15", "sdxl"], metavar="sd15|sdxl",
                   help="instead: write a random-weight checkpoint in the real single-file layout to -o FILE "
                        "(SD1.5: fp32 like v1-5-pruned-emaonly; SDXL: fp16 like sd_xl_base_1.0)")
    c.add_argument("-o", "--output", help="the file --make-random writes")
    c.add_argument("--overwrite", action="store_true", help="let --make-random replace an existing file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="evaluate a model")
    ev = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = ev.add_parser("adherence", help="prompt adherence on held-out (or seen) synthetic-shape prompts")
    model_arg(a)
    a.add_argument("--n-one", type=int, default=50, help="one-object prompts")
    a.add_argument("--n-two", type=int, default=50, help="two-object prompts")
    a.add_argument("--cfg-scale", type=float, nargs="+",
                   help="one or more CFG scales to compare (default: the model's, 7 if it names none)")
    a.add_argument("--cfg-rescale", type=float, default=0.0, metavar="PHI",
                   help="CFG rescale phi for every scale (Lin et al. 2023; 0 = off)")
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--sampler", default="DPM++ 2M")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--split", choices=("heldout", "seen", "star", "bar"), default="heldout",
                   help="held-out attribute combinations (the standard set), ones that occur in training, or prompts "
                        "with stars or bars (shapes sumie-tiny never saw; for adapters that teach them)")
    a.add_argument("--color-word", action="append", default=[], metavar="COLOUR=WORD",
                   help="seen prompts that name COLOUR by WORD (e.g. red=crimson, a word a textual-inversion "
                        "embedding teaches), scored as COLOUR; repeatable")
    a.add_argument("--embeddings", metavar="DIR", help="textual-inversion embeddings folder (words usable in prompts)")
    a.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA file to the UNet and text encoders for every image (strength 1 unless given); "
                        "repeatable")
    a.add_argument("--resolution", type=int)
    a.add_argument("--ceiling", action="store_true",
                   help="score ground-truth renders of the prompts after a round trip through the model's VAE instead "
                        "of generated images: the most any UNet, LoRA or embedding on that VAE can reach")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_eval_adherence)


def _check_positive(**values: int) -> None:
    from sumie.errors import ConfigError

    for name, v in values.items():
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def _pair(text: str) -> tuple[str, str]:
    from sumie.errors import ConfigError

    colour, sep, word = text.partition("=")
    if not sep or not colour or not word:
        raise ConfigError(f"--color-word {text!r}: give COLOUR=WORD, e.g. red=crimson")
    return colour.strip(), word.strip()


def _apply_loras(engine: Any, specs: list[str]) -> None:
    """Patch the engine's networks with LoRA files (``path[:strength]``) for the whole evaluation."""
    from pathlib import Path

    from sumie.adapters.lora.file import read_lora
    from sumie.errors import ConfigError

    patcher = engine.patcher.clone()
    for spec in specs:
        path, strength = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, strength = head, float(tail)
            except ValueError:
                raise ConfigError(f"--lora {spec!r}: the strength after ':' must be a number") from None
        patches = read_lora(path).patches(engine.models)
        patcher.add_patches(patches.text, strength=strength)
        patcher.add_patches(patches.unet, strength=strength)
    patcher.patch()


def cmd_bench(args: argparse.Namespace) -> int:
    """Median seconds per image and where they go."""
    from sumie.cli.bench import run_bench, run_cold

    if args.checkpoint is not None:
        if args.model is not None:
            raise ConfigError("give the model once: as MODEL or as --model")
        args.model = args.checkpoint
    if args.make_random or args.compare or args.from_json:
        return _cmd_compare(args)
    runs = args.runs if args.runs is not None else (5 if args.cold else 3)
    _check_positive(steps=args.steps, runs=runs)
    if args.cold and args.compile:
        raise ConfigError("--compile with --cold would time the compile in every run; bench --compile warm")
    extra = {} if args.cold else {"compile_unet": args.compile, "weight_packing": args.weight_packing}
    bench = run_cold if args.cold else run_bench
    report = bench(args.model, vae=args.vae, steps=args.steps, width=args.width, height=args.height,
                   sampler=args.sampler, cfg_scale=args.cfg_scale, runs=runs, threads=args.threads, **extra)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k + ':':<19} {v}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """``--make-random`` or ``--compare diffusers``."""
    from sumie.cli.bench_compare import format_markdown, format_report, make_random, run_compare, sampler_key

    if args.make_random:
        if not args.output:
            raise ConfigError("--make-random needs -o FILE, the checkpoint to write")
        if Path(args.output).exists() and not args.overwrite:
            raise ConfigError(f"{args.output}: already exists; pass --overwrite to replace it")
        make_random(args.make_random, args.output)
        print(f"wrote {args.output} ({args.make_random}, random weights)")
        return 0
    if args.from_json:
        try:
            report = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--from-json {args.from_json}: cannot read a report ({e})") from None
        print(format_markdown(report) if args.markdown else format_report(report))
        return 0
    if args.model is None:
        raise ConfigError("--compare diffusers needs a checkpoint: sumie bench --compare diffusers MODEL "
                          "(make one with --make-random sd15 -o sd15.safetensors)")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: give sizes in pixels, comma-separated, e.g. 256,512") from None
    report = run_compare(args.model, sizes=sizes, steps=args.steps, sampler=sampler_key(args.sampler),
                         cfg=7.0 if args.cfg_scale is None else args.cfg_scale, batch=args.batch, repeat=args.repeat,
                         threads=args.threads, device=args.device, dtype=args.dtype, warmup_steps=args.warmup_steps,
                         compile_unet=args.compile, weight_packing=args.weight_packing,
                         progress=None if args.json else lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_markdown(report) if args.markdown
          else format_report(report))
    return 0


def cmd_eval_adherence(args: argparse.Namespace) -> int:
    """Score generated images against held-out prompts, for each requested CFG scale."""
    import sumie
    from sumie.errors import ConfigError
    from sumie.tiny.adherence import default_prompts, run_adherence, run_ceiling

    _check_positive(steps=args.steps)
    if args.n_one < 0 or args.n_two < 0 or args.n_one + args.n_two == 0:
        raise ConfigError("--n-one and --n-two must be >= 0 and not both 0")
    engine = sumie.load(args.model, vae=args.vae, embeddings_dir=args.embeddings)
    engine.show_progress = False
    if args.color_word:
        from sumie.tiny.synthetic import word_prompts

        words = dict(_pair(w) for w in args.color_word)
        prompts = (word_prompts(args.n_one, "one", args.seed, words) +
                   word_prompts(args.n_two, "two", args.seed, words))
    else:
        prompts = default_prompts(args.n_one, args.n_two, seed=args.seed, split=args.split)
    if args.ceiling and (args.lora or args.embeddings or args.cfg_scale):
        raise ConfigError("--ceiling scores the VAE's round trips of ground-truth renders; it takes no --lora, "
                          "--embeddings or --cfg-scale (they change the UNet's images, not the VAE's)")
    if args.lora:
        _apply_loras(engine, args.lora)
    reports = {}
    for scale in ["vae round trip"] if args.ceiling else args.cfg_scale or [engine.default_cfg_scale]:
        if args.ceiling:
            r = run_ceiling(engine.models.vae, prompts, seed=args.seed,
                            resolution=args.resolution or engine.models.native_size or 512)
        else:
            r = run_adherence(engine, prompts, cfg_scale=scale, steps=args.steps, sampler=args.sampler,
                              seed=args.seed, resolution=args.resolution, cfg_rescale=args.cfg_rescale)
        r.pop("records", None)
        r.pop("scores", None)
        r["settings"]["split"] = args.split
        r["settings"].update(color_words=args.color_word, lora=args.lora, embeddings=args.embeddings)
        reports[str(scale)] = r
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
        return 0
    for scale, r in reports.items():
        parts = [f"{kind}-object {r[kind]['attributes_right']:.1%}" for kind in ("one", "two") if kind in r]
        rescale = f", rescale {args.cfg_rescale:g}" if args.cfg_rescale else ""
        head = "VAE round trip of ground truth" if args.ceiling else f"CFG {scale}{rescale}"
        print(f"{head} ({args.split} prompts): attributes right: " + ", ".join(parts) +
              f", all {r['all']['attributes_right']:.1%} ({r['all']['n_images']} images, "
              f"{r['seconds_per_image']:.2f} s/image)")
    return 0
