"""Adapter training: what = "lora" (kohya files) and what = "embedding" (textual inversion, A1111 files).

Runs are real and tiny: TINY["sd1"] (or the small diffusers model of test_lora_parity) with random weights, a few
steps on 32x32 synthetic shapes. Checked: only adapter parameters change (base tensors bit-identical, the original
modules back after training), the saved file's kohya names / shapes / alphas / ``ss_*`` metadata, the file loaded by
Sumie's LoRA core gives the training-time model's outputs, diffusers loads the same file and changes its UNet the
same way, and a trained embedding loads from its file and is used by name in prompts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from test_lora_parity import build

from sumie.adapters.lora.file import read_lora
from sumie.adapters.lora.names import kohya_name
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.loader import StableDiffusionModels
from sumie.checkpoints.save import random_single_file
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams
from sumie.prompts.embeddings import SINGLE, EmbeddingLibrary, load_embedding_file
from sumie.prompts.text_conditioning import TextConditioner
from sumie.training.adapters import LoRAAdapter, LoRAWrapped, lora_module_paths
from sumie.training.config import config_from_dict
from sumie.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY["sd1"] with random weights as a single file (the checkpoint adapters are trained on)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors_atomic(random_single_file(TINY["sd1"], seed=3), path)
    return path


def adapter_config(out: Path, init_from: Path, what: str = "lora", lora: dict | None = None,
                   synthetic: dict | None = None, **train: object):
    """A small adapter run: 32x32 synthetic shapes (with stars), 4 steps of batch 4, no samples."""
    raw: dict = {
        "model": {"init_from": str(init_from)},
        "data": {"synthetic": synthetic or {"length": 16, "seed": 1, "mix": {"star": 0.5}}, "resolution": 32,
                 "caption_dropout": 0.0},
        "train": {"what": what, "steps": 4, "batch_size": 4, "lr": 1e-2, "seed": 0, "ema_decay": 0.0, **train},
        "output": {"dir": str(out), "checkpoint_every": 0, "sample_every": 0, "log_every": 2},
    }
    if lora is not None:
        raw["lora"] = lora
    return config_from_dict(raw)


LORA_ALL = {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0,
            "targets": ["attention", "ff", "conv", "text_encoder"]}


def _base_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the base networks by its checkpoint name (a wrapper's ``.base.`` taken out), LoRA left out."""
    return {f"{name}.{k}".replace(".base.", "."): v.detach().clone() for name, m in trainer.models.all().items()
            for k, v in m.state_dict().items() if ".adapter." not in k}


def _unet_inputs(ctx_width: int, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, ctx_width, generator=g))


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, dict, object]:
    """4 LoRA steps on every part (LoCon convs included); returns the trainer, the base tensors before, the result."""
    cfg = adapter_config(tmp_path_factory.mktemp("lora"), tiny_ckpt, lora=LORA_ALL, text_encoder_lr=5e-3,
                         unet_lr=2e-2)
    cfg.output.export_dtype = "float16"
    trainer = Trainer(cfg, progress=False)
    unet = trainer.models.unet
    assert isinstance(unet.get_submodule("input_blocks.1.1.proj_in"), LoRAWrapped)  # wrapped while training
    before = _base_tensors(trainer)
    result = trainer.run()
    return trainer, before, result


def test_lora_training_changes_only_lora_parameters(lora_run: tuple) -> None:
    trainer, before, result = lora_run
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    after = _base_tensors(trainer)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    network = trainer.models.lora
    ups = [a.lora_up.weight for a in network.adapters.values()]
    assert all(u.abs().sum() > 0 for u in ups)  # every up started at zero and trained
    # the wrappers are gone: the networks hold their original modules again
    unet = trainer.models.unet
    for path in lora_module_paths(trainer.models.config, LORA_ALL["targets"])["unet"]:
        assert not isinstance(unet.get_submodule(path), LoRAWrapped)
    assert not trainer.models.patcher.is_patched
    # the optimizer groups took the per-part learning rates
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": 2e-2, "text": 5e-3}


