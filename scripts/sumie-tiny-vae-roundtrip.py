"""How much of a picture survives a model's VAE? The adherence ceiling for the sumie-tiny model card.

    python scripts/sumie-tiny-vae-roundtrip.py [--model FILE] [--vae FILE] [--n 600]

Renders the true pictures of the standard held-out evaluation prompts (``sumie eval adherence``'s 50 + 50) and of
``--n`` training images, encodes each with the VAE (posterior mean), decodes it, and scores the decoded image with
the adherence detector: held-out prompts as ``eval adherence`` scores them (stated attributes), training images on
every instance's colour, shape, size and cell (``full_spec``). Shape accuracy is also split by object size, since
small objects (8-11 px) lose their shape first.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import torch
from PIL import Image

import sumie
from sumie.tiny.adherence import default_prompts, detect, evaluate, score
from sumie.tiny.synthetic import TrainSet, realize, render, to_tensor


@torch.no_grad()
def round_trip(engine: Any, image: Image.Image) -> Image.Image:
    """Encode (posterior mean) and decode one PIL image through the engine's VAE."""
    return engine.decode(engine.encode(to_tensor(image)[None]))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the embedded sumie-tiny)")
    ap.add_argument("--vae", help="standalone VAE replacing the model's")
    ap.add_argument("--n", type=int, default=600, help="training images scored on every instance")
    args = ap.parse_args()
    engine = sumie.load(args.model, vae=args.vae)
    prompts = default_prompts()
    images, specs = [], []
    for i, (caption, spec) in enumerate(prompts):
        images.append(round_trip(engine, render(realize(spec, random.Random(f"roundtrip:{i}:{caption}")))))
        specs.append(spec)
    report = evaluate(images, specs)
    report.pop("scores", None)
    heldout = {kind: round(100 * report[kind]["attributes_right"], 1) for kind in ("one", "two", "all")}
    heldout["per_attribute"] = {k: round(100 * v, 1) for k, v in report["all"]["per_attribute"].items()}
    ds = TrainSet(64, args.n, seed=21, heldout=None)
    by_attr: dict[str, list[bool]] = {}
    by_size: dict[str, list[bool]] = {}
    for i in range(args.n):
        s = ds.sample(i)
        out = round_trip(engine, s.image)
        instances = s.scene.instances
        for key, ok in score(out, s.scene.full_spec(), detect(out)).items():
            attr = key.split("_")[0]
            by_attr.setdefault(attr, []).append(ok)
            if attr == "shape":  # full_spec: object k is instance k
                k = int(key.split("_")[1]) - 1 if "_" in key else 0
                by_size.setdefault(instances[k].size, []).append(ok)
    pct = {k: round(100 * sum(v) / len(v), 1) for k, v in by_attr.items()}
    shape_by_size = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by_size.items())}
    print(json.dumps({"heldout_prompts": heldout, "training_images": pct, "shape_by_size": shape_by_size}, indent=2))


if __name__ == "__main__":
    main()
