"""Model folders (A1111 and ComfyUI layouts), the hash cache, the model manager's LRU cache and the CLI's
--models-dir, on tiny random checkpoints and small fake files."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from sumie.checkpoints import hashes as hashes_mod
from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.io import legacy_model_hash
from sumie.checkpoints.loader import load_models
from sumie.checkpoints.manager import LoadRequest, ModelFolders, ModelManager, held_bytes
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import main
from sumie.configs import TINY
from sumie.errors import CheckpointError, ConfigError
from sumie.pipelines.engine import Engine
from sumie.pipelines.infotext import parse_infotext
from sumie.pipelines.output import read_png_info

torch.set_num_threads(1)

FAST = ["--width", "64", "--height", "64", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "-q", "--seed", "5"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny random SD1 checkpoints (same shapes, different weights)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        out[name] = root / f"{name}.safetensors"
        save_file(random_single_file(TINY["sd1"], seed=seed), str(out[name]))
    return out


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every (file name, algorithm) the hash cache had to compute, by wrapping the module's compute_hash."""
    calls: list[tuple[str, str]] = []
    real = hashes_mod.compute_hash

    def counting(path: object, algo: str = "sha256") -> str:
        calls.append((Path(str(path)).name, algo))
        return real(path, algo)  # type: ignore[arg-type]

    monkeypatch.setattr(hashes_mod, "compute_hash", counting)
    return calls


# ------------------------------------------------------------------------------------------------ folders


