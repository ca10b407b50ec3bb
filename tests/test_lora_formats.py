"""LoRA names and formats: kohya/diffusers names -> Sumie weight keys, each file format's deltas, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from sumie.adapters.lora.file import lora_info, module_patches, parse_lora, read_lora
from sumie.adapters.lora.names import (
    _meta_component,
    default_targets,
    kohya_name,
    lora_targets,
    targets_for_modules,
)
from sumie.adapters.patcher import ModelPatcher, PatchEntry, patched_weight
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.loader import StableDiffusionModels, load_models
from sumie.checkpoints.save import random_single_file, single_file_state_dict
from sumie.configs import SD1, SD2, SDXL, TINY, ModelConfig
from sumie.errors import ConfigError


def _meta_targets(config: ModelConfig) -> dict[str, str]:
    comps = ["unet"] + [t.name for t in config.text_encoders]
    return targets_for_modules(config, {c: _meta_component(config, c) for c in comps})


def _weight_shape(config: ModelConfig, key: str) -> tuple[int, ...]:
    comp, _, rest = key.partition(".")
    return tuple(_meta_component(config, comp).get_parameter(rest).shape)


# ------------------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize(("config", "counts"), [
    (SD1, {"unet": (192, 86), "clip_l": (72, 0)}),
    (SD2, {"unet": (192, 86), "clip_h": (144, 0)}),
    (SDXL, {"unet": (722, 66), "clip_l": (72, 0), "clip_g": (192, 0)}),
])
def test_default_targets_count_what_kohya_trains(config: ModelConfig, counts: dict[str, tuple[int, int]]) -> None:
    # 192 UNet + 72 CLIP modules for SD1.5, LoCon 278 UNet modules; SDXL 722 + 72 + 192 (the reference's figures)
    got = {c: (len(default_targets(config, c, "lora")), len(default_targets(config, c, "conv"))) for c in counts}
    assert got == counts
    lora = default_targets(config, "unet", "lora")
    assert not any("norm" in p or p.startswith(("input_blocks.0.", "out.", "time_embed")) for p in lora)
    conv = default_targets(config, "unet", "conv")
    assert set(lora).isdisjoint(conv)
    assert any(p.endswith("skip_connection") for p in conv) and any(p.endswith(".op") for p in conv)
    assert "input_blocks.0.0" not in conv and "out.2" not in conv


def test_unknown_kind_and_component_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="kind"):
        default_targets(SD1, "unet", "loha")
    with pytest.raises(ConfigError, match="clip_g"):
        default_targets(SD1, "clip_g", "lora")
    with pytest.raises(ConfigError, match="clip_g"):
        kohya_name(SD1, "clip_g", "text_model.encoder.layers.0.mlp.fc1")


# Names as kohya's sd-scripts / A1111 write them (written out by hand, not computed), and where they land.
SD1_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0":
        "unet.input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj":
        "unet.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        "unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_up_blocks_3_attentions_2_proj_out": "unet.output_blocks.11.1.proj_out.weight",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2":
        "unet.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": "unet.input_blocks.4.0.in_layers.2.weight",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "unet.input_blocks.4.0.skip_connection.weight",
    "lora_unet_down_blocks_3_resnets_1_time_emb_proj": "unet.input_blocks.11.0.emb_layers.1.weight",
    "lora_unet_mid_block_resnets_1_conv2": "unet.middle_block.2.out_layers.3.weight",
    "lora_unet_down_blocks_2_downsamplers_0_conv": "unet.input_blocks.9.0.op.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "unet.output_blocks.2.1.conv.weight",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "unet.output_blocks.8.2.conv.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_11_mlp_fc2": "clip_l.text_model.encoder.layers.11.mlp.fc2.weight",
    "lora_te_text_model_encoder_layers_3_self_attn_out_proj":
        "clip_l.text_model.encoder.layers.3.self_attn.out_proj.weight",
    # the same modules by diffusers/PEFT paths, and original-layout kohya names (A1111 accepts both layouts)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "unet.output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
        "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_encoder.encoder.layers.0.mlp.fc1": "clip_l.text_model.encoder.layers.0.mlp.fc1.weight",
    "lora_unet_input_blocks_1_1_proj_in": "unet.input_blocks.1.1.proj_in.weight",
}
SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj":
        "unet.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight",
    "lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_out_0":
        "unet.output_blocks.0.1.transformer_blocks.3.attn2.to_out.0.weight",
    "lora_unet_input_blocks_7_1_proj_in": "unet.input_blocks.7.1.proj_in.weight",
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.input_blocks.1.0.in_layers.2.weight",
    "lora_unet_output_blocks_2_2_conv": "unet.output_blocks.2.2.conv.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj":
        "clip_l.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "lora_te2_text_model_encoder_layers_31_self_attn_v_proj":
        "clip_g.text_model.encoder.layers.31.self_attn.v_proj.weight",
    "lora_te2_text_model_encoder_layers_5_mlp_fc1": "clip_g.text_model.encoder.layers.5.mlp.fc1.weight",
    "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k":
        "unet.input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight",
    "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v":
        "unet.output_blocks.2.1.transformer_blocks.9.attn2.to_v.weight",
    "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj":
        "clip_g.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_k":
        "unet.input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight",
}


@pytest.mark.parametrize(("config", "names"), [(SD1, SD1_NAMES), (SDXL, SDXL_NAMES)])
def test_known_names_land_on_their_weights(config: ModelConfig, names: dict[str, str]) -> None:
    targets = _meta_targets(config)
    assert {n: targets.get(n) for n in names} == names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" not in targets or config is SD1
    assert all(not n.startswith("lora_te1_") for n in targets) or config is SDXL


def test_no_underscore_guessing() -> None:
    # a path with '_' replaced by '.' is not a module name; unknown names are simply absent
    targets = _meta_targets(SD1)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_x" not in targets
    assert "unet.down.blocks.0.attentions.0.proj.in" not in targets
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in targets


def _diffusers_unet(config: ModelConfig) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if config is SD1:
        kw: dict = dict(cross_attention_dim=768)
    else:
        kw = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                  cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        return UNet2DConditionModel(**kw)


@pytest.mark.parametrize("config", [SD1, SDXL])
def test_every_diffusers_module_has_its_kohya_and_peft_name(config: ModelConfig) -> None:
    # oracle: diffusers' own UNet module paths; kohya's name is the path with '.' -> '_' (sd-scripts' rule)
    targets = _meta_targets(config)
    unet = _diffusers_unet(config)
    n = 0
    for path, m in unet.named_modules():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        key = targets.get("unet." + path)
        assert key is not None, path
        assert targets.get("lora_unet_" + path.replace(".", "_")) == key
        assert _weight_shape(config, key) == tuple(m.weight.shape), path
        n += 1
    assert n == (282 if config is SD1 else 794)  # every Linear/Conv of the UNet


@pytest.mark.parametrize("config", [SD1, SDXL])
def test_kohya_name_round_trips_through_lora_targets(config: ModelConfig) -> None:
    targets = _meta_targets(config)
    for comp in ["unet"] + [t.name for t in config.text_encoders]:
        for path in default_targets(config, comp, "lora") + default_targets(config, comp, "conv"):
            name = kohya_name(config, comp, path)
            assert name.startswith("lora_unet_" if comp == "unet" else "lora_te")
            assert targets[name] == f"{comp}.{path}.weight"
    # the family's own layout: diffusers block names for SD1, the original layout for SDXL
    assert kohya_name(SD1, "unet", "input_blocks.1.1.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert kohya_name(SDXL, "unet", "input_blocks.4.1.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert kohya_name(SDXL, "clip_l", "text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"


# ------------------------------------------------------------------------------------------------- formats vs LyCORIS
# The LyCORIS package's own modules are the oracle: a module built on a Linear / 3x3 Conv with the same tensors; its
# weight change is what its forward adds (``get_weight`` / ``make_weight`` times its scale, applied once, as A1111 and
# ComfyUI do; lycoris 4.1.3's ``get_diff_weight`` for LoHa/LoKr multiplies the scale in a second time).

def _layer(conv: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(16, 24, 3, padding=1) if conv else nn.Linear(32, 48)


def _fill(module: nn.Module, seed: int) -> dict[str, Tensor]:
    """Random values for every adapter parameter of a lycoris module (in place); returns them by state-dict name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.named_parameters():
        if name.startswith("org_module"):
            continue
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[name] = p.detach().clone()
    return out


