"""The networks of a training run: new ones (LDM initialisation), a checkpoint to fine-tune, a stage-1 VAE file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.loader import VAE_METADATA_KEY, load_vae
from sumie.configs import ModelConfig, VAEConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.clip import CLIPTextModel
from sumie.models.unet import ResBlock, UNetModel
from sumie.models.vae import AutoencoderKL
from sumie.training.adapters import LoRANetwork, LoRASpec, TextualInversion
from sumie.training.config import TrainConfig, build_model_config

__all__ = ["TrainModels", "build_models", "export_vae", "init_clip_", "init_unet_", "load_vae_file"]


@dataclass
class TrainModels:
    """The networks of a run and which of them the optimizer updates."""

    config: ModelConfig
    unet: UNetModel | None
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    train_unet: bool
    train_vae: bool
    train_text_encoders: bool
    sources: dict[str, str]  # "init_from" / "vae_from" -> path (frozen parts are reloaded from these on resume)
    adapters: dict[str, nn.Module] = field(default_factory=dict)  # "lora" / "embedding": trained on frozen networks
    patcher: ModelPatcher | None = None  # holds the LoRA wrappers (object patches) while they are in the model
    zero_terminal_snr: bool = False  # the loaded checkpoint was trained with zero terminal SNR (its ``ztsnr`` key)

    @property
    def lora(self) -> LoRANetwork | None:
        """The LoRA network of a what = "lora" run."""
        net = self.adapters.get("lora")
        return net if isinstance(net, LoRANetwork) else None

    @property
    def embedding(self) -> TextualInversion | None:
        """The new token vectors of a what = "embedding" run."""
        ti = self.adapters.get("embedding")
        return ti if isinstance(ti, TextualInversion) else None

    @property
    def text_grad(self) -> bool:
        """Whether gradients flow through the text encoders (trained, LoRA-adapted or under new token vectors)."""
        lora = self.lora
        return (self.train_text_encoders or self.embedding is not None
                or (lora is not None and any(n.startswith("lora_te") for n in lora.adapters)))

    def release(self) -> None:
        """Take the LoRA wrappers out of the networks again (the originals back, bit for bit)."""
        if self.patcher is not None:
            self.patcher.unpatch()

    def param_groups(self, lr: float, unet_lr: float | None, text_encoder_lr: float | None) -> list[dict]:
        """Optimizer groups: the UNet's (or its LoRA's) at ``unet_lr``, text encoders' at ``text_encoder_lr``."""
        parts: list[tuple[str, list[nn.Parameter]]] = []
        for name, module in self.trainable().items():
            if isinstance(module, LoRANetwork):
                parts += [("unet", module.part("lora_unet_")), ("text", module.part("lora_te"))]
            else:
                parts.append((name, [p for p in module.parameters() if p.requires_grad]))
        groups = []
        for name, params in parts:
            group_lr = lr
            if name.startswith("text") and text_encoder_lr is not None:
                group_lr = text_encoder_lr
            elif name.startswith("unet") and unet_lr is not None:
                group_lr = unet_lr
            if params:
                groups.append({"params": params, "lr": group_lr, "name": name})
        return groups

    def trainable(self) -> dict[str, nn.Module]:
        """Name -> module for every module the optimizer updates (``unet``, ``vae``, ``text0``, ``lora``, ...)."""
        out: dict[str, nn.Module] = dict(self.adapters)
        if self.train_unet and self.unet is not None:
            out["unet"] = self.unet
        if self.train_vae:
            out["vae"] = self.vae
        if self.train_text_encoders:
            out.update({f"text{i}": te for i, te in enumerate(self.text_encoders)})
        return out

    def all(self) -> dict[str, nn.Module]:
        """Name -> module for every network of the run."""
        out: dict[str, nn.Module] = {"vae": self.vae}
        if self.unet is not None:
            out["unet"] = self.unet
        out.update({f"text{i}": te for i, te in enumerate(self.text_encoders)})
        return out


@torch.no_grad()
def init_unet_(unet: UNetModel) -> UNetModel:
    """LDM's initialisation: every residual branch's last conv, proj_out and the output conv start at zero."""
    for m in unet.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.out_layers[3].weight)
            nn.init.zeros_(m.out_layers[3].bias)
        if hasattr(m, "proj_out") and hasattr(m, "transformer_blocks"):
            for p in m.proj_out.parameters():
                nn.init.zeros_(p)
    for p in unet.out[2].parameters():
        nn.init.zeros_(p)
    return unet