def a1111_tree(root: Path) -> None:
    models = root / "models"
    touch(models / "Stable-diffusion" / "sd15.safetensors")
    touch(models / "Stable-diffusion" / "sdxl" / "juggernaut.safetensors")
    touch(models / "Stable-diffusion" / "sd15.vae.safetensors")  # A1111: a VAE next to its checkpoint, not listed
    touch(models / "Stable-diffusion" / ".hidden.safetensors")
    touch(models / "Stable-diffusion" / "notes.txt")
    touch(models / "Stable-diffusion" / "pipe" / "model_index.json", b"{}")  # a diffusers folder
    touch(models / "Stable-diffusion" / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    touch(models / "Lora" / "detail.safetensors")
    touch(models / "LyCORIS" / "style.pt")
    touch(models / "VAE" / "kl.pt")
    touch(root / "embeddings" / "EasyNegative.safetensors")
    touch(models / "ControlNet" / "canny.pth")
    touch(models / "ESRGAN" / "4x.pth")


def comfy_tree(root: Path) -> None:
    models = root / "models"
    touch(models / "checkpoints" / "sd15.safetensors")
    touch(models / "checkpoints" / "sdxl" / "juggernaut.ckpt")
    touch(models / "loras" / "detail.safetensors")
    touch(models / "vae" / "kl.safetensors")
    touch(models / "embeddings" / "EasyNegative.pt")
    touch(models / "controlnet" / "canny.safetensors")
    touch(models / "upscale_models" / "4x.pth")


@pytest.mark.parametrize("given", ["root", "models"])
def test_a1111_layout(tmp_path: Path, given: str) -> None:
    a1111_tree(tmp_path)
    f = ModelFolders(tmp_path if given == "root" else tmp_path / "models")
    assert f.layout == "a1111" and f.models_dir == tmp_path / "models"
    assert [m.name for m in f.list("checkpoint")] == ["pipe", "sd15.safetensors", "sdxl/juggernaut.safetensors"]
    assert [m.name for m in f.list("lora")] == ["detail.safetensors", "style.pt"]  # Lora + LyCORIS
    assert f.dirs("embedding") == [tmp_path / "embeddings"]  # at the web UI root, found from models/ too
    assert [m.name for m in f.list("upscaler")] == ["4x.pth"]
    sd = tmp_path / "models" / "Stable-diffusion"
    for name in ("sdxl/juggernaut.safetensors", "sdxl/juggernaut", "juggernaut", "sdxl_juggernaut",
                 "sdxl/juggernaut.safetensors [0123456789]", "JUGGERNAUT"):
        assert f.resolve("checkpoint", name).path == sd / "sdxl" / "juggernaut.safetensors", name
    assert f.resolve("checkpoint", "pipe").path == sd / "pipe"
    assert f.resolve("controlnet", "canny").path == tmp_path / "models" / "ControlNet" / "canny.pth"


@pytest.mark.parametrize("given", ["root", "models"])
def test_comfyui_layout(tmp_path: Path, given: str) -> None:
    comfy_tree(tmp_path)
    f = ModelFolders(tmp_path if given == "root" else tmp_path / "models")
    models = tmp_path / "models"
    assert f.layout == "comfyui"
    assert [m.name for m in f.list("checkpoint")] == ["sd15.safetensors", "sdxl/juggernaut.ckpt"]
    assert f.resolve("checkpoint", "juggernaut").path == models / "checkpoints" / "sdxl" / "juggernaut.ckpt"
    assert f.resolve("lora", "detail.safetensors").path == models / "loras" / "detail.safetensors"
    assert f.resolve("vae", "kl").path == models / "vae" / "kl.safetensors"
    assert f.dirs("embedding") == [models / "embeddings"]
    assert f.resolve("upscaler", "4x").path == models / "upscale_models" / "4x.pth"


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        ModelFolders(tmp_path / "nope")
    touch(tmp_path / "models" / "misc" / "x.safetensors")
    with pytest.raises(ConfigError, match="neither an AUTOMATIC1111 nor a ComfyUI") as e:
        ModelFolders(tmp_path)
    assert "Stable-diffusion" in str(e.value) and "checkpoints" in str(e.value)
    a1111_tree(tmp_path)
    f = ModelFolders(tmp_path)
    with pytest.raises(ConfigError, match=r"close matches: sd15\.safetensors"):
        f.resolve("checkpoint", "sd16")
    with pytest.raises(ConfigError, match="it holds: pipe, sd15.safetensors, sdxl/juggernaut.safetensors$"):
        f.resolve("checkpoint", "zzzzqqqq")
    shutil.rmtree(tmp_path / "models" / "ESRGAN")
    with pytest.raises(ConfigError, match="no upscaler folder"):
        f.resolve("upscaler", "4x")
    touch(tmp_path / "models" / "Stable-diffusion" / "old" / "sd15.ckpt")
    assert f.resolve("checkpoint", "sd15").path.parent.name == "Stable-diffusion"  # the relative path wins
    assert f.resolve("checkpoint", "old/sd15").path.suffix == ".ckpt"
    touch(tmp_path / "models" / "Stable-diffusion" / "old" / "juggernaut.ckpt")
    with pytest.raises(ConfigError, match=r"'juggernaut' is ambiguous: old/juggernaut.ckpt, sdxl/juggernaut"):
        f.resolve("checkpoint", "juggernaut")
    with pytest.raises(ConfigError, match="unknown model kind"):
        f.list("hypernetwork")


# ------------------------------------------------------------------------------------------------ hashes


def test_hash_cache_hits_persists_and_follows_changes(tmp_path: Path, count_hashing: list) -> None:
    f = touch(tmp_path / "m.safetensors", b"a" * 5000)
    cache = tmp_path / "cache" / "hashes.json"
    h = FileHashes(cache)
    assert h.sha256(f) == sha(f) and h.model_hash(f) == sha(f)[:10]
    assert count_hashing == [("m.safetensors", "sha256")]  # computed once
    assert FileHashes(cache).model_hash(f) == sha(f)[:10]  # a new process reads it back
    assert len(count_hashing) == 1
    before = f.stat().st_mtime_ns
    f.write_bytes(b"b" * 5000)  # same size, new content
    os.utime(f, ns=(before + 10**9, before + 10**9))
    assert h.sha256(f) == sha(f) and len(count_hashing) == 2
    os.utime(f, ns=(before + 2 * 10**9, before + 2 * 10**9))  # touched only: hashed again
    h.sha256(f)
    assert len(count_hashing) == 3
    assert sorted(p.name for p in cache.parent.iterdir()) == ["hashes.json"]  # no temporary file left
    data = json.loads(cache.read_text())
    assert data["files"][str(f.resolve())]["sha256"] == sha(f)


def test_hash_cache_survives_corruption_and_write_failures(tmp_path: Path, count_hashing: list,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    f = touch(tmp_path / "m.ckpt", b"c" * 100)
    cache = tmp_path / "hashes.json"
    cache.write_text('{"version": 1, "files": {')  # a crash mid-write by some other tool
    with pytest.warns(UserWarning, match="unreadable"):
        assert FileHashes(cache).sha256(f) == sha(f)
    assert len(count_hashing) == 1 and json.loads(cache.read_text())["files"]  # rewritten, valid
    good = cache.read_text()
    g = touch(tmp_path / "n.ckpt", b"d" * 100)

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hashes_mod.os, "replace", failing_replace)
    with pytest.warns(UserWarning, match="cannot write the hash cache"):
        assert FileHashes(cache).sha256(g) == sha(g)
    assert cache.read_text() == good  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hashes.json", "m.ckpt", "n.ckpt"]


def test_lora_hashes_follow_a1111(tmp_path: Path) -> None:
    t = {"lora_unet_x.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(t, str(a), metadata={"ss_output_name": "a"})
    save_file(t, str(b), metadata={"ss_output_name": "a much longer name that changes the header size"})
    h = FileHashes()
    raw = a.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert h.lora_hash(a) == hashlib.sha256(data).hexdigest()  # kohya addnet hash: the data after the header
    assert h.lora_hash(a) == h.lora_hash(b) and sha(a) != sha(b)  # metadata edits keep it
    assert h.lora_shorthash(a) == h.lora_hash(a)[:12]
    declared = "ab" * 32
    c = tmp_path / "c.safetensors"
    save_file(t, str(c), metadata={"sshs_model_hash": declared})
    assert h.lora_shorthash(c) == declared[:12]  # kohya's own record, as A1111 takes it
    pt = touch(tmp_path / "d.pt", b"pickled")
    assert h.lora_shorthash(pt) == sha(pt)[:12]


def test_find_by_hash_hashes_only_when_asked(tmp_path: Path, ckpts: dict[str, Path], count_hashing: list) -> None:
    for name in ("alpha", "beta"):
        shutil.copy(ckpts[name], touch(tmp_path / "models" / "checkpoints" / f"{name}.safetensors"))
    lora = tmp_path / "models" / "loras" / "detail.safetensors"
    lora.parent.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(lora))
    touch(lora.parent / "broken.safetensors", b"\x01\x02")  # unreadable: passed over
    m = ModelManager(ModelFolders(tmp_path), hashes=FileHashes(tmp_path / "hashes.json"))
    assert m.folders is not None and len(m.folders.list("checkpoint")) == 2 and count_hashing == []
    beta = tmp_path / "models" / "checkpoints" / "beta.safetensors"
    assert m.find_by_hash("checkpoint", sha(beta)[:10].upper()) == beta
    assert m.find_by_hash("checkpoint", "0123456789") is None
    n = len(count_hashing)
    assert n == 2  # both files hashed once, then cached
    assert m.find_by_hash("checkpoint", sha(beta)[:10]) == beta and len(count_hashing) == n
    assert m.find_by_hash("checkpoint", legacy_model_hash(beta)) == beta  # pre-1.0 8-hex hash
    assert m.find_by_hash("lora", FileHashes().lora_shorthash(lora)) == lora
    assert m.resolve("checkpoint", f"renamed.safetensors [{sha(beta)[:10]}]") == beta  # A1111 title, by hash


# ------------------------------------------------------------------------------------------------ the manager


def checkpoint_manager(tmp_path: Path, ckpts: dict[str, Path], **kw: object) -> ModelManager:
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for path in ckpts.values():
        os.symlink(path, folder / path.name)
    return ModelManager(ModelFolders(tmp_path), **kw)  # type: ignore[arg-type]


def test_lru_eviction_within_the_memory_budget(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    size = held_bytes(load_models(ckpts["alpha"], file_hash="-"))
    m = checkpoint_manager(tmp_path, ckpts, memory_budget_bytes=int(2.5 * size))
    a = m.get("checkpoint", "alpha")
    assert held_bytes(a) == size and [(e.name, e.size_bytes) for e in m.loaded()] == [("alpha.safetensors", size)]
    m.get("checkpoint", "beta")
    assert m.get("checkpoint", "alpha") is a  # a hit, and alpha is now the most recent
    m.get("checkpoint", "gamma")
    assert [e.name for e in m.loaded()] == ["alpha.safetensors", "gamma.safetensors"]  # beta was least recent
    assert m.loads == 3 and m.total_bytes() == 2 * size <= m.memory_budget_bytes  # type: ignore[operator]
    m.get("checkpoint", "alpha")
    m.get("checkpoint", "beta")
    assert [e.name for e in m.loaded()] == ["alpha.safetensors", "beta.safetensors"] and m.loads == 4
    assert m.warnings == []


def test_a_model_over_the_budget_loads_alone(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    m = checkpoint_manager(tmp_path, ckpts, memory_budget_bytes=1000)
    m.get("checkpoint", "alpha")
    m.get("checkpoint", "beta")
    assert [e.name for e in m.loaded()] == ["beta.safetensors"]
    assert len(m.warnings) == 2 and "more than the memory budget" in m.warnings[1] and "beta" in m.warnings[1]
    counted = checkpoint_manager(tmp_path / "n", ckpts, max_models=2)
    for name in ("alpha", "beta", "gamma"):
        counted.get("checkpoint", name)
    assert [e.name for e in counted.loaded()] == ["beta.safetensors", "gamma.safetensors"]


def test_unload_and_eviction_free_the_modules(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    m = checkpoint_manager(tmp_path, ckpts, max_models=1)
    ref = weakref.ref(m.get("checkpoint", "alpha").unet)
    assert ref() is not None and m.unload("nothing-like-it") == 0
    assert m.unload("alpha") == 1 and m.loaded() == []
    gc.collect()
    assert ref() is None
    ref = weakref.ref(m.get("checkpoint", "beta").unet)
    m.get("checkpoint", "gamma")  # evicts beta
    gc.collect()
    assert ref() is None
    ref = weakref.ref(m.get("checkpoint", str(ckpts["alpha"])).unet)  # a path works as a name
    assert m.unload_all() == 1
    gc.collect()
    assert ref() is None


def test_concurrent_gets_load_once_and_loads_are_serialized(tmp_path: Path) -> None:
    touch(tmp_path / "models" / "checkpoints" / "x.safetensors")
    for name in "abcd":
        touch(tmp_path / "models" / "loras" / f"{name}.safetensors")
    m = ModelManager(ModelFolders(tmp_path))
    active, peak, calls = [0], [0], []
    lock = threading.Lock()

    def slow_loader(req: LoadRequest) -> nn.Module:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(req.path.name)
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return nn.Linear(4, 4)

    m.register_loader("checkpoint", slow_loader)
    m.register_loader("lora", slow_loader)
    barrier = threading.Barrier(4)
    got: list[object] = []

    def ask(name: str, kind: str) -> None:
        barrier.wait()
        got.append(m.get(kind, name))

    threads = [threading.Thread(target=ask, args=("x", "checkpoint")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x.safetensors"] and len(got) == 4 and all(g is got[0] for g in got)
    threads = [threading.Thread(target=ask, args=(name, "lora")) for name in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls[1:]) == [f"{n}.safetensors" for n in "abcd"] and peak[0] == 1
    assert m.loads == 5 and len({id(g) for g in got}) == 5


def test_kinds_paths_options_and_derived(tmp_path: Path, ckpts: dict[str, Path], count_hashing: list) -> None:
    m = ModelManager(hashes=FileHashes(tmp_path / "h.json"))  # no folders: paths only
    with pytest.raises(CheckpointError, match="no such file"):
        m.resolve("checkpoint", tmp_path / "missing.safetensors")
    assert m.get("lora", ckpts["alpha"]) == ckpts["alpha"]  # no LoRA loader yet: the path
    assert m.resolve("checkpoint", None).name == "sumie-tiny.safetensors"
    a = m.get("checkpoint", ckpts["alpha"])
    assert a.hash == sha(ckpts["alpha"])[:10] and count_hashing == [("alpha.safetensors", "sha256")]
    v = m.get("checkpoint", ckpts["alpha"], prediction="v")
    assert v is not a and v.config.prediction == "v" and len(m.loaded()) == 2
    assert count_hashing == [("alpha.safetensors", "sha256")]  # the second load took the cached hash
    built: list[object] = []
    d1 = m.derived("checkpoint", ckpts["alpha"], "k", lambda models: built.append(models) or object())
    assert m.derived("checkpoint", ckpts["alpha"], "k", lambda models: object()) is d1 and built == [a]
    m.unload("alpha")
    d2 = m.derived("checkpoint", ckpts["alpha"], "k", lambda models: built.append(models) or object())
    assert d2 is not d1 and len(built) == 2 and built[1] is not a  # dropped with its entry, rebuilt on reload
    with pytest.raises(ConfigError, match="unknown model kind"):
        m.get("hypernetwork", "x")


def test_engine_refiners_are_ordinary_entries(ckpts: dict[str, Path]) -> None:
    base = load_models(ckpts["alpha"], file_hash="-")
    engine = Engine(base)  # no shared manager: the engine keeps its last refiner only
    first = engine.refiner(ckpts["beta"])
    assert engine.refiner(ckpts["beta"]) is first
    ref = weakref.ref(first.models.unet)
    del first
    engine.refiner(ckpts["gamma"])
    gc.collect()
    assert ref() is None
    shared = ModelManager(max_models=1)
    engine = Engine(base, manager=shared)
    ref = weakref.ref(engine.refiner(ckpts["beta"]).models.unet)
    assert [e.path for e in shared.loaded()] == [ckpts["beta"]]
    shared.get("checkpoint", ckpts["gamma"])  # another user of the manager evicts the refiner
    gc.collect()
    assert ref() is None
    assert engine.refiner(ckpts["beta"]).models.unet is not None and shared.loads == 3


def test_load_models_takes_a_hash_or_a_provider(ckpts: dict[str, Path]) -> None:
    assert load_models(ckpts["beta"], file_hash="0123456789").hash == "0123456789"
    seen: list[Path] = []
    models = load_models(ckpts["beta"], file_hash=lambda p: seen.append(p) or "abcdefabcd")
    assert models.hash == "abcdefabcd" and seen == [ckpts["beta"]]


# ------------------------------------------------------------------------------------------------ the CLI


def sumie_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "sumie", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory, ckpts: dict[str, Path]) -> dict[str, Path]:
    """An A1111 install with alpha in a subfolder, a ComfyUI install with beta and gamma."""
    root = tmp_path_factory.mktemp("layouts")
    a1111, comfy = root / "webui", root / "ComfyUI"
    shutil.copy(ckpts["alpha"], touch(a1111 / "models" / "Stable-diffusion" / "sd1" / "alpha.safetensors"))
    (a1111 / "embeddings").mkdir()
    for name in ("beta", "gamma"):
        shutil.copy(ckpts[name], touch(comfy / "models" / "checkpoints" / f"{name}.safetensors"))
    return {"a1111": a1111, "comfy": comfy}


def test_models_dir_end_to_end(layouts: dict[str, Path], ckpts: dict[str, Path], tmp_path: Path) -> None:
    r = sumie_cli("generate", "a cat", "--models-dir", layouts["a1111"], "--model", "alpha", *FAST, "-o", "a.png",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fields = parse_infotext(read_png_info(tmp_path / "a.png"))
    assert (fields["Model"], fields["Model hash"]) == ("alpha", sha(ckpts["alpha"])[:10])
    r = sumie_cli("generate", "a cat", "--models-dir", layouts["comfy"] / "models", "--model", "gamma.safetensors",
                  *FAST, "-o", "c.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert parse_infotext(read_png_info(tmp_path / "c.png"))["Model hash"] == sha(ckpts["gamma"])[:10]
    r = sumie_cli("generate", "a cat", "--models-dir", layouts["comfy"], "--model", "gama", *FAST, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"sumie: error: no checkpoint named 'gama' in {layouts['comfy'] / 'models' / 'checkpoints'}; close matches: "
        "gamma.safetensors"]
    r = sumie_cli("generate", "a cat", "--models-dir", tmp_path, *FAST, cwd=tmp_path)
    assert r.returncode == 2 and "neither an AUTOMATIC1111 nor a ComfyUI layout" in r.stderr


def test_from_png_finds_the_model_by_hash(layouts: dict[str, Path], ckpts: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = tmp_path / "first.png"
    assert main(["generate", "a dog", "--model", str(ckpts["gamma"]), *FAST, "-o", str(first)]) == 0
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--models-dir", str(layouts["comfy"]), "-q", "--dtype", "fp32",
                 "--device", "cpu", "-o", str(again)]) == 0
    assert capsys.readouterr().err == ""  # gamma found by its hash: no warning
    assert np.array_equal(pixels(first), pixels(again))
    cached = json.loads((tmp_path / "cache" / "sumie" / "hashes.json").read_text())["files"]
    assert any(e.get("sha256") == sha(ckpts["gamma"]) for e in cached.values())
    other = tmp_path / "other.png"
    assert main(["generate", "--from-png", str(first), "--models-dir", str(layouts["a1111"]), "-q", "--dtype", "fp32",
                 "--device", "cpu", "-o", str(other)]) == 0  # alpha only: no match, the default model
    err = capsys.readouterr().err
    assert "was made with model 'gamma'" in err and "will differ" in err
    assert parse_infotext(read_png_info(other))["Model"] == "sumie-tiny"


def test_from_png_refiner_is_looked_up_by_name(layouts: dict[str, Path], ckpts: dict[str, Path],
                                               tmp_path: Path) -> None:
    from sumie.cli.main import _build_params, _resolve_models, build_parser
    from sumie.pipelines.output import save_png

    png = tmp_path / "refined.png"
    beta_hash = sha(ckpts["beta"])[:10]
    save_png(Image.new("RGB", (8, 8)), png, "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, "
             f"Model hash: {beta_hash}, Model: beta, Refiner: gamma [0123456789], Refiner switch at: 0.5, RNG: CPU")
    args = build_parser().parse_args(["generate", "--from-png", str(png), "--models-dir", str(layouts["comfy"])])
    p, fields = _build_params(args, "txt2img")
    model, vae, embeddings, _ = _resolve_models(args, p, fields)
    checkpoints = layouts["comfy"] / "models" / "checkpoints"
    assert (model, vae, embeddings) == (checkpoints / "beta.safetensors", None, None)  # by hash; no embeddings dir
    assert p.refiner is not None and p.refiner.model == str(checkpoints / "gamma.safetensors")
    args = build_parser().parse_args(["generate", "--from-png", str(png), "--models-dir", str(layouts["a1111"])])
    p, fields = _build_params(args, "txt2img")
    with pytest.raises(ConfigError, match="the image was refined with 'gamma': no checkpoint named 'gamma'"):
        _resolve_models(args, p, fields)
    args = build_parser().parse_args(["generate", "--from-png", str(png)])
    with pytest.raises(ConfigError, match="pass --refiner PATH"):  # without --models-dir, as before
        _build_params(args, "txt2img")
