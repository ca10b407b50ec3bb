"""``sumie batch prompts.jsonl -o DIR``: native-API request lines, one failing alone, resumable after a rerun and
after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from sumie.serve import ServeConfig
from sumie.serve.batch import run_batch

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0}


def _write(path: Path, bodies: list[object]) -> None:
    path.write_text("\n".join(b if isinstance(b, str) else json.dumps(b) for b in bodies) + "\n")


def test_batch_runs_lines_fails_alone_and_skips_done_lines(tmp_path: Path) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    bad = {"task": "txt2img", "prompt": "b", "seed": 2, **{**FAST, "sampler_name": "Nope"}}
    _write(prompts, [{"task": "txt2img", "prompt": "a", "seed": 1, "batch_size": 2, **FAST}, bad, "",
                     "{not json", {"prompt": "c", "seed": 3, **FAST}])
    config = ServeConfig(output_dir=out)
    first = run_batch(prompts, config, log=lambda _m: None)
    assert first.done == [1, 5] and first.skipped == []
    assert set(first.failed) == {2, 4} and first.failed[2].startswith("sampler_name: unknown sampler 'Nope'")
    assert first.failed[4].startswith("not JSON")
    assert [len(first.outputs[n]) for n in (1, 5)] == [2, 1]
    for path in first.outputs[1] + first.outputs[5]:
        with Image.open(path) as im:
            im.load()
            assert "Steps: 3" in im.info["parameters"]
    assert not list(out.rglob("*.tmp"))
    again = run_batch(prompts, config, log=lambda _m: None)
    assert again.done == [] and again.skipped == [1, 5] and set(again.failed) == {2, 4}
    assert again.outputs[1] == first.outputs[1]  # the same files, nothing regenerated
    _write(prompts, [{"task": "txt2img", "prompt": "a", "seed": 1, "batch_size": 2, **FAST},
                     {**bad, "sampler_name": "Euler"}, {"prompt": "c", "seed": 3, **FAST}])
    fixed = run_batch(prompts, config, log=lambda _m: None)
    assert fixed.done == [2] and fixed.skipped == [1, 3] and fixed.failed == {}  # line 3 = the former line 5
    assert len(list(out.rglob("*.png"))) == 2 + 1 + 1
    _write(prompts, [{"prompt": "c", "seed": 3, **FAST}] * 2)  # a repeated line is a second job
    twice = run_batch(prompts, config, log=lambda _m: None)
    assert twice.skipped == [1] and twice.done == [2] and twice.outputs[2] != twice.outputs[1]


def test_batch_command_resumes_after_kill(tmp_path: Path) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    _write(prompts, [{"prompt": f"p{i}", "seed": 10 + i, **{**FAST, "steps": 3 if i == 0 else 40}}
                     for i in range(3)])
    cmd = [sys.executable, "-m", "sumie", "batch", str(prompts), "-o", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and not line.startswith("line 1:"):
        line = proc.stderr.readline()
    assert line.startswith("line 1: ") and line.strip().endswith("-10.png"), line
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 done, 1 skipped (done before), 0 failed" in rerun.stderr
    assert "line 1:" not in rerun.stderr
    names = sorted(p.name for p in out.rglob("*.png"))
    assert [n.split("-")[1] for n in names] == ["10.png", "11.png", "12.png"]
    assert not list(out.rglob("*.tmp"))