def _ours(layer: nn.Module, tensors: dict[str, Tensor], strength: float = 1.0) -> Tensor:
    """The layer's weight patched by Sumie from a one-module file with these tensors."""
    lora = parse_lora({f"lora_unet_x.{k}": v for k, v in tensors.items()})
    assert list(lora.modules) == ["lora_unet_x"]
    shapes = {"unet.x.weight": tuple(layer.weight.shape)}
    patches = module_patches(lora.modules["lora_unet_x"], "unet.x.weight", shapes)
    return patched_weight(layer.weight.detach(), [PatchEntry(patches["unet.x.weight"], strength)])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [(False, False), (True, False), (True, True)]  # (conv 3x3, Tucker core): Tucker cores exist for convs only


@pytest.mark.parametrize(("conv", "tucker"), CASES)
def test_loha_matches_lycoris(conv: bool, tucker: bool) -> None:
    from lycoris.modules.loha import LohaModule

    layer = _layer(conv)
    ref = LohaModule("x", layer, 1.0, lora_dim=4, alpha=3.0, use_tucker=tucker)
    tensors = _fill(ref, 1)
    assert ("hada_t1" in tensors) == tucker
    tensors["alpha"] = torch.tensor(3.0, dtype=torch.float16)
    want = layer.weight.detach() + ref.get_weight(ref.shape).detach()
    assert _rel(_ours(layer, tensors), want) < 1e-6
    assert _rel(_ours(layer, {**tensors, "alpha": torch.tensor(4.0)}), want) > 1e-2  # alpha/rank matters