def test_lora_init_is_kohya() -> None:
    lin = torch.nn.Linear(64, 32)
    a = LoRAAdapter(lin, rank=4, alpha=2.0)
    assert torch.equal(a.lora_up.weight, torch.zeros(32, 4))
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.lora_down.weight.abs().max() <= bound and a.lora_down.weight.abs().max() > 0.8 * bound
    wrapped = LoRAWrapped(lin, a)
    x = torch.randn(3, 64)
    assert torch.equal(wrapped(x), lin(x))  # a fresh LoRA changes nothing


def test_saved_lora_has_kohya_names_shapes_alpha_and_metadata(lora_run: tuple) -> None:
    trainer, _, result = lora_run
    path = result.export
    assert path.name == "lora.safetensors"
    tensors = load_file(path)
    cfg = trainer.models.config
    paths = lora_module_paths(cfg, LORA_ALL["targets"])
    expected = {kohya_name(cfg, comp, p) for comp, ps in paths.items() for p in ps}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors} == expected
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in expected)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in expected
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in expected
    for name in expected:
        down, up, alpha = (tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                           tensors[f"{name}.alpha"])
        assert down.dtype == up.dtype == alpha.dtype == torch.float16
        if down.ndim == 4 and down.shape[-1] == 3:  # a 3x3 conv: conv_rank / conv_alpha, up is 1x1
            assert down.shape[0] == 2 and up.shape[1:] == (2, 1, 1) and float(alpha) == 1.0
        else:
            assert down.shape[0] == 4 and up.shape[1] == 4 and float(alpha) == 2.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "lora" and meta["ss_steps"] == "4"
    assert (float(meta["ss_unet_lr"]), float(meta["ss_text_encoder_lr"]), float(meta["ss_learning_rate"])) == (
        2e-2, 5e-3, 1e-2)
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1"}'
    assert meta["sshs_model_hash"] == hashlib.sha256(save(tensors)).hexdigest()


def test_saved_lora_through_sumie_core_gives_the_training_time_outputs(lora_run: tuple, tiny_ckpt: Path) -> None:
    """Wrapped model (fp32 LoRA) vs the file (fp16 factors) patched into the weights: within fp16 rounding."""
    trainer, _, result = lora_run
    m = trainer.models
    sd = StableDiffusionModels(config=m.config, unet=m.unet, vae=m.vae, text_encoders=m.text_encoders,
                               source="test", prediction_source="test")
    x, t, ctx = _unet_inputs(m.config.unet.context_dim)
    tokens = torch.tensor([[49406, 320, 736, 2368, 49407] + [49407] * 72])
    with torch.no_grad():
        base_out, base_te = m.unet(x, t, ctx), m.text_encoders[0](tokens)[0]
        with m.patcher.patched():  # the training-time wrappers
            wrapped_out, wrapped_te = m.unet(x, t, ctx), m.text_encoders[0](tokens)[0]
        lora = read_lora(result.export)
        assert lora.format == "kohya"
        patches = lora.patches(sd)
        assert patches.skipped == [] and len(patches.unet) + len(patches.text) == len(m.lora.adapters)
        patcher = ModelPatcher.for_models(sd)
        patcher.add_patches(patches.unet)
        patcher.add_patches(patches.text)
        with patcher.patched():
            file_out, file_te = m.unet(x, t, ctx), m.text_encoders[0](tokens)[0]
    for base, wrapped, loaded in ((base_out, wrapped_out, file_out), (base_te, wrapped_te, file_te)):
        change = (wrapped - base).norm()
        assert change > 1e-3 * base.norm()  # the LoRA does something, so the comparison can fail
        assert (loaded - wrapped).norm() <= 2e-3 * change  # measured 0.7-1.1e-4: the file's factors are fp16


