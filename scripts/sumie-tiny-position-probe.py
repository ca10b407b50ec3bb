"""Does a model place a shape where the prompt says? A picture for the sumie-tiny model card.

    python scripts/sumie-tiny-position-probe.py [--model FILE] -o docs/img/position-probe.png

Columns: the 9 positions of "a large blue square <position> on a white background". Top two rows: the model's x0
prediction at t = 999 (pure noise in, where a zero-terminal-SNR model decides the layout) for two noise seeds, the
same noise in every column. Bottom rows: finished images (DPM++ 2M, 20 steps, CFG 7), seeds 1-3. Prints how many of
the 27 finished images the adherence detector finds at the right position (chance: 3).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import sumie
from sumie.eval.adherence import score
from sumie.pipelines.params import GenerationParams
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.training.synthetic import POSITIONS

PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
           "center": "in the center", "right": "on the right", "bottom left": "in the bottom left",
           "bottom": "at the bottom", "bottom right": "in the bottom right"}


def _to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model file (default: the embedded sumie-tiny)")
    ap.add_argument("-o", "--output", default="position-probe.png")
    args = ap.parse_args()
    engine = sumie.load(args.model) if args.model else sumie.load()
    engine.show_progress = False
    m = engine.models
    if m.config.prediction != "v" or not m.zero_terminal_snr:
        raise SystemExit("the x0 rows need a v-prediction model trained with zero terminal SNR (as sumie-tiny is)")
    te, tc = m.text_encoders[0], m.config.text_encoders[0]
    prompts = [f"a large blue square {PHRASES[p]} on a white background" for p in POSITIONS]
    context, _ = te(CLIPTokenizer()(prompts, pad_id=tc.pad_id), layer=tc.layer, final_norm=tc.final_norm,
                    need_pooled=False)
    size = 64
    latent = size // m.vae.downscale
    grid = Image.new("RGB", (size * len(prompts), size * 5), "white")
    for row, seed in enumerate((1, 2)):
        noise = torch.randn(1, m.config.unet.in_channels, latent, latent,
                            generator=torch.Generator().manual_seed(seed)).repeat(len(prompts), 1, 1, 1)
        x0 = -m.unet(noise, torch.full((len(prompts),), 999), context).float()  # v-prediction at zero SNR: v = -x0
        for col, x in enumerate(m.vae.decode(m.vae.unscale_latents(x0))):
            grid.paste(_to_image(x), (size * col, size * row))
    right = 0
    for row, seed in enumerate((1, 2, 3), start=2):
        for col, prompt in enumerate(prompts):
            image = engine.generate(GenerationParams(prompt=prompt, seed=seed, width=size, height=size)).images[0]
            grid.paste(image, (size * col, size * row))
            right += bool(score(image, prompt)["position"])
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.output)
    print(f"position right in {right} of {3 * len(prompts)} images; wrote {args.output}")


if __name__ == "__main__":
    main()