# (conv, tucker, decompose w1, w2 whole): LyCORIS picks whole or factored halves from the rank and shapes
LOKR_CASES = [
    (False, False, False, False),  # w1 whole, w2 = w2_a @ w2_b: alpha/rank scales
    (False, False, True, False),  # both factored
    (False, False, False, True),  # both whole: scale 1 whatever the alpha
    (True, False, False, False),  # conv 3x3, w2_b flattened [r, in * 9]
    (True, True, False, False),  # conv 3x3 with a Tucker core t2
]


@pytest.mark.parametrize(("conv", "tucker", "both", "full"), LOKR_CASES)
def test_lokr_matches_lycoris(conv: bool, tucker: bool, both: bool, full: bool) -> None:
    from lycoris.modules.lokr import LokrModule

    layer = _layer(conv)
    ref = LokrModule("x", layer, 1.0, lora_dim=2, alpha=5.0, use_tucker=tucker, decompose_both=both,
                     full_matrix=full)
    tensors = _fill(ref, 2)
    assert ("lokr_w2" in tensors) == full and ("lokr_w1_a" in tensors) == both and ("lokr_t2" in tensors) == tucker
    tensors["alpha"] = torch.tensor(5.0)
    want = layer.weight.detach() + ref.get_weight(ref.shape).detach()
    assert _rel(_ours(layer, tensors), want) < 1e-6
    other = _rel(_ours(layer, {**tensors, "alpha": torch.tensor(1.0)}), want)
    assert other < 1e-6 if full else other > 1e-2  # alpha counts only where a factor is a product


@pytest.mark.parametrize(("conv", "tucker"), CASES)
def test_locon_matches_lycoris(conv: bool, tucker: bool) -> None:
    from lycoris.modules.locon import LoConModule

    layer = _layer(conv)
    ref = LoConModule("x", layer, 1.0, lora_dim=4, alpha=6.0, use_tucker=tucker)
    tensors = _fill(ref, 3)
    assert ("lora_mid.weight" in tensors) == tucker
    tensors["alpha"] = torch.tensor(6.0, dtype=torch.bfloat16)
    want = ref.get_merged_weight(multiplier=1.0)[0].detach()
    assert _rel(_ours(layer, tensors), want) < 1e-6
    half = ref.get_merged_weight(multiplier=0.5)[0].detach()  # a plain LoRA: strength scales the delta
    assert _rel(_ours(layer, tensors, strength=0.5), half) < 1e-6


