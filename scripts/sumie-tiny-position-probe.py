"""Does a model place a shape where the prompt says? A picture for the sumie-tiny model card.

    python scripts/sumie-tiny-position-probe.py [--model FILE] -o docs/img/sumie-tiny-position-probe.png

Columns: the 9 positions of "a large blue square <position> on a white background". Top two rows: the model's x0
prediction at t = 999 (pure noise in, where a zero-terminal-SNR model decides the layout) for two noise seeds, the
same noise in every column. Bottom rows: finished images (DPM++ 2M, 20 steps, CFG 7), seeds 1-3. Prints how many of
the 27 finished images the adherence detector finds at the right position (chance: 3), and the position gap: the
v-prediction loss on 48 one-object training images whose captions state a position, with each caption's position
phrase replaced by a wrong one, relative to the loss with the true captions (same noise), at several timesteps.
0% means the model does not use position words at all.
"""

from __future__ import annotations

import argparse
import random

import torch
from PIL import Image

import sumie
from sumie.pipelines.params import GenerationParams
from sumie.prompts.tokenizer import CLIPTokenizer
from sumie.tiny.adherence import score
from sumie.tiny.synthetic import POSITION_PHRASES, POSITIONS, TrainSet, to_tensor
from sumie.training.losses import NoiseSchedule

PHRASES = {p: POSITION_PHRASES[p][0] for p in POSITIONS}  # "top left" -> "in the top left"
_ALL_PHRASES = [p for phrases in POSITION_PHRASES.values() for p in phrases]


def position_gap(models: object, encode: object, n: int = 48) -> dict[int, float]:
    """Relative v-loss increase when one-object training captions name a wrong position, per timestep."""
    rng = random.Random(0)
    items = [s for s in (TrainSet(64, 600, seed=7).sample(i) for i in range(600))
             if s.spec.kind == "one" and s.spec.objects[0].position is not None][:n]
    wrong = []
    for s in items:
        true = s.spec.objects[0].position
        phrase = next(p for p in sorted(_ALL_PHRASES, key=len, reverse=True) if p in s.caption)
        other = rng.choice([p for p in POSITIONS if p != true])
        wrong.append(s.caption.replace(phrase, PHRASES[other], 1))
    x = torch.stack([to_tensor(s.image) for s in items])
    z = models.vae.scale_latents(models.vae.encode(x).mean)
    right_ctx, wrong_ctx = encode([s.caption for s in items]), encode(wrong)
    schedule = NoiseSchedule.sd(zero_terminal_snr=True)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in (999, 950, 900, 800, 700):
        tt = torch.full((len(items),), t)
        noise = torch.randn(z.shape, generator=gen)
        xt, target = schedule.add_noise(z, noise, tt), schedule.target(z, noise, tt, "v")
        a = float((models.unet(xt, tt, right_ctx) - target).pow(2).mean())
        b = float((models.unet(xt, tt, wrong_ctx) - target).pow(2).mean())
        out[t] = (b - a) / a
    return out


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
    tokenizer = CLIPTokenizer()

    def encode(texts: list[str]) -> torch.Tensor:
        return te(tokenizer(texts, pad_id=tc.pad_id), layer=tc.layer, final_norm=tc.final_norm, need_pooled=False)[0]

    context = encode(prompts)
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
    gaps = position_gap(m, encode)
    print("position gap (wrong - right) / right: " + ", ".join(f"t={t} {g:+.1%}" for t, g in gaps.items()))


if __name__ == "__main__":
    main()
