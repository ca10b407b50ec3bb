"""A loss-curve plot of a run's ``loss.jsonl`` drawn with PIL (no plotting library needed).

    python -m sumie.training.plot RUN/loss.jsonl [MORE/loss.jsonl ...] -o loss.png
    python -m sumie.training.plot STAGE2/loss.jsonl STAGE3/loss.jsonl --chain -o loss.png   # one model's stages
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from sumie.errors import ConfigError

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
            (227, 119, 194), (127, 127, 127))


def read_log(path: str | Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) pairs of one loss log; a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such loss log (a run folder's loss.jsonl)")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            out.append((int(rec["step"]), float(rec[key])))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{p}:{n}: not a loss-log line with 'step' and {key!r} ({e})") from None
    if not out:
        raise ConfigError(f"{p}: the loss log is empty")
    return out


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def chain(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Stages of one model end to end: each series' steps shifted to start after the previous one's last step."""
    out, offset = {}, 0
    for name, pts in series.items():
        out[name] = [(s + offset, v) for s, v in pts]
        offset = out[name][-1][0]
    return out


def plot_losses(series: dict[str, list[tuple[int, float]]], path: str | Path, *, title: str = "training loss",
                size: tuple[int, int] = (720, 400), window: int = 20) -> Path:
    """Draw each named series (log-scale y, moving average over ``window`` log lines) into a PNG."""
    w, h = size
    left, right, top, bottom = 70, 20, 36, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    smoothed = {name: (([s for s, _ in pts]), smooth([v for _, v in pts], window)) for name, pts in series.items()}
    steps = [s for xs, _ in smoothed.values() for s in xs]
    vals = [v for _, ys in smoothed.values() for v in ys if v > 0]
    if not vals:
        raise ConfigError("nothing to plot: no positive loss values")
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    y1 = max(y1, y0 + 1)

    def px(step: float, value: float) -> tuple[float, float]:
        fx = (step - x0) / (x1 - x0)
        fy = (math.log10(max(value, 10.0 ** y0)) - y0) / (y1 - y0)
        return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for e in range(y0, y1 + 1):
        for m in (1, 2, 5):
            y = px(x0, m * 10.0 ** e)[1]
            if top <= y <= h - bottom:
                d.line([left, y, w - right, y], fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                d.text((6, y - 6), f"{m * 10.0 ** e:g}", fill=(0, 0, 0))
    for k in range(5):
        step = x0 + (x1 - x0) * k / 4
        x = px(step, 10.0 ** y0)[0]
        d.line([x, h - bottom, x, h - bottom + 4], fill=(0, 0, 0))
        d.text((x - 14, h - bottom + 8), f"{round(step)}", fill=(0, 0, 0))
    d.text((left, 10), title, fill=(0, 0, 0))
    d.text((w - right - 40, h - 18), "step", fill=(0, 0, 0))
    for k, (name, (xs, ys)) in enumerate(smoothed.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        d.line([px(x, y) for x, y in zip(xs, ys, strict=True)], fill=colour, width=2)
        d.text((w - right - 220, top + 8 + 14 * k), name, fill=colour)
    from sumie.pipelines.output import save_png

    return save_png(img, path, None, overwrite=True)  # atomic; a re-plot replaces the old picture


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: plot one or more loss logs into one PNG."""
    ap = argparse.ArgumentParser(prog="python -m sumie.training.plot", description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="loss.jsonl files (label = the run folder's name)")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--key", default="loss", help="which logged value to plot (default: loss)")
    ap.add_argument("--window", type=int, default=20, help="moving-average window in log lines")
    ap.add_argument("--title", default="training loss")
    ap.add_argument("--chain", action="store_true",
                    help="the logs are consecutive stages of one model: draw each after the previous one")
    a = ap.parse_args(argv)
    try:
        series = {Path(p).parent.name: read_log(p, a.key) for p in a.logs}
        if a.chain:
            series = chain(series)
        plot_losses(series, a.output, title=a.title, window=max(1, a.window))
    except ConfigError as e:
        print(f"sumie: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