@pytest.mark.parametrize("on_out", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_matches_lycoris_and_strength_interpolates(conv: bool, on_out: bool) -> None:
    from lycoris.modules.locon import LoConModule

    layer = _layer(conv)
    ref = LoConModule("x", layer, 1.0, lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=on_out)
    tensors = _fill(ref, 4)  # includes a random magnitude dora_scale
    magnitude = tensors["dora_scale"]
    assert magnitude.shape[0] == (layer.weight.shape[0] if on_out else 1)  # LyCORIS (out) or kohya (in) axis
    tensors["alpha"] = torch.tensor(2.0)
    w0 = layer.weight.detach()
    want = ref.get_merged_weight(multiplier=1.0)[0].detach()
    assert _rel(_ours(layer, tensors), want) < 1e-6
    # strength s: W + s (W_dora - W), as ComfyUI applies it (LyCORIS's own multiplier keeps the unscaled delta)
    assert _rel(_ours(layer, tensors, strength=0.3), w0 + 0.3 * (want - w0)) < 1e-6
    assert _rel(_ours(layer, {**tensors, "dora_scale": magnitude * 2}), want) > 0.5


def test_full_diff_and_bias_and_norm_diffs() -> None:
    layer = _layer(False)
    g = torch.Generator().manual_seed(5)
    diff, diff_b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    lora = parse_lora({"lora_unet_x.diff": diff, "lora_unet_x.diff_b": diff_b,
                       "lora_unet_n.w_norm": torch.ones(48), "lora_unet_n.b_norm": torch.ones(48)})
    assert lora.format == "full"
    shapes = {"unet.x.weight": (48, 32), "unet.x.bias": (48,), "unet.n.weight": (48,), "unet.n.bias": (48,)}
    p = module_patches(lora.modules["lora_unet_x"], "unet.x.weight", shapes)
    assert set(p) == {"unet.x.weight", "unet.x.bias"}
    w = patched_weight(layer.weight.detach(), [PatchEntry(p["unet.x.weight"], 0.5)])
    assert torch.equal(w, layer.weight.detach() + 0.5 * diff)  # the same computation as the patcher's formula
    b = patched_weight(layer.bias.detach(), [PatchEntry(p["unet.x.bias"], 1.0)])
    assert torch.equal(b, layer.bias.detach() + diff_b)
    n = module_patches(lora.modules["lora_unet_n"], "unet.n.weight", shapes)
    assert set(n) == {"unet.n.weight", "unet.n.bias"}


def test_peft_bias_is_scaled_like_the_weight() -> None:
    g = torch.Generator().manual_seed(6)
    a, b, bias = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g), torch.randn(48, generator=g)
    lora = parse_lora({"unet.x.lora_A.weight": a, "unet.x.lora_B.weight": b, "unet.x.lora_B.bias": bias,
                       "unet.x.alpha": torch.tensor(2.0)})
    p = module_patches(lora.modules["unet.x"], "unet.x.weight", {"unet.x.weight": (48, 32), "unet.x.bias": (48,)})
    assert torch.allclose(p["unet.x.bias"].delta, bias * 0.5)  # type: ignore[arg-type]
    w0 = torch.zeros(48, 32)
    assert torch.allclose(patched_weight(w0, [PatchEntry(p["unet.x.weight"])]), 0.5 * b @ a, atol=1e-6)


# ------------------------------------------------------------------------------------------------- on loaded models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StableDiffusionModels]:
    """Tiny random SD1 and SDXL checkpoints (real key layout) loaded by Sumie."""
    root = tmp_path_factory.mktemp("lora_models")
    out = {}
    for family in ("sd1", "sdxl"):
        path = root / f"{family}.safetensors"
        save_safetensors_atomic(random_single_file(TINY[family], seed=7), path)
        out[family] = load_models(path)
    return out


def _kohya(targets: dict[str, tuple[int, ...]], seed: int, rank: int = 2,
           alphas: dict[str, float] | None = None) -> dict[str, Tensor]:
    """A kohya state dict for {kohya name: weight shape} (Linear or conv), optional alphas."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for name, shape in targets.items():
        tail = tuple(shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], *tail, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *(1,) * len(tail), generator=g)
    for name, a in (alphas or {}).items():
        sd[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float16)
    return sd


SD1_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
SD1_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _sd1_file(alphas: dict[str, float] | None = None, seed: int = 0) -> dict[str, Tensor]:
    return _kohya({SD1_Q: (32, 32), SD1_PROJ_IN: (32, 32, 1, 1), SD1_TE: (64, 64)}, seed, alphas=alphas)


def _apply(models: StableDiffusionModels, *files: dict[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
    """The models' tensors with the files patched in (a copy), the model restored after."""
    patcher = ModelPatcher.for_models(models)
    for sd in files:
        p = parse_lora(sd).patches(models)
        patcher.add_patches(p.unet, strength=strength)
        patcher.add_patches(p.text, strength=strength)
    with patcher.patched():
        return {k: v.detach().clone() for k, v in patcher.root.state_dict().items()}