@torch.no_grad()
def init_clip_(te: CLIPTextModel) -> CLIPTextModel:
    """OpenAI CLIP's text-transformer initialisation (Radford et al. 2021, ``initialize_parameters``)."""
    cfg = te.cfg
    tm = te.text_model
    nn.init.normal_(tm.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(tm.embeddings.position_embedding.weight, std=0.01)
    attn_std = cfg.width**-0.5
    proj_std = attn_std * (2 * cfg.layers) ** -0.5
    fc_std = (2 * cfg.width) ** -0.5
    for layer in tm.encoder.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(lin.weight, std=attn_std)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(layer.self_attn.out_proj.bias)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.zeros_(layer.mlp.fc1.bias)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
        nn.init.zeros_(layer.mlp.fc2.bias)
    if te.text_projection is not None:
        nn.init.normal_(te.text_projection.weight, std=attn_std)
    return te


def load_vae_file(path: Path, fallback: VAEConfig, device: str = "cpu") -> AutoencoderKL:
    """A standalone VAE (Sumie's ``vae.safetensors`` with its config, or any LDM/diffusers VAE file), frozen."""
    if not path.exists():
        raise ConfigError(f"[model] vae_from {path}: no such file; train a VAE first (what = \"vae\")")
    return load_vae(path, device=device, fallback=fallback)


def export_vae(path: Path, vae: AutoencoderKL, extra: dict[str, str] | None = None) -> None:
    """Write a standalone VAE (LDM keys, no prefix) with its config in the ``sumie.vae_config`` metadata."""
    from dataclasses import asdict

    meta = {VAE_METADATA_KEY: json.dumps(asdict(vae.config)), **(extra or {})}
    save_safetensors_atomic({k: v.detach().cpu() for k, v in vae.state_dict().items()}, path, metadata=meta)


def build_models(cfg: TrainConfig) -> TrainModels:
    """New networks (seeded by ``[train] seed``, LDM init) or those of ``init_from``; ``vae_from`` replaces the VAE.

    what = "vae": only the VAE trains (its decoder alone with ``train_vae_encoder = false``). what = "diffusion":
    the UNet trains, the text encoders too when ``train_text_encoder`` (default: from scratch yes, fine-tuning no),
    the VAE is frozen. what = "lora" / "embedding": every network is frozen; LoRA wrappers are put into the UNet /
    text encoders through a ModelPatcher (``TrainModels.release()`` takes them out), or new token vectors train.
    """
    # the LDM inits draw from torch's global generator: seed it inside a fork, so the caller's state is untouched
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return _build_models(cfg)


def _build_models(cfg: TrainConfig) -> TrainModels:
    m, t = cfg.model, cfg.train
    device = t.device
    sources: dict[str, str] = {}
    ztsnr = False
    adapter = t.what in ("lora", "embedding")
    if adapter and m.init_from is None:
        from sumie.checkpoints.embedded import resolve_model

        m = replace(m, init_from=resolve_model(None))  # the embedded model
    if m.init_from is not None:
        from sumie.checkpoints.loader import load_models

        if not m.init_from.exists():
            raise ConfigError(f"[model] init_from {m.init_from}: no such file or folder")
        loaded = load_models(m.init_from, device=device, prediction=t.prediction)
        config = loaded.config
        if config.unet.adm_in_channels is not None and not adapter:
            raise ConfigError(f"{m.init_from}: {config.family} models (ADM input) cannot be trained yet; use an "
                              "SD1 or SD2 checkpoint")
        if t.prediction is not None:
            config = replace(config, prediction=t.prediction)
        if m.vae:
            config = replace(config, vae=_vae_overrides(config.vae, m.vae))
            loaded.vae.config = config.vae
        unet, vae, tes = loaded.unet, loaded.vae, list(loaded.text_encoders)
        sources["init_from"] = str(m.init_from)
        ztsnr = loaded.zero_terminal_snr
    else:
        config = build_model_config(cfg)
        vae = AutoencoderKL(config.vae).to(device)
        unet = tes = None  # type: ignore[assignment]
        if t.what == "diffusion":
            unet = init_unet_(UNetModel(config.unet)).to(device)
            tes = [init_clip_(CLIPTextModel(c)).to(device) for c in config.text_encoders]
        else:
            tes = []
    if m.vae_from is not None:
        vae = load_vae_file(m.vae_from, config.vae, device)
        config = replace(config, vae=vae.config)
        sources["vae_from"] = str(m.vae_from)
    elif t.what == "diffusion" and m.init_from is None:
        raise ConfigError("diffusion training from scratch needs a trained VAE: set [model] vae_from to the "
                          "vae.safetensors of a what = \"vae\" run (or init_from a checkpoint)")
    if unet is not None and config.unet.in_channels != vae.config.embed_dim:
        raise ConfigError(f"the UNet takes {config.unet.in_channels} latent channels but the VAE makes "
                          f"{vae.config.embed_dim}; set [model.unet] in_channels/out_channels to match")
    train_te = t.train_text_encoder if t.train_text_encoder is not None else m.init_from is None
    models = TrainModels(config=config, unet=unet, vae=vae, text_encoders=tes or [],
                         train_unet=t.what == "diffusion", train_vae=t.what == "vae",
                         train_text_encoders=t.what == "diffusion" and train_te, sources=sources,
                         zero_terminal_snr=ztsnr)
    if adapter and config.unet.adm_in_channels is not None:
        raise ConfigError(f"{m.init_from}: {config.family} models (ADM input) cannot be trained yet; use an SD1 or "
                          "SD2 checkpoint")
    if t.channels_last:
        for conv_net in (models.unet, models.vae):
            if conv_net is not None:
                conv_net.to(memory_format=torch.channels_last)
    for name, module in models.all().items():
        trains = name in models.trainable()
        module.requires_grad_(trains)
        module.train(trains)
    if models.train_vae and not t.train_vae_encoder:  # decoder only (as Stability's sd-vae-ft-mse): same latents
        for frozen in (vae.encoder, vae.quant_conv):
            frozen.requires_grad_(False)
    if t.gradient_checkpointing:
        if models.unet is not None:
            models.unet.gradient_checkpointing = True
        te_grads = models.train_text_encoders or t.what == "embedding" or (
            t.what == "lora" and cfg.lora is not None and "text_encoder" in cfg.lora.targets)
        for te in models.text_encoders:
            te.gradient_checkpointing = te_grads
    if t.what == "lora":
        _add_lora(models, cfg)
    elif t.what == "embedding":
        from sumie.prompts.tokenizer import CLIPTokenizer

        models.adapters["embedding"] = TextualInversion(t.embedding_name, config, models.text_encoders,
                                                        t.num_vectors, t.init_word, CLIPTokenizer())
    return models


def _add_lora(models: TrainModels, cfg: TrainConfig) -> None:
    """Build the LoRA network (kohya's init) and wrap its layers through a ModelPatcher (applied here)."""
    from sumie.checkpoints.loader import StableDiffusionModels

    lo = cfg.lora
    assert lo is not None and models.unet is not None
    spec = LoRASpec(lo.rank, lo.alpha, lo.conv_rank, lo.conv_alpha, tuple(lo.targets))
    sd = StableDiffusionModels(config=models.config, unet=models.unet, vae=models.vae,
                               text_encoders=models.text_encoders, source=models.sources.get("init_from", ""),
                               prediction_source="training")
    network = LoRANetwork(models.config, sd.modules(), spec)
    network.train(True)
    patcher = ModelPatcher.for_models(sd)
    network.install(patcher)
    patcher.patch()
    models.adapters["lora"], models.patcher = network, patcher


def _vae_overrides(vae: VAEConfig, overrides: dict[str, object]) -> VAEConfig:
    """Only the scaling/shift factors of a loaded VAE can change."""
    bad = sorted(set(overrides) - {"scaling_factor", "shift_factor"})
    if bad:
        raise ConfigError(f"[model.vae] {', '.join(bad)}: a loaded VAE's architecture comes from the checkpoint; "
                          "only scaling_factor and shift_factor can be set")
    return replace(vae, **{k: float(v) for k, v in overrides.items()})  # type: ignore[arg-type]


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: list[torch.Tensor]) -> float:
    """1 / std of posterior samples over some image batches (LDM's rescaling, Rombach et al. 2022 sec. G)."""
    g = torch.Generator().manual_seed(0)
    zs = [vae.encode(x).sample(g).float() for x in images]
    std = torch.cat([z.flatten() for z in zs]).std().item()
    if not math.isfinite(std) or std <= 0:
        raise CheckpointError(f"the trained VAE's latents have std {std}; cannot set a scaling factor")
    return 1.0 / std