def test_sumie_trained_lora_loads_in_diffusers_with_the_same_effect(tmp_path: Path) -> None:
    """The same small diffusers model, trained on by Sumie (UNet LoRA + LoCon), then loaded by diffusers' loader.

    Text-encoder LoRAs are left out: diffusers 0.42 converts only one of kohya's two CLIP name styles (attention or
    MLP) in a file (see test_lora_parity). Tolerance: 1e-4 of the change (two different fp32 computations; measured
    3.8e-6).
    """
    pair = build(tmp_path / "model", xl=False, seed=5)
    cfg = adapter_config(tmp_path / "run", pair.root, lora={"rank": 4, "alpha": 4.0, "conv_rank": 4, "conv_alpha": 4.0,
                                                             "targets": ["attention", "ff", "conv"]})
    trainer = Trainer(cfg, progress=False)
    result = trainer.run()
    x, t, ctx = _unet_inputs(64, size=8, seed=1)
    unet = pair.pipe.unet
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
        pair.pipe.load_lora_weights(str(result.export))
        try:
            theirs = unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            pair.pipe.unload_lora_weights()
        m = trainer.models
        ours_base = m.unet(x, t, ctx)
        with m.patcher.patched():
            ours = m.unet(x, t, ctx)
    assert (ours_base - base).abs().max() < 1e-4  # the same base model on both sides
    change = (theirs - base).norm()
    assert change > 1e-3 * base.norm()
    assert (ours - theirs).norm() <= 1e-4 * change, float((ours - theirs).norm() / change)


def test_embedding_training_changes_only_the_new_vectors(tiny_ckpt: Path, tmp_path: Path) -> None:
    # captions name the new word: the synthetic colour words put it in place of "red"
    synthetic = {"length": 16, "seed": 1, "mix": {"colors": ["red", "blue"]}, "color_words": {"red": "zorbish"}}
    cfg = adapter_config(tmp_path / "emb", tiny_ckpt, what="embedding", embedding_name="zorbish", num_vectors=2,
                         init_word="red circle", lr=5e-2, synthetic=synthetic)
    trainer = Trainer(cfg, progress=False)
    ti = trainer.models.embedding
    table = trainer.models.text_encoders[0].text_model.embeddings.token_embedding.weight
    ids = trainer.tokenizer.encode("red circle")
    assert torch.equal(ti.vectors["clip_l"].detach(), table[torch.tensor(ids)].detach())  # init from the words
    start = ti.vectors["clip_l"].detach().clone()
    before = _base_tensors(trainer)
    assert sum("zorbish" in trainer.data.load(i)[1] for i in range(16)) >= 4
    result = trainer.run()
    after = _base_tensors(trainer)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert not torch.equal(ti.vectors["clip_l"].detach(), start)
    # the file: A1111 layout, named by its stem, loadable and usable by name
    assert result.export.name == "zorbish.safetensors"
    assert set(load_file(result.export)) == {"emb_params"}
    emb = load_embedding_file(result.export)
    assert emb.name == "zorbish" and emb.num_vectors == 2
    assert torch.equal(emb.vectors[SINGLE], ti.vectors["clip_l"].detach())
    m = trainer.models
    lib = EmbeddingLibrary(m.config, trainer.tokenizer)
    lib.add(emb)
    conditioner = TextConditioner(m.config, m.text_encoders, lib)
    prompt = "a zorbish square on a white background"
    chunks, _ = conditioner.tokenize(prompt)
    assert [e.name for _, e in chunks[0].fixes] == ["zorbish"]
    with torch.no_grad():
        trained_ctx = ti.encode(m.text_encoders, [prompt])
    assert torch.allclose(conditioner([prompt]).context, trained_ctx, rtol=1e-6, atol=1e-6)
    sd = StableDiffusionModels(config=m.config, unet=m.unet, vae=m.vae, text_encoders=m.text_encoders,
                               source="test", prediction_source="test")
    engine = Engine(sd, embeddings=lib)
    engine.show_progress = False
    params = dict(steps=2, seed=1, width=32, height=32, cfg_scale=3.0)
    with_word = engine.generate(GenerationParams(prompt=prompt, **params)).images[0]
    plain = engine.generate(GenerationParams(prompt="a square on a white background", **params)).images[0]
    assert with_word.tobytes() != plain.tobytes()