def test_lora_targets_of_loaded_models_are_patcher_keys(tiny: dict[str, StableDiffusionModels]) -> None:
    for models in tiny.values():
        targets = lora_targets(models)
        keys = ModelPatcher.for_models(models).weight_shapes
        assert set(targets.values()) <= set(keys)
        assert not any(k.startswith("vae.") for k in targets.values())
    assert lora_targets(tiny["sd1"])[SD1_Q] == "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def test_kohya_delta_is_alpha_over_rank_times_up_down(tiny: dict[str, StableDiffusionModels]) -> None:
    models = tiny["sd1"]
    sd = _sd1_file(alphas={SD1_Q: 1.0, SD1_PROJ_IN: 8.0})  # fp16 alphas; the text module has none
    before = {k: v.clone() for k, v in ModelPatcher.for_models(models).root.state_dict().items()}
    after = _apply(models, sd, strength=0.7)
    for name, key, alpha in ((SD1_Q, "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 1.0),
                             (SD1_PROJ_IN, "unet.input_blocks.1.1.proj_in.weight", 8.0),
                             (SD1_TE, "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight", 2.0)):
        up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(before[key].shape)
        want = before[key] + 0.7 * (alpha / 2) * delta  # rank 2; no alpha: alpha = rank
        assert _rel(after[key], want) < 1e-6, name
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(changed) == 3


def test_two_loras_on_one_weight_add(tiny: dict[str, StableDiffusionModels]) -> None:
    models = tiny["sd1"]
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    base = ModelPatcher.for_models(models).root.state_dict()[key].clone()
    a, b = _sd1_file(seed=1), _sd1_file(seed=2)
    da, db = (_apply(models, f)[key] - base for f in (a, b))
    both = _apply(models, a, b)[key]
    assert _rel(both, base + da + db) < 1e-6
    assert _rel(both, base + da) > 1e-2


def test_unmappable_names_are_reported_not_dropped(tiny: dict[str, StableDiffusionModels]) -> None:
    sd = _sd1_file()
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 32)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 2)
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.hypernet_weight"] = torch.zeros(3)
    p = parse_lora(sd).patches(tiny["sd1"])
    assert sorted(p.skipped) == ["lora_unet_down_blocks_0_attentions_0_proj_in.hypernet_weight",
                                 "lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert len(p.unet) == 2 and len(p.text) == 1


def test_family_mismatch_is_an_error_both_ways(tiny: dict[str, StableDiffusionModels]) -> None:
    sd1 = parse_lora(_sd1_file())
    assert sd1.family == "sd1"
    with pytest.raises(ConfigError, match="this LoRA is for SD1, the loaded model is SDXL"):
        sd1.patches(tiny["sdxl"])
    xl = parse_lora(_kohya({"lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q": (128, 128),
                            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (64, 64)}, 0))
    assert xl.family == "sdxl"
    with pytest.raises(ConfigError, match="this LoRA is for SDXL, the loaded model is SD1"):
        xl.patches(tiny["sd1"])


def test_shape_mismatch_and_broken_files_are_clear_errors(tiny: dict[str, StableDiffusionModels],
                                                          tmp_path: Path) -> None:
    bad = _kohya({SD1_Q: (32, 48)}, 0)  # in-features 48, the model's to_q takes 32
    with pytest.raises(ConfigError, match="another model"):
        parse_lora(bad).patches(tiny["sd1"])
    with pytest.raises(ConfigError, match="lacks up"):
        parse_lora({f"{SD1_Q}.lora_down.weight": torch.zeros(2, 32)})
    ckpt = tmp_path / "ckpt.safetensors"
    save_safetensors_atomic({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, ckpt)
    with pytest.raises(ConfigError, match="not a LoRA file"):
        read_lora(ckpt)


def test_sdxl_te2_qkv_land_on_separate_weights_and_on_openclip_rows(tiny: dict[str, StableDiffusionModels]) -> None:
    models = tiny["sdxl"]
    names = {f"lora_te2_text_model_encoder_layers_1_self_attn_{p}_proj": (64, 64) for p in "qkv"}
    after = _apply(models, _kohya(names, 3))
    state = ModelPatcher.for_models(models).root.state_dict()
    for p in "qkv":
        key = f"clip_g.text_model.encoder.layers.1.self_attn.{p}_proj.weight"
        assert not torch.equal(after[key], state[key])
    assert torch.equal(after["clip_l.text_model.encoder.layers.1.self_attn.q_proj.weight"],
                       state["clip_l.text_model.encoder.layers.1.self_attn.q_proj.weight"])
    # written back to a single file, bigG's q/k/v are the row blocks 0, 1, 2 of OpenCLIP's in_proj_weight
    patcher = ModelPatcher.for_models(models)
    p = parse_lora(_kohya(names, 3)).patches(models)
    patcher.add_patches(p.text)
    with patcher.patched():
        sd = single_file_state_dict(models.config, models.unet, models.vae, models.text_encoders)
    fused = sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    for i, part in enumerate("qkv"):
        want = after[f"clip_g.text_model.encoder.layers.1.self_attn.{part}_proj.weight"]
        assert torch.equal(fused[64 * i : 64 * (i + 1)], want)


def test_other_name_styles_map_to_the_same_weights(tiny: dict[str, StableDiffusionModels]) -> None:
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    tdown, tup = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    files = [
        {f"{SD1_Q}.lora_down.weight": down, f"{SD1_Q}.lora_up.weight": up,
         f"{SD1_TE}.lora_down.weight": tdown, f"{SD1_TE}.lora_up.weight": tup},
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": down,
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": up,
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": tdown,
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": tup},
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
         "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": tdown,
         "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": tup},
        {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
         "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
         "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": tdown,
         "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": tup},
    ]
    results = [_apply(tiny["sd1"], f) for f in files]
    assert [parse_lora(f).format for f in files] == ["kohya", "diffusers", "diffusers", "mixed"]
    for r in results[1:]:
        assert all(torch.equal(r[k], results[0][k]) for k in r)


def test_family_from_real_sizes() -> None:
    def meta(*shape: int) -> Tensor:
        return torch.empty(shape, device="meta")

    def file(name: str, out: int, inn: int) -> dict[str, Tensor]:
        return {f"{name}.lora_down.weight": meta(4, inn), f"{name}.lora_up.weight": meta(out, 4)}

    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert parse_lora(file(k, 1280, 768)).family == "sd1"
    assert parse_lora(file(k, 1280, 1024)).family == "sd2"
    assert parse_lora(file("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)).family == "sdxl"
    assert parse_lora(file("lora_te_text_model_encoder_layers_0_mlp_fc1", 4096, 1024)).family == "sd2"
    assert parse_lora(file("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768)).family == "sd1"
    assert parse_lora(file("lora_te1_text_model_encoder_layers_0_mlp_fc1", 3072, 768)).family == "sdxl"
    assert parse_lora(file("lora_unet_up_blocks_1_resnets_0_conv1", 1280, 2560)).family is None


def test_lora_info(tmp_path: Path) -> None:
    sd = _sd1_file(alphas={SD1_Q: 1.0})
    path = tmp_path / "x.safetensors"
    save_safetensors_atomic(sd, path, metadata={"ss_network_dim": "2", "ss_base_model_version": "sd_v1",
                                                "other": "x"})
    info = lora_info(path)
    assert info["format"] == "kohya" and info["family"] == "sd1" and info["family_name"] == "SD1"
    assert info["module_counts"] == {"unet": 2, "text": 1}
    assert info["modules"][SD1_Q]["rank"] == 2 and info["modules"][SD1_Q]["alpha"] == 1.0
    assert info["modules"][SD1_TE]["alpha"] is None and info["modules"][SD1_TE]["scale"] == 1.0
    assert info["metadata"] == {"ss_network_dim": "2", "ss_base_model_version": "sd_v1"}
    json.dumps(info)
