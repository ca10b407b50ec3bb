"""Using LoRA: names in folders, tags and GenerationParams.loras, patching (not reloading), infotext, the CLI.

Files are kohya LoRAs written by ``lora_testfiles`` at the embedded tiny model's real shapes (fp16 factors, alpha 2,
rank 4), in temporary A1111/ComfyUI-style folders. Weights are compared bit for bit where the same computation runs
(patch/unpatch, a tag vs the same LoRA given as a LoraSpec, the merged file vs the runtime patch) and within fp32
rounding where Sumie's patch is compared with a delta computed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_testfiles import addnet_shorthash, bogus_module, expected_delta, kohya_tensors, write_kohya
from PIL import Image
from safetensors.torch import save_file

import sumie
from sumie.adapters.lora.handler import LoraHandler, parse_lora_arg, spec_from_tag
from sumie.adapters.lora.library import LoraLibrary
from sumie.adapters.lora.names import kohya_name
from sumie.checkpoints.io import file_metadata
from sumie.checkpoints.loader import StableDiffusionModels
from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.errors import ConfigError
from sumie.pipelines.engine import Engine
from sumie.pipelines.infotext import parse_infotext
from sumie.pipelines.params import GenerationParams, LoraSpec
from sumie.prompts.parser import extract_extra_networks

KEY = "input_blocks.4.1.proj_in"  # a UNet module (a 1x1 conv) every test LoRA targets (the first target)
TE_KEY = "text_model.encoder.layers.0.self_attn.q_proj"


def weights_digest(engine: Engine | StableDiffusionModels) -> str:
    """SHA-256 over every tensor of every network (names, dtypes and bytes)."""
    h = hashlib.sha256()
    models = engine.models if isinstance(engine, Engine) else engine
    for comp, module in models.modules().items():
        for k, v in module.state_dict().items():
            h.update(f"{comp}.{k}:{v.dtype}".encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def P(**kw: object) -> GenerationParams:
    return GenerationParams(**{"prompt": "a red circle", "steps": 3, "seed": 7, "width": 64, "height": 64, **kw})


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111 install: models/Stable-diffusion and models/Lora with kohya files (one in a subfolder)."""
    root = tmp_path_factory.mktemp("webui")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    models = sumie.load().models
    lora = root / "models" / "Lora"
    write_kohya(lora / "detail.safetensors", models, seed=1, metadata={"ss_output_name": "detail_v2"})
    write_kohya(lora / "style" / "ink.safetensors", models, seed=2, every=2)
    write_kohya(lora / "unet_only.safetensors", models, seed=3, text=False)
    write_kohya(lora / "partial.safetensors", models, seed=4, every=3, extra=bogus_module())
    write_kohya(lora / "nothing.safetensors", models, seed=5, text=False, unet=False, extra=bogus_module())
    return root


@pytest.fixture(scope="module")
def engine(lora_dir: Path) -> Engine:
    e = sumie.load(lora_dirs=[lora_dir / "models" / "Lora"])
    e.show_progress = False
    return e


def handler(engine: Engine) -> LoraHandler:
    h = engine.extra_networks["lora"]
    assert isinstance(h, LoraHandler) and engine.extra_networks["lyco"] is h
    return h


# ------------------------------------------------------------------------------------------------ names


def test_names_stems_aliases_and_close_matches(lora_dir: Path) -> None:
    lib = LoraLibrary([lora_dir / "models" / "Lora"])
    folder = lora_dir / "models" / "Lora"
    assert lib.resolve("detail").entry.path == folder / "detail.safetensors"
    assert lib.resolve("detail_v2").entry.path == folder / "detail.safetensors"  # ss_output_name
    assert lib.resolve("ink").entry.path == folder / "style" / "ink.safetensors"  # recursive
    assert lib.resolve(folder / "unet_only.safetensors").entry.name == "unet_only"  # a path
    with pytest.raises(ConfigError, match=r"no LoRA named 'detial'.*close matches: detail"):
        lib.resolve("detial")
    with pytest.raises(ConfigError) as e:  # A1111's names are case-sensitive; the suggestion shows the case
        lib.resolve("Detail")
    assert "close matches: detail" in str(e.value)
    with pytest.raises(ConfigError, match="no LoRA folder is set"):
        LoraLibrary().resolve("detail")


