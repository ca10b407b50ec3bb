"""LoRA parity with diffusers: the same file fused by diffusers and patched by Sumie gives the same weights.

Small random SD1 and SDXL models at the real layout (reduced widths) are built with diffusers/transformers, saved as
a diffusers folder and loaded by Sumie's own loader. A kohya file (UNet 1x1-conv or Linear proj_in, attention,
to_out_0, ff_net_0_proj, a 3x3 LoCon conv, text-encoder attention) and a PEFT file (lora_A/lora_B with
``lora_adapter_metadata`` alphas, text-encoder attention and MLP) with random factors and per-module alphas are
fused by diffusers (``load_lora_weights`` + ``fuse_lora(lora_scale=...)``, UNet and text encoder at different
scales) and patched by Sumie at the same strengths. Every tensor must agree to 1e-6 relative (measured: ~1e-7);
the tensors diffusers changed are exactly the ones Sumie changed.

diffusers 0.42 is the oracle where it follows kohya's semantics. It does not: with per-module alphas that differ, or
with some alphas missing (it gives those the most common alpha; kohya, A1111 and ComfyUI use alpha = rank), so the
kohya files here have one alpha for every module and ranks that differ (per-module alphas and missing alphas are
checked against the formula in test_lora_formats.py); and with a kohya file whose text-encoder part mixes attention
and MLP modules (it converts one of the two name styles only), so the kohya files target text-encoder attention only
and the PEFT files cover the MLP.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
import transformers
from diffusers_folders import write_folder
from safetensors.torch import save_file

from sumie.adapters.lora.file import read_lora
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.keymaps.unet import ldm_to_diffusers_unet
from sumie.checkpoints.loader import StableDiffusionModels, load_models

TOL = 1e-6

SD1_UNET = dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                attention_head_dim=8, sample_size=8)
SDXL_UNET = dict(block_out_channels=(64, 128), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
                 attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=64 + 6 * 256, sample_size=8)
VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@dataclasses.dataclass
class Pair:
    """A diffusers pipeline and Sumie's models loaded from the same folder."""

    root: Path
    pipe: Any
    models: StableDiffusionModels
    xl: bool


def _text(hidden: int, act: str, projection: bool) -> Any:
    cfg = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                                      num_attention_heads=1, vocab_size=49408, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=hidden)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)


def build(root: Path, xl: bool, seed: int) -> Pair:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**(SDXL_UNET if xl else SD1_UNET))
    vae = diffusers.AutoencoderKL(**VAE)
    tes = {"text_encoder": _text(64, "quick_gelu", False)}
    if xl:
        tes["text_encoder_2"] = _text(64, "gelu", True)
    write_folder(root, unet, vae, tes, xl)
    sched = diffusers.EulerDiscreteScheduler()
    if xl:
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=sched, tokenizer=None,
                                                   tokenizer_2=None, **tes)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, unet=unet, scheduler=sched, tokenizer=None,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False, **tes)
    return Pair(root, pipe, load_models(root), xl)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return build(tmp_path_factory.mktemp("sd1"), xl=False, seed=0)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return build(tmp_path_factory.mktemp("sdxl"), xl=True, seed=1)


# ------------------------------------------------------------------------------------------------- LoRA files

