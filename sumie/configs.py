"""Frozen architecture configs: SD1, SD2, SDXL, SDXL refiner. Variants are data, never branches in forward()."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

Prediction = Literal["eps", "v"]
# How CPU convolutions and linear layers prepack their weights (models/packed): only where it costs no
# memory, always, never
PackingMode = Literal["auto", "on", "off"]
PACKING_MODES: tuple[PackingMode, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class UNetConfig:
    """LDM/sgm ``UNetModel`` hyper-parameters (Rombach et al. 2022; Podell et al. 2023 for SDXL)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer at each resolution level (0 = no attention at that level).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1  # SD2/SDXL: 64 channels per head
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2/SDXL: proj_in/proj_out are Linear, SD1: 1x1 Conv
    adm_in_channels: int | None = None  # SDXL: pooled text + size/crop embeddings -> label_emb
    norm_groups: int = 32
    # LCM-distilled UNets (Luo et al. 2023): width of the guidance-scale embedding added to the timestep embedding
    # through ``time_embedding.cond_proj`` (diffusers' ``time_cond_proj_dim``, 256 for LCM); None = no such input
    guidance_embed_dim: int | None = None
    # Levels that have a SpatialTransformer; None: those with transformer_depth > 0. diffusers' SDXL "mid"/"small"
    # ControlNets have CrossAttn levels of 0 transformer layers (norm, proj_in, proj_out only): True there, depth 0.
    attention_levels: tuple[bool, ...] | None = None

    def attends(self, level: int) -> bool:
        """Whether resolution level ``level`` has a SpatialTransformer after each ResBlock."""
        if self.attention_levels is None:
            return self.transformer_depth[level] > 0
        return self.attention_levels[level]


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (Esser et al. 2021 / LDM ``first_stage_model``) hyper-parameters."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (Radford et al. 2021) plus which hidden layer SD conditions on."""

    name: str = "clip_l"  # clip_l (OpenAI ViT-L/14), clip_h (OpenCLIP ViT-H/14), clip_g (OpenCLIP bigG)
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int | None = None  # text_projection output size; None when the checkpoint has none
    vocab_size: int = 49408
    max_positions: int = 77
    pad_id: int = 49407  # SD1 and SDXL clip_l pad with EOS; OpenCLIP encoders pad with 0 ('!')
    layer: int = -1  # hidden layer the UNet sees: -1 last, -2 penultimate
    final_norm: bool = True  # apply final_layer_norm to that layer's output


@dataclass(frozen=True)
class ModelConfig:
    """One Stable Diffusion family: its three networks and how it was trained."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction: Prediction = "eps"

    @property
    def inpainting(self) -> bool:
        """True for 9-channel inpainting UNets (latent + mask + masked-image latent)."""
        return self.unet.in_channels == 9

    def with_(self, **changes: object) -> ModelConfig:
        """A copy with some fields replaced."""
        return replace(self, **changes)  # type: ignore[arg-type]


CLIP_L = TextEncoderConfig()
CLIP_H = TextEncoderConfig(
    name="clip_h", width=1024, layers=24, heads=16, intermediate=4096, activation="gelu",
    projection_dim=1024, pad_id=0, layer=-2, final_norm=True,
)
CLIP_G = TextEncoderConfig(
    name="clip_g", width=1280, layers=32, heads=20, intermediate=5120, activation="gelu",
    projection_dim=1280, pad_id=0, layer=-2, final_norm=False,
)

SD1 = ModelConfig(family="sd1", unet=UNetConfig(), vae=VAEConfig(), text_encoders=(CLIP_L,))
SD2 = ModelConfig(
    family="sd2",
    unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    vae=VAEConfig(),
    text_encoders=(CLIP_H,),
    prediction="v",
)
SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
        num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    text_encoders=(replace(CLIP_L, layer=-2, final_norm=False), CLIP_G),
)
SDXL_REFINER = ModelConfig(
    family="sdxl_refiner",
    unet=UNetConfig(
        model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
        num_head_channels=64, context_dim=1280, use_linear_in_transformer=True, adm_in_channels=2560,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    text_encoders=(CLIP_G,),
)

FAMILIES: dict[str, ModelConfig] = {c.family: c for c in (SD1, SD2, SDXL, SDXL_REFINER)}


def _tiny(base: ModelConfig, channels: int, depth: tuple[int, int], adm_ids: int = 0) -> ModelConfig:
    """A random-weight stand-in of a family: same key layout, 2 UNet levels, 64-wide 2-layer text encoders."""
    texts = tuple(
        replace(t, width=64, layers=2, heads=1, intermediate=128, projection_dim=64 if t.projection_dim else None)
        for t in base.text_encoders
    )
    unet = replace(
        base.unet, model_channels=channels, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=depth,
        # diffusers ties the middle block's depth to the last level's; the tiny configs do too
        transformer_depth_middle=depth[-1], context_dim=64 * len(texts),
        adm_in_channels=64 + adm_ids * 256 if adm_ids else None,
    )
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=base.vae.scaling_factor)
    return replace(base, unet=unet, vae=vae, text_encoders=texts)


# Random-weight stand-ins with the real key layout of each family, small enough for tests.
TINY: dict[str, ModelConfig] = {
    "sd1": _tiny(SD1, 32, (1, 1)),
    "sd2": _tiny(SD2, 64, (1, 1)),
    "sdxl": _tiny(SDXL, 64, (0, 2), adm_ids=6),  # pooled + (original size, crop, target size)
    "sdxl_refiner": _tiny(SDXL_REFINER, 64, (0, 2), adm_ids=5),  # pooled + (original size, crop, aesthetic)
}


def config_to_dict(config: ModelConfig) -> dict[str, object]:
    """A JSON-ready dict of a ModelConfig (tuples become lists)."""
    return asdict(config)


def config_from_dict(data: dict[str, object]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown or missing fields raise TypeError/KeyError."""
    d = dict(data)

    def tup(sub: dict, *keys: str) -> dict:
        return {k: (tuple(v) if k in keys and v is not None else v) for k, v in sub.items()}

    return ModelConfig(
        family=str(d["family"]),
        unet=UNetConfig(**tup(d["unet"], "channel_mult", "transformer_depth", "attention_levels")),  # type: ignore[arg-type]
        vae=VAEConfig(**tup(d["vae"], "ch_mult")),  # type: ignore[arg-type]
        text_encoders=tuple(TextEncoderConfig(**t) for t in d["text_encoders"]),  # type: ignore[union-attr]
        prediction=d.get("prediction", "eps"),  # type: ignore[arg-type]
    )