def test_shared_names_pick_the_last_file_as_a1111_and_say_so(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, alias in ((a, "same"), (b, "same")):
        folder.mkdir()
        save_file({"x.alpha": torch.tensor(1.0)}, str(folder / "dup.safetensors"), metadata={"ss_output_name": alias})
    save_file({"x.alpha": torch.tensor(1.0)}, str(a / "other.safetensors"), metadata={"ss_output_name": "dup"})
    (a / "notes.txt").write_text("not a LoRA")
    lib = LoraLibrary([a, b])
    found = lib.resolve("dup")
    assert found.entry.path == b / "dup.safetensors"  # the later folder wins
    assert found.note is not None and "a/dup.safetensors" in found.note.replace(os.sep, "/")
    # "same" is the alias of two files: A1111 forbids it as an alias, so it finds nothing (no file has that stem)
    with pytest.raises(ConfigError, match="no LoRA named 'same'"):
        lib.resolve("same")
    assert [e.name for e in lib.entries()] == ["dup", "other", "dup"]


def test_alias_follows_the_file_on_disk(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    save_file({"x.alpha": torch.tensor(1.0)}, str(f), metadata={"ss_output_name": "first"})
    lib = LoraLibrary([tmp_path])
    assert lib.resolve("first").entry.path == f
    save_file({"x.alpha": torch.tensor(1.0)}, str(f), metadata={"ss_output_name": "second"})
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    lib.entries(refresh=True)
    assert lib.resolve("second").entry.path == f


# ------------------------------------------------------------------------------------------------ tags


@pytest.mark.parametrize(("tag", "te", "unet"), [
    ("<lora:x>", 1.0, 1.0), ("<lora:x:0.5>", 0.5, 0.5), ("<lora:x:0.5:0.25>", 0.5, 0.25), ("<lora:x:-1>", -1.0, -1.0),
    ("<lora:x:te=0.3>", 0.3, 0.3), ("<lora:x:unet=0.2>", 1.0, 0.2), ("<lora:x:0.5:unet=0>", 0.5, 0.0),
    ("<lora:x:te=0.1:0.7:0.9>", 0.1, 0.9), ("<lyco:x:0.4>", 0.4, 0.4),
])
def test_tag_weights_as_a1111(tag: str, te: float, unet: float) -> None:
    (found,) = extract_extra_networks(tag)[1]
    spec, notes = spec_from_tag(found)
    assert (spec.name, spec.te, spec.unet_weight, notes) == ("x", te, unet, [])


def test_bad_tags_and_cli_specs() -> None:
    with pytest.raises(ConfigError, match="not a number"):
        spec_from_tag(extract_extra_networks("<lora:x:heavy>")[1][0])
    _, notes = spec_from_tag(extract_extra_networks("<lora:x:1:1:8>")[1][0])
    assert "dyn" in notes[0]
    assert parse_lora_arg("x") == LoraSpec("x")
    assert parse_lora_arg("x:0.5") == LoraSpec("x", 0.5)
    assert parse_lora_arg("x:0.5:-1") == LoraSpec("x", 0.5, -1.0)
    assert parse_lora_arg("C:/loras/x.safetensors:0.8") == LoraSpec("C:/loras/x.safetensors", 0.8)
    with pytest.raises(ConfigError):
        parse_lora_arg(":0.5")


# ------------------------------------------------------------------------------------------------ patching


def test_patch_math_and_bit_exact_restore(engine: Engine, lora_dir: Path) -> None:
    h = handler(engine)
    h.unpatch()
    before = weights_digest(engine)
    unet_w = engine.models.unet.get_submodule(KEY).weight.detach().clone()
    te_w = engine.models.text_encoders[0].get_submodule(TE_KEY).weight.detach().clone()
    tensors = kohya_tensors(engine.models, seed=1)
    a, b = kohya_tensors(engine.models, seed=2, every=2), tensors
    h.apply(engine, [LoraSpec("detail", 0.5, 0.25), LoraSpec("ink", -1.0)])
    assert h.is_patched and weights_digest(engine) != before
    name, te_name = kohya_name(engine.models.config, "unet", KEY), kohya_name(engine.models.config, "clip_l", TE_KEY)
    want = unet_w + 0.25 * expected_delta(b, name) + (-1.0) * expected_delta(a, name)
    got = engine.models.unet.get_submodule(KEY).weight.detach()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # fp32 rounding of two computations of one sum
    te_want = te_w + 0.5 * expected_delta(b, te_name) + (-1.0) * expected_delta(a, te_name)
    torch.testing.assert_close(engine.models.text_encoders[0].get_submodule(TE_KEY).weight.detach(), te_want,
                               rtol=0, atol=1e-6)
    assert (got - unet_w).abs().max() > 1e-3  # the delta is visible
    h.unpatch()
    assert weights_digest(engine) == before


def test_requests_switch_sets_without_reloading(lora_dir: Path) -> None:
    manager = ModelManager(max_models=2)
    models = manager.get("checkpoint", None)
    e = Engine(models, manager=manager, lora_dirs=[lora_dir / "models" / "Lora"])
    e.show_progress = False
    h = handler(e)
    original = weights_digest(e)
    vae_param = next(e.models.vae.parameters())
    plain = e.generate(P())
    with_detail = e.generate(P(prompt="a red circle <lora:detail:0.8>"))
    digest_detail = weights_digest(e)
    assert digest_detail != original and h.is_patched and h.builds == 1
    reads = h.library.reads
    again = e.generate(P(prompt="a red circle <lora:detail:0.8>"))  # same set: nothing re-done
    assert h.builds == 1 and h.library.reads == reads and weights_digest(e) == digest_detail
    assert np.array_equal(arr(again.images[0]), arr(with_detail.images[0]))
    e.generate(P(prompt="a red circle <lora:ink:1> <lora:detail:0.8>"))  # another set: re-patched
    assert h.builds == 2
    back = e.generate(P())  # no LoRA: the original weights, bit for bit
    assert not h.is_patched and weights_digest(e) == original
    assert np.array_equal(arr(back.images[0]), arr(plain.images[0]))
    assert not np.array_equal(arr(with_detail.images[0]), arr(plain.images[0]))
    assert manager.loads == 1 and e.models is models and next(e.models.vae.parameters()) is vae_param


def test_tags_and_params_loras_are_one_path(engine: Engine, lora_dir: Path) -> None:
    tagged = engine.generate(P(prompt="a red circle <lora:detail_v2:0.7:0.4>"))
    spec = engine.generate(P(loras=[LoraSpec("detail_v2", 0.7, 0.4)]))
    assert np.array_equal(arr(tagged.images[0]), arr(spec.images[0]))
    short = addnet_shorthash(lora_dir / "models" / "Lora" / "detail.safetensors")
    assert f"Lora hashes: \"detail_v2: {short}\"" in tagged.infotexts[0]
    assert parse_infotext(tagged.infotexts[0])["Lora hashes"] == f"detail_v2: {short}"
    assert tagged.infotexts[0].startswith("a red circle <lora:detail_v2:0.7:0.4>\n")  # the tag stays, as A1111
    # a LoRA given without a tag is written into the prompt, as A1111 writes its "additional network"
    assert spec.infotexts[0].startswith("a red circle<lora:detail_v2:0.7:0.4>\n")
    assert spec.infotexts[0].split("\n")[1:] == tagged.infotexts[0].split("\n")[1:]
    path_spec = engine.generate(P(loras=[LoraSpec(lora_dir / "models" / "Lora" / "unet_only.safetensors", 0.5)]))
    assert "<lora:unet_only:0.5>" in path_spec.infotexts[0] and "unet_only: " in path_spec.infotexts[0]


def test_the_same_lora_twice_as_a1111(engine: Engine) -> None:
    h = handler(engine)
    h.apply(engine, [LoraSpec("unet_only", 1.0)])
    once = engine.models.unet.get_submodule(KEY).weight.detach().clone()
    h.unpatch()
    w0 = engine.models.unet.get_submodule(KEY).weight.detach().clone()
    r = engine.generate(P(prompt="<lora:unet_only:0.3> a red circle <lora:unet_only:1>"))
    twice = engine.models.unet.get_submodule(KEY).weight.detach()
    # one network per name, listed per tag, each with the last tag's weights: the delta at weight 1, twice
    torch.testing.assert_close(twice - w0, 2 * (once - w0), rtol=0, atol=1e-6)
    assert parse_infotext(r.infotexts[0])["Lora hashes"].count("unet_only:") == 1
    h.unpatch()


def test_skipped_modules_warn_or_fail_when_strict(engine: Engine, lora_dir: Path) -> None:
    r = engine.generate(P(prompt="a red circle <lora:partial:1> <lora:nothing:1>"))
    skipped = [w for w in r.warnings if "match nothing" in w]
    assert any("'partial': 1 of its module(s)" in w and "lora_unet_no_such_block_proj" in w for w in skipped)
    assert any("'nothing'" in w and "not applied" in w for w in r.warnings)
    hashes = parse_infotext(r.infotexts[0])["Lora hashes"]
    assert hashes.startswith("partial: ") and "nothing" not in hashes  # only what was applied
    before = weights_digest(engine)
    with pytest.raises(ConfigError, match="'partial': 1 of its module"):
        engine.generate(P(prompt="a red circle <lora:partial:1>", strict_lora=True))
    assert weights_digest(engine) == before  # a failed request leaves the model as it was
    strict = LoraHandler(handler(engine).library, strict=True)
    with pytest.raises(ConfigError, match="match nothing"):
        strict.apply(engine, [LoraSpec("partial")])
    handler(engine).unpatch()


def test_missing_lora_is_a_config_error_with_close_matches(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="close matches: detail"):
        engine.generate(P(prompt="a <lora:detial:1>"))
    with pytest.raises(ConfigError, match="close matches: detail"):
        engine.generate(P(loras=[LoraSpec("detial")]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_patch_and_restore(lora_dir: Path, dtype: torch.dtype) -> None:
    e = sumie.load(dtype=dtype, lora_dirs=[lora_dir / "models" / "Lora"])
    h = handler(e)
    before = weights_digest(e)
    w0 = e.models.unet.get_submodule(KEY).weight.detach().clone()
    h.apply(e, [LoraSpec("unet_only", 0.75)])
    got = e.models.unet.get_submodule(KEY).weight.detach()
    want = (w0.float() + 0.75 * expected_delta(kohya_tensors(e.models, seed=3, text=False),
                                               kohya_name(e.models.config, "unet", KEY)))
    assert got.dtype == dtype and not torch.equal(got, w0)
    torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)  # one rounding to dtype
    h.unpatch()
    assert weights_digest(e) == before


# ------------------------------------------------------------------------------------------------ CLI


def sumie_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sumie", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sumie: error: "), r.stderr
    return lines[0]


def test_cli_generate_with_tags_and_flag(lora_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    r = sumie_cli("generate", "a red circle <lora:detail:0.8>", "--models-dir", lora_dir, "--steps", "2", "--seed",
                  "3", "-q", "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        text = im.info["parameters"]
    short = addnet_shorthash(lora_dir / "models" / "Lora" / "detail.safetensors")
    assert text.startswith("a red circle <lora:detail:0.8>\n") and f'Lora hashes: "detail: {short}"' in text
    flag = tmp_path / "b.png"
    r = sumie_cli("generate", "a red circle", "--lora-dir", lora_dir / "models" / "Lora", "--lora", "detail:0.8",
                  "--steps", "2", "--seed", "3", "-q", "-o", flag, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as a, Image.open(flag) as b:
        assert np.array_equal(arr(a), arr(b))


def test_cli_bad_lora_input_is_one_line(lora_dir: Path, tmp_path: Path) -> None:
    r = sumie_cli("generate", "a <lora:detial:1>", "--models-dir", lora_dir, "-o", tmp_path / "x.png", cwd=tmp_path)
    assert "close matches: detail" in one_line_error(r) and not (tmp_path / "x.png").exists()
    r = sumie_cli("generate", "a <lora:partial:1>", "--models-dir", lora_dir, "--strict-lora", "--steps", "1", "-q",
                  "-o", tmp_path / "y.png", cwd=tmp_path)
    assert "match nothing" in one_line_error(r) and not (tmp_path / "y.png").exists()
    r = sumie_cli("generate", "a", "--lora", "x:heavy:1:2", "-o", tmp_path / "z.png", cwd=tmp_path)
    assert "no LoRA" in one_line_error(r)


def test_cli_family_mismatch_is_one_line(tmp_path: Path) -> None:
    # an SDXL LoRA (two text encoders, bigG widths) on the SD1 tiny model
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (o, i) in {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
                         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, i, generator=g).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn(o, 4, generator=g).half()
        tensors[f"{name}.alpha"] = torch.tensor(4.0).half()
    save_file(tensors, str(tmp_path / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    r = sumie_cli("generate", "a <lora:xl:1>", "--lora-dir", tmp_path, "--steps", "1", "-q", "-o",
                  tmp_path / "x.png", cwd=tmp_path)
    line = one_line_error(r)
    assert "sdxl" in line.lower() and not (tmp_path / "x.png").exists()


def test_cli_lora_info(tmp_path: Path) -> None:
    # two modules at SD1.5's real shapes (the family is read from the 768-wide cross-attention context)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (o, i, r) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768, 8),
                            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768, 4)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, i, generator=g).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn(o, r, generator=g).half()
        tensors[f"{name}.alpha"] = torch.tensor(r / 2).half()
    path = tmp_path / "info_me.safetensors"
    save_file(tensors, str(path), metadata={"ss_output_name": "detail_v2", "ss_network_dim": "8", "other": "x"})
    r = sumie_cli("lora", "info", path, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["format"], info["family"], len(info["modules"])) == ("kohya", "sd1", 2)
    assert info["metadata"] == {"ss_output_name": "detail_v2", "ss_network_dim": "8"}
    r = sumie_cli("lora", "info", path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "format:   kohya" in out and any(ln.startswith("family:   ") and "(sd1)" in ln for ln in out)
    assert any("lora_unet_down_blocks_0" in ln and "rank 8" in ln and "alpha 4" in ln for ln in out), r.stdout
    assert any("lora_te " in ln and "rank 4" in ln and "alpha 2" in ln for ln in out), r.stdout
    assert "targets (unet): attn2_to_k" in out and "  ss_output_name: detail_v2" in out
    r = sumie_cli("lora", "info", tmp_path / "missing.safetensors", cwd=tmp_path)
    assert "no such file" in one_line_error(r)
    (tmp_path / "not_lora.safetensors").write_bytes(b"garbage")
    one_line_error(sumie_cli("lora", "info", tmp_path / "not_lora.safetensors", cwd=tmp_path))


def test_cli_merge_equals_the_runtime_patch(engine: Engine, lora_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    model_arg = "sumie-tiny"
    r = sumie_cli("lora", "merge", model_arg, "detail:0.6:0.3", "ink:-0.5", "--models-dir", lora_dir, "--dtype",
                  "fp32", "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = sumie.load(out).models
    h = handler(engine)
    h.apply(engine, [LoraSpec("detail", 0.6, 0.3), LoraSpec("ink", -0.5)])
    try:
        n = 0
        for comp, module in engine.models.modules().items():
            theirs = merged.modules()[comp].state_dict()
            for k, v in module.state_dict().items():
                assert torch.equal(theirs[k], v), f"{comp}.{k}"
                n += 1
        assert n > 100
    finally:
        h.unpatch()
    assert weights_digest(merged) != weights_digest(engine)  # the merge changed the weights
    meta = json.loads(file_metadata(out)["sumie.lora_merge"])
    assert [m["name"] for m in meta] == ["detail", "ink"]
    r = sumie_cli("lora", "merge", model_arg, "detail", "-o", out, cwd=tmp_path)
    assert "already exists" in one_line_error(r)


def test_comfyui_models_folder_and_api_names(tmp_path: Path, engine: Engine) -> None:
    # ComfyUI keeps LoRAs in models/loras; the manager's folders are searched before lora_dirs
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    write_kohya(tmp_path / "models" / "loras" / "sub" / "comfy.safetensors", engine.models, seed=9, every=4)
    manager = ModelManager(ModelFolders(tmp_path))
    e = Engine(engine.models, manager=manager)
    e.show_progress = False
    h = handler(e)
    try:
        r = e.generate(P(loras=["comfy"]))  # a bare name is LoraSpec(name) at weight 1
        assert h.is_patched and "<lora:comfy:1.0>" in r.infotexts[0]
    finally:
        h.unpatch()
    with pytest.raises(ConfigError, match="LoraSpec"):
        e.generate(P(loras=[("comfy", 0.5)]))  # type: ignore[list-item]


def test_an_edited_file_is_read_again(engine: Engine, tmp_path: Path) -> None:
    f = write_kohya(tmp_path / "edit_me.safetensors", engine.models, seed=21, text=False)
    h = handler(engine)
    h.unpatch()
    w0 = engine.models.unet.get_submodule(KEY).weight.detach().clone()
    h.apply(engine, [LoraSpec(f)])
    first = engine.models.unet.get_submodule(KEY).weight.detach().clone()
    reads = h.library.reads
    h.apply(engine, [LoraSpec(f)])
    assert h.library.reads == reads  # unchanged file: the cached parse
    write_kohya(f, engine.models, seed=22, text=False)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    h.apply(engine, [LoraSpec(f)])
    second = engine.models.unet.get_submodule(KEY).weight.detach()
    assert h.library.reads == reads + 1 and not torch.equal(first, second)
    want = w0 + expected_delta(kohya_tensors(engine.models, seed=22, text=False),
                               kohya_name(engine.models.config, "unet", KEY))
    torch.testing.assert_close(second, want, rtol=0, atol=1e-6)
    h.unpatch()