def _factors(g: torch.Generator, out: int, inn: int, r: int, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with a scale that keeps deltas comparable to the weights; k: conv kernel (None: Linear)."""
    if k is None:
        return torch.randn(r, inn, generator=g) * 0.2, torch.randn(out, r, generator=g) * 0.2
    return torch.randn(r, inn, k, k, generator=g) * 0.2, torch.randn(out, r, 1, 1, generator=g) * 0.2


def _modules(xl: bool) -> list[tuple[str, str, int, int, int | None]]:
    """(kohya name, diffusers path, out, in, conv kernel) of the modules the test files target."""
    if xl:  # SDXL: attention at level 1 (original layout input_blocks.3, depth 2), Linear proj_in
        b, w, ctx, te = "input_blocks_3_1", 128, 128, [("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2.")]
        d, pk = "down_blocks.1.attentions.0", None
        res, rd, rw = "output_blocks_0_0_in_layers_2", "up_blocks.0.resnets.0.conv1", (128, 256)
    else:
        b, w, ctx, te = "down_blocks_0_attentions_0", 32, 64, [("lora_te_", "text_encoder.")]
        d, pk = "down_blocks.0.attentions.0", 1
        res, rd, rw = "down_blocks_1_resnets_0_conv1", "down_blocks.1.resnets.0.conv1", (64, 32)
    out = [
        (f"lora_unet_{b}_proj_in", f"{d}.proj_in", w, w, pk),
        (f"lora_unet_{b}_proj_out", f"{d}.proj_out", w, w, pk),
        (f"lora_unet_{b}_transformer_blocks_0_attn1_to_q", f"{d}.transformer_blocks.0.attn1.to_q", w, w, None),
        (f"lora_unet_{b}_transformer_blocks_0_attn2_to_k", f"{d}.transformer_blocks.0.attn2.to_k", w, ctx, None),
        (f"lora_unet_{b}_transformer_blocks_0_attn2_to_out_0", f"{d}.transformer_blocks.0.attn2.to_out.0", w, w,
         None),
        (f"lora_unet_{b}_transformer_blocks_0_ff_net_0_proj", f"{d}.transformer_blocks.0.ff.net.0.proj", 8 * w, w,
         None),
        (f"lora_unet_{b}_transformer_blocks_0_ff_net_2", f"{d}.transformer_blocks.0.ff.net.2", w, 4 * w, None),
        (f"lora_unet_{res}", rd, rw[0], rw[1], 3),
    ]
    if xl:
        out.append(("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_v",
                    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v", w, w, None))
    for kohya, dotted in te:
        for layer in (0, 1):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                path = f"text_model.encoder.layers.{layer}.self_attn.{proj}"
                out.append((kohya + path.replace(".", "_"), dotted + path, 64, 64, None))
    return out


def kohya_file(path: Path, xl: bool, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (name, _, out, inn, k) in enumerate(_modules(xl)):
        r = (2, 3, 4)[i % 3]
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = _factors(g, out, inn, r, k)
        sd[f"{name}.alpha"] = torch.tensor(3.0, dtype=torch.float16)  # scale 3/rank: 1.5, 1 or 0.75
    save_file(sd, str(path))
    return path


def peft_file(path: Path, xl: bool, seed: int) -> Path:
    """lora_A/lora_B under unet./text_encoder[_2]. with diffusers' adapter metadata (lora_alpha 3, rank 4, and
    an alpha_pattern for one module)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    mods = [(d, out, inn, k) for _, d, out, inn, k in _modules(xl) if k != 3 and not d.startswith("text")]
    for prefix in ("text_encoder.", "text_encoder_2.") if xl else ("text_encoder.",):
        for proj, out, inn in (("self_attn.q_proj", 64, 64), ("self_attn.out_proj", 64, 64), ("mlp.fc1", 256, 64),
                               ("mlp.fc2", 64, 256)):
            # transformers >= 5 names CLIPTextModel's modules without ``text_model.``; so do diffusers' files
            mods.append((f"{prefix}encoder.layers.1.{proj}", out, inn, None))
    for d, out, inn, k in mods:
        name = d if d.startswith("text_encoder") else "unet." + d
        down, up = _factors(g, out, inn, 4, k)
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
    meta = {"format": "pt"}
    configs = {"unet": {"r": 4, "lora_alpha": 3, "alpha_pattern": {"attn1.to_q": 8}}}
    configs.update({p: {"r": 4, "lora_alpha": 2} for p in ("text_encoder", "text_encoder_2")[: 2 if xl else 1]})
    packed = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}
    for c in configs:
        names = {k.removesuffix(".lora_A.weight") for k in sd if k.startswith(c + ".") and k.endswith("A.weight")}
        packed[f"{c}.target_modules"] = sorted(n.removeprefix(c + ".") for n in names)
    meta["lora_adapter_metadata"] = json.dumps(packed)
    save_file(sd, str(path), metadata=meta)
    return path


# ------------------------------------------------------------------------------------------------- comparison

