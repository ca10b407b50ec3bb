"""Loss-curve plots from loss logs (PIL only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sumie.errors import ConfigError
from sumie.training.plot import chain, main, read_log, smooth


def _log(path: Path, values: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": 10 * (i + 1), "loss": v, "rec": v / 2}) + "\n"
                            for i, v in enumerate(values)))
    return path


def test_smooth_is_a_trailing_mean() -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0], 10) == [2.0]


def test_plot_draws_each_series(tmp_path: Path) -> None:
    a = _log(tmp_path / "vae" / "loss.jsonl", [1.0 / (1 + i) for i in range(50)])
    b = _log(tmp_path / "unet" / "loss.jsonl", [0.5] * 50)
    out = tmp_path / "plot" / "loss.png"
    assert main([str(a), str(b), "-o", str(out), "--window", "3"]) == 0
    arr = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert arr.shape == (400, 720, 3)
    blue = (abs(arr - [31, 119, 180]).sum(-1) < 30).sum()
    red = (abs(arr - [214, 39, 40]).sum(-1) < 30).sum()
    assert blue > 300 and red > 300  # two curves (and their labels) drawn
    assert read_log(a, "rec")[0] == (10, 0.5)


def test_chain_puts_stages_end_to_end(tmp_path: Path) -> None:
    stages = chain({"s2": [(10, 1.0), (20, 0.5)], "s3": [(10, 0.4), (30, 0.3)]})
    assert stages == {"s2": [(10, 1.0), (20, 0.5)], "s3": [(30, 0.4), (50, 0.3)]}
    a = _log(tmp_path / "s2" / "loss.jsonl", [1.0] * 20)
    b = _log(tmp_path / "s3" / "loss.jsonl", [0.1] * 20)
    out = tmp_path / "chained.png"
    assert main([str(a), str(b), "--chain", "-o", str(out)]) == 0
    arr = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red_cols = np.nonzero((abs(arr - [214, 39, 40]).sum(-1) < 30).any(0))[0]
    blue_cols = np.nonzero((abs(arr - [31, 119, 180]).sum(-1) < 30).any(0))[0]
    # the second stage starts halfway along the step axis, to the right of the first (labels sit further right)
    assert red_cols.min() > blue_cols.min() + 200


def test_bad_logs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.png")]) == 2
    assert "sumie: error:" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    with pytest.raises(ConfigError, match="no such loss log"):
        read_log(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: not a loss-log line"):
        read_log(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_log(tmp_path / "empty.jsonl")