def test_lora_run_resumes_bit_for_bit(lora_run: tuple, tiny_ckpt: Path, tmp_path: Path) -> None:
    """Ctrl-C after step 2 and --resume give the same file as lora_run's 4 uninterrupted steps."""
    _, _, uninterrupted = lora_run

    def config():
        cfg = adapter_config(tmp_path, tiny_ckpt, lora=LORA_ALL, text_encoder_lr=5e-3, unet_lr=2e-2)
        cfg.output.export_dtype = "float16"
        return cfg

    def ctrl_c(trainer: Trainer, step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    first = Trainer(config(), hooks=[ctrl_c], progress=False).run()
    assert first.interrupted and first.step == 2
    second = Trainer(config(), resume=tmp_path, progress=False).run()
    assert first.losses + second.losses == uninterrupted.losses
    a, b = load_file(uninterrupted.export), load_file(second.export)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("what", "lora", "train", "message"), [
    ("lora", {"rank": 0}, {}, "[lora] rank must be at least 1"),
    ("lora", {"targets": ["attention", "mlp"]}, {}, "unknown part 'mlp'"),
    ("lora", {"targets": []}, {}, "[lora] targets must name at least one"),
    ("lora", {"conv_rank": 4}, {}, "targets has no \"conv\""),
    ("lora", {"alpha": 0}, {}, "[lora] alpha must be > 0"),
    ("lora", None, {"text_encoder_lr": 1e-4}, "[lora] targets has no \"text_encoder\""),
    ("lora", None, {"train_text_encoder": True}, "add \"text_encoder\" to [lora] targets"),
    ("diffusion", {"rank": 4}, {}, "[lora] only applies to what = \"lora\""),
    ("embedding", None, {}, "[train] embedding_name must be one word"),
    ("embedding", None, {"embedding_name": "two words"}, "[train] embedding_name must be one word"),
    ("embedding", None, {"embedding_name": "w", "num_vectors": 0}, "[train] num_vectors must be 1 to 75"),
    ("embedding", None, {"embedding_name": "w", "text_encoder_lr": 1e-3}, "text_encoder_lr does not apply"),
    ("lora", None, {"embedding_name": "w"}, "embedding_name only applies to what = \"embedding\""),
    ("embedding", None, {"embedding_name": "w", "unet_lr": 1e-3}, "unet_lr does not apply"),
])
def test_bad_adapter_options_give_clear_errors(tmp_path: Path, what: str, lora: dict | None, train: dict,
                                               message: str) -> None:
    with pytest.raises(ConfigError) as e:
        adapter_config(tmp_path, tmp_path / "x.safetensors", what=what, lora=lora, **train)
    assert message in str(e.value)


def test_bad_lora_section_key_names_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'dim' in \[lora\]; valid keys: rank, alpha"):
        adapter_config(tmp_path, tmp_path / "x.safetensors", lora={"dim": 4})



def test_eval_adherence_lora_option_patches_the_engine(lora_run: tuple, tiny_ckpt: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``sumie eval adherence --lora FILE:1.5``: the file's deltas at strength 1.5 in every targeted weight."""
    import sumie
    from sumie.cli.main import main
    from sumie.cli.measure import _apply_loras

    trainer, _, result = lora_run
    engine = sumie.load(tiny_ckpt)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    before = engine.models.unet.state_dict()[key].clone()
    _apply_loras(engine, [f"{result.export}:1.5"])
    adapter = trainer.models.lora.adapters[kohya_name(engine.models.config, "unet", key.removesuffix(".weight"))]
    want = before + 1.5 * adapter.delta()
    got = engine.models.unet.state_dict()[key]
    assert not torch.allclose(got, before)
    assert torch.allclose(got, want, rtol=0, atol=1e-3 * float(adapter.delta().abs().max()) + 1e-6)  # fp16 factors
    assert main(["eval", "adherence", "--model", str(tiny_ckpt), "--lora", f"{result.export}:strong"]) == 2
    assert "the strength after ':' must be a number" in capsys.readouterr().err
