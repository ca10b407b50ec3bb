"""A fast cold start: the CLI imports torch only for commands that need it, model building skips weight init (and
so torch's decomposition machinery), and ``sumie bench --cold`` reports the split. No timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.io import load_state_dict
from sumie.checkpoints.loader import build_module, load_models
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.models.clip import CLIPTextModel

torch.set_num_threads(1)


def python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_and_argument_errors_do_not_import_torch() -> None:
    found = python("""
import contextlib, io, json, sys
from sumie.cli.main import main
out = {}
for argv in (["--help"], ["generate", "--help"], ["bench", "--help"], ["generate", "x", "--steps", "many"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            out[" ".join(argv)] = e.code
with contextlib.redirect_stderr(io.StringIO()) as err:
    out["eta"] = main(["generate", "x", "--eta", "-3"])
out["eta_error"] = err.getvalue()
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
""")
    assert found.pop("torch") is False
    assert found.pop("eta_error").startswith("sumie: error: --eta must be in [0, 100]")
    assert found == {"--help": 0, "generate --help": 0, "bench --help": 0, "generate x --steps many": 2, "eta": 2}


def test_loading_a_model_does_not_import_the_compiler() -> None:
    """Weight init on the meta device is skipped: torch's meta ``normal_`` would import torch._dynamo (~2 s)."""
    found = python("""
import json, sys
from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.loader import load_models
models = load_models(embedded_path())
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "family": models.config.family}))
""")
    assert found == {"dynamo": False, "family": "sd1"}


def test_skipped_init_still_loads_every_tensor() -> None:
    models = load_models(embedded_path())
    stored = load_state_dict(embedded_path())
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
    for name, module in (("unet", models.unet), ("vae", models.vae)):
        for key, t in module.state_dict().items():
            assert t.device.type == "cpu" and t.dtype == torch.float32, key
            assert torch.equal(t, stored[prefixes[name] + key].float()), key  # same values, upcast from the file
    for t in models.text_encoders[0].state_dict().values():
        assert t.device.type == "cpu" and bool(torch.isfinite(t).all())


def test_build_module_skips_init_only_on_meta() -> None:
    cfg = TINY["sd1"].text_encoders[0]
    real = CLIPTextModel(cfg)  # outside build_module: torch's own init runs
    weight = real.text_model.embeddings.token_embedding.weight
    assert weight.std() > 0.001
    sd = {k: torch.full_like(v, 0.5) for k, v in real.state_dict().items()}
    built = build_module(CLIPTextModel, cfg, sd, "test", "text encoder")
    assert all(bool((v == 0.5).all()) for v in built.state_dict().values())
    with pytest.raises(Exception, match="text encoder weights do not fit"):
        build_module(CLIPTextModel, cfg, {k: v for k, v in sd.items() if "token" not in k}, "test", "text encoder")


def test_bench_cold_reports_the_split(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--cold", "--runs", "1", "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "sumie-tiny" and report["runs"] == 1 and report["steps"] == 2
    parts = ("startup_s", "load_s", "generate_s", "save_s")
    assert all(report[k] >= 0 for k in (*parts, "exit_s", "wall_s")) and len(report["wall_s_each"]) == 1
    assert abs(sum(report[k] for k in parts) - report["wall_s"]) <= 0.005  # the parts add up (3-decimal rounding)


def test_bench_cold_reports_a_failing_child(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--cold", "--runs", "1", "--model", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sumie: error: bench --cold: `sumie generate` failed (exit 2): ")
    assert "no such file" in err[0]
