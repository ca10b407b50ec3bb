"""Draw the model card's sample grid: one row per prompt, one column per seed, default settings, upscaled 3x.

    python scripts/sumie-tiny-samples.py [--model PATH] [-o docs/img/sumie-tiny-samples.png]
"""

from __future__ import annotations

import argparse

from PIL import Image

import sumie
from sumie.pipelines.output import save_png
from sumie.pipelines.params import GenerationParams

PROMPTS = (
    "a red circle on a black background",
    "two blue squares on a pink background",
    "a large yellow triangle at the bottom on black",
    "a green circle in the top right on a white background",
    "a purple triangle and a white circle on gray",
    "a small orange square in the center",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded sumie-tiny)")
    ap.add_argument("-o", "--output", default="docs/img/sumie-tiny-samples.png")
    ap.add_argument("--seeds", type=int, default=4, help="columns: seeds 0..N-1")
    ap.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscale of the grid")
    args = ap.parse_args()
    engine = sumie.load(args.model)
    rows = [engine.generate(GenerationParams(prompt=p, seed=0, batch_size=args.seeds)).images for p in PROMPTS]
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * args.seeds, h * len(rows)))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, r * h))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    save_png(grid, args.output, None, overwrite=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