def _diffusers_fused(pair: Pair, file: Path, te_scale: float, unet_scale: float) -> dict[str, dict[str, Any]]:
    """Fuse ``file`` into the diffusers modules and return their state dicts; the modules are restored after."""
    comps = {"unet": pair.pipe.unet, "text_encoder": pair.pipe.text_encoder}
    if pair.xl:
        comps["text_encoder_2"] = pair.pipe.text_encoder_2
    saved = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in comps.items()}
    pair.pipe.load_lora_weights(str(file))
    pair.pipe.fuse_lora(components=["unet"], lora_scale=unet_scale)
    pair.pipe.fuse_lora(components=[n for n in comps if n != "unet"], lora_scale=te_scale)
    pair.pipe.unload_lora_weights()
    fused = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in comps.items()}
    for n, m in comps.items():
        m.load_state_dict(saved[n])

    def bare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # CLIPTextModelWithProjection keeps it
        return {k.removeprefix("text_model."): v for k, v in sd.items()}

    return {n: {"before": bare(saved[n]), "after": bare(fused[n])} for n in comps}


def _sumie_patched(pair: Pair, file: Path, te_scale: float, unet_scale: float) -> dict[str, dict[str, Any]]:
    """Sumie's patched weights in diffusers' layout, per diffusers component."""
    models = pair.models
    lora = read_lora(file)
    p = lora.patches(models)
    assert p.skipped == []
    patcher = ModelPatcher.for_models(models)
    patcher.add_patches(p.unet, strength=unet_scale)
    patcher.add_patches(p.text, strength=te_scale)
    out: dict[str, dict[str, Any]] = {}
    with patcher.patched():
        out["unet"] = {k: v.clone() for k, v in ldm_to_diffusers_unet(models.unet.state_dict(),
                                                                      models.config.unet).items()}
        for name, te in zip(("text_encoder", "text_encoder_2"), models.text_encoders, strict=False):
            out[name] = {k.removeprefix("text_model."): v.clone() for k, v in te.state_dict().items()}
    return out


def compare(pair: Pair, file: Path, te_scale: float, unet_scale: float) -> tuple[float, int]:
    """Largest relative difference over all tensors, and how many tensors the LoRA changed."""
    ref = _diffusers_fused(pair, file, te_scale, unet_scale)
    ours = _sumie_patched(pair, file, te_scale, unet_scale)
    worst, changed = 0.0, 0
    for comp, sd in ref.items():
        before, after = sd["before"], sd["after"]
        for key, want in after.items():
            if key not in ours[comp]:
                assert key.endswith("position_ids"), key
                continue
            got = ours[comp][key].to(torch.float32)
            touched = not torch.equal(want, before[key])
            changed += touched
            if not touched:
                assert torch.equal(got, want), f"{comp}.{key}: Sumie changed a weight diffusers did not"
                continue
            rel = float((got - want).norm() / want.norm())
            worst = max(worst, rel)
            assert rel <= TOL, f"{comp}.{key}: relative difference {rel:.2e}"
    return worst, changed


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sd1_lora_matches_diffusers_fuse(sd1: Pair, kind: str, tmp_path: Path) -> None:
    file = (kohya_file if kind == "kohya" else peft_file)(tmp_path / f"{kind}.safetensors", False, seed=3)
    worst, changed = compare(sd1, file, te_scale=0.6, unet_scale=0.85)
    n = len([m for m in _modules(False) if kind == "kohya" or (m[4] != 3 and not m[1].startswith("text"))])
    assert changed == n + (4 if kind == "peft" else 0)  # every module of the file, nothing else
    assert worst < TOL


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sdxl_lora_matches_diffusers_fuse(sdxl: Pair, kind: str, tmp_path: Path) -> None:
    file = (kohya_file if kind == "kohya" else peft_file)(tmp_path / f"{kind}.safetensors", True, seed=4)
    worst, changed = compare(sdxl, file, te_scale=1.0, unet_scale=0.5)
    n = len([m for m in _modules(True) if kind == "kohya" or (m[4] != 3 and not m[1].startswith("text"))])
    assert changed == n + (8 if kind == "peft" else 0)
    assert worst < TOL


def test_comparison_can_fail(sd1: Pair, tmp_path: Path) -> None:
    # the same file at another strength in diffusers differs far beyond the tolerance
    file = kohya_file(tmp_path / "k.safetensors", False, seed=3)
    ref = _diffusers_fused(sd1, file, te_scale=0.6, unet_scale=0.85)
    ours = _sumie_patched(sd1, file, te_scale=0.6, unet_scale=0.8)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    want = ref["unet"]["after"][key]
    assert float((ours["unet"][key] - want).norm() / want.norm()) > 1e-3
