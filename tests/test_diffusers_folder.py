"""diffusers pipeline folders load through the same loader and give the references' numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers_folders import write_folder

from sumie.checkpoints.loader import load_models
from sumie.configs import TINY
from sumie.errors import CheckpointError
from sumie.models.unet import sdxl_adm_vector


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= tol


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 and "norm" in str(p) else 0.0))


def _write_folder(root: Path, xl: bool, prediction: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text_kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                   vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    if xl:
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128, attention_head_dim=(1, 2),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256, sample_size=8)
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **text_kw)),
                    "text_encoder_2": CLIPTextModelWithProjection(
                        CLIPTextConfig(hidden_act="gelu", projection_dim=64, **text_kw))}
        scaling = 0.13025
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=8, sample_size=8)
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **text_kw))}
        scaling = 0.18215
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=scaling)
    for i, m in enumerate([unet, vae, *encoders.values()]):
        _randomise(m, i)
    write_folder(root, unet, vae, encoders, xl, prediction)
    return {"unet": unet.eval(), "vae": vae.eval(), **{k: v.eval() for k, v in encoders.items()}}


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_diffusers_folder_matches_reference(tmp_path: Path, xl: bool) -> None:
    refs = _write_folder(tmp_path, xl, "v_prediction" if not xl else "epsilon")
    models = load_models(tmp_path)
    family = "sdxl" if xl else "sd1"
    assert models.config.family == family
    assert models.config.unet == TINY[family].unet
    assert models.config.vae == TINY[family].vae
    assert models.config.text_encoders == TINY[family].text_encoders
    assert models.config.prediction == ("eps" if xl else "v")
    assert models.prediction_source == "scheduler_config.json"

    g = torch.Generator().manual_seed(3)
    tokens = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        hidden = []
        for i, name in enumerate(["text_encoder", "text_encoder_2"][: len(models.text_encoders)]):
            ref = refs[name](tokens, output_hidden_states=True)
            ours, pooled = models.text_encoders[i](tokens, layer=-1, final_norm=True)
            _close(ours, ref.last_hidden_state)
            if name == "text_encoder_2":
                _close(pooled, ref.text_embeds)
            hidden.append(ours)
        context = torch.cat(hidden, dim=-1)
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([10.0, 700.0])
        ctx = context.expand(2, -1, -1)
        if xl:
            pooled = torch.randn(2, 64, generator=g)
            time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
            ref = refs["unet"](x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            ours = models.unet(x, t, ctx, y=sdxl_adm_vector(pooled, time_ids))
        else:
            ref = refs["unet"](x, t, ctx).sample
            ours = models.unet(x, t, ctx)
        _close(ours, ref)
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        _close(models.vae.encode(image).mean, refs["vae"].encode(image).latent_dist.mean)
        z = torch.randn(1, 4, 8, 8, generator=g)
        _close(models.vae.decode(z), refs["vae"].decode(z).sample)


def test_incomplete_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unet/config.json: missing"):
        load_models(tmp_path)
