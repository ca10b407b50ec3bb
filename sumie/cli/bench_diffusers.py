"""What the diffusers side of ``sumie bench --compare diffusers`` needs to load a single file offline.

``from_single_file`` takes each component's config from a pipeline folder (normally a Hub download); this module
writes that folder from the model config Sumie detects in the file (for SD1.5 and SDXL base the same numbers as the
published configs), with the CLIP tokenizer files built from Sumie's packaged BPE merges.
Only the bench child that runs diffusers uses it; Sumie itself never imports diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sumie.configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sumie.errors import ConfigError

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "linspace"}

PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    """CLIP's vocab.json / merges.txt from Sumie's packaged merges (the same 49408 tokens as OpenAI's files)."""
    from sumie.prompts.tokenizer import load_vocab

    vocab = load_vocab()
    _write_json(folder / "vocab.json", vocab.encoder)
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True})


def unet_config(cfg: UNetConfig) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config of a Sumie UNet config (what ``unet/config.json`` says)."""
    blocks = [cfg.model_channels * m for m in cfg.channel_mult]
    attends = [cfg.attends(level) for level in range(len(blocks))]
    if attends[-1] and cfg.transformer_depth[-1] != cfg.transformer_depth_middle:
        raise ConfigError("bench --compare diffusers: this UNet's middle block depth differs from its last level's, "
                          "which diffusers cannot express")
    # diffusers' middle block takes the last entry; a level without attention ignores its own (published: 1)
    last = len(blocks) - 1
    depths = [d if a else (cfg.transformer_depth_middle if i == last else 1)
              for i, (d, a) in enumerate(zip(cfg.transformer_depth, attends, strict=True))]
    heads: Any = [c // cfg.num_head_channels for c in blocks] if cfg.num_head_channels > 0 else cfg.num_heads
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "block_out_channels": blocks,
        "layers_per_block": cfg.num_res_blocks, "transformer_layers_per_block": depths, "attention_head_dim": heads,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
        "norm_num_groups": cfg.norm_groups}
    if cfg.adm_in_channels is not None:
        out.update(addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return out


def vae_config(cfg: VAEConfig, xl: bool) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config of a Sumie VAE config."""
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "latent_channels": cfg.z_channels, "layers_per_block": cfg.num_res_blocks,
            "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scaling_factor, "force_upcast": xl}


def text_config(cfg: TextEncoderConfig, architecture: str) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` of a Sumie text-encoder config."""
    return {"architectures": [architecture], "model_type": "clip_text_model", "hidden_size": cfg.width,
            "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "projection_dim": cfg.projection_dim or cfg.width, "hidden_act": cfg.activation,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_positions, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 1, "layer_norm_eps": 1e-5}


def write_config_folder(config: ModelConfig, root: Path, scheduler_class: str) -> Path:
    """A diffusers pipeline folder of configs only (no weights) for ``from_single_file(config=root)``."""
    if config.family not in PIPELINES or config.inpainting or config.prediction != "eps":
        raise ConfigError(f"bench --compare diffusers: a {config.family}{' inpainting' if config.inpainting else ''} "
                          f"({config.prediction}) checkpoint; the comparison runs SD1.x and SDXL base (eps) models")
    xl = config.family == "sdxl"
    index: dict[str, Any] = {"_class_name": PIPELINES[config.family], "_diffusers_version": "0.30.0",
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", scheduler_class],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    _write_json(root / "model_index.json", index)
    _write_json(root / "unet" / "config.json", unet_config(config.unet))
    _write_json(root / "vae" / "config.json", vae_config(config.vae, xl))
    _write_json(root / "scheduler" / "scheduler_config.json", {"_class_name": scheduler_class, **SCHEDULER})
    _write_json(root / "text_encoder" / "config.json", text_config(config.text_encoders[0], "CLIPTextModel"))
    _write_tokenizer(root / "tokenizer", "<|endoftext|>")
    if xl:
        _write_json(root / "text_encoder_2" / "config.json",
                    text_config(config.text_encoders[1], "CLIPTextModelWithProjection"))
        _write_tokenizer(root / "tokenizer_2", "!")
    return root
