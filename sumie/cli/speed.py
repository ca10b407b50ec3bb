"""The speed options that change the image on the command line (A1111's names where A1111 has the option)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sumie.configs import PACKING_MODES

# CLI option -> GenerationParams field (all default to None = not given, as the other one-to-one options)
PARAM_FIELDS = {
    "token_merging_ratio": "token_merging_ratio", "token_merging_ratio_hr": "token_merging_ratio_hr",
    "token_merging_random": "token_merging_random", "ngms": "s_min_uncond", "ngms_all_steps": "s_min_uncond_all",
    "skip_early_cond": "skip_early_cond", "deepcache_interval": "deepcache_interval",
    "deepcache_depth": "deepcache_depth", "taesd_decode": "taesd_decode",
}


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The speed options that change the image (each off by default; README "Speed options that change the image"),
    and ``--compile``, which does not."""
    e = p.add_argument_group("speed options that keep the image")
    e.add_argument("--compile", action="store_true",
                   help="run the UNet through torch.compile (inductor) with its weights frozen: faster once "
                        "compiled, the image within fp32 rounding; compiling takes minutes on a CPU, again for each "
                        "new size and after a LoRA changes the weights (README \"Speed\")")
    add_weight_packing_arg(e)
    g = p.add_argument_group("speed options that change the image (off by default)")
    g.add_argument("--token-merging-ratio", type=float, metavar="X",
                   help="ToMe: merge this fraction of the self-attention tokens at the highest resolution, in "
                        "[0, 0.9] (A1111's \"Token merging ratio\"; default: 0, off)")
    g.add_argument("--token-merging-ratio-hr", type=float, metavar="X",
                   help="ToMe ratio of the hires pass (default: 0 = --token-merging-ratio)")
    g.add_argument("--token-merging-random", action="store_true", default=None,
                   help="ToMe destination tokens drawn from the seed instead of A1111's fixed corner of each 2x2")
    g.add_argument("--ngms", type=float, metavar="SIGMA",
                   help="A1111's negative guidance minimum sigma: skip the uncond pass on every other step once "
                        "sigma < SIGMA (default: 0, off)")
    g.add_argument("--ngms-all-steps", action="store_true", default=None,
                   help="with --ngms: skip it on every step below SIGMA")
    g.add_argument("--skip-early-cond", type=float, metavar="X",
                   help="A1111's \"Skip Early CFG\": no uncond pass on this fraction of the first steps, in [0, 1] "
                        "(default: 0, off)")
    g.add_argument("--deepcache-interval", type=int, metavar="N",
                   help="DeepCache: the whole UNet every N-th call, the calls between reuse its deep features "
                        "(default: 0, off; 3 is usual)")
    g.add_argument("--deepcache-depth", type=int, metavar="D",
                   help="DeepCache skip branch: input blocks 0..D and their decoder blocks are recomputed "
                        "(default: 0, the shallowest)")
    g.add_argument("--taesd-decode", action="store_true", default=None,
                   help="decode the final images with the --taesd FILE decoder instead of the VAE (A1111's "
                        "\"VAE Decoder: TAESD\")")


def add_weight_packing_arg(p: argparse._ActionsContainer) -> None:
    """``--weight-packing auto|on|off`` (models/packed)."""
    p.add_argument("--weight-packing", choices=PACKING_MODES, default="auto",
                   help="CPU convolutions and linear layers with prepacked weights (oneDNN, Winograd), the image "
                        "within fp32 rounding: auto (default) where it costs no memory (a float32 file's weights), "
                        "on for every weight (faster with fp16 files, a second copy of the weights), off (README "
                        "\"Speed\")")


def apply_engine_args(engine: Any, args: argparse.Namespace) -> None:
    """``--compile``: the engine's opt-in compiled UNet, its compile messages on stderr; ``--weight-packing``."""
    if getattr(args, "weight_packing", "auto") != "auto":
        engine.set_weight_packing(args.weight_packing)
    if getattr(args, "compile", False):
        engine.compile_unet(log=lambda m: print(f"sumie: {m}", file=sys.stderr, flush=True))
