"""CLIP text transformer (Radford et al. 2021) as used by every Stable Diffusion text encoder.

One class covers OpenAI CLIP ViT-L/14 (quick_gelu), OpenCLIP ViT-H/14 and bigG/14 (gelu, text projection);
the differences are data in :class:`sumie.configs.TextEncoderConfig`. State-dict keys follow the Hugging Face
transformers layout (``text_model.*`` plus ``text_projection.weight``), which is what SD1/SDXL single-file
checkpoints and diffusers folders store; OpenCLIP-layout weights go through
:func:`sumie.checkpoints.keymaps.clip.openclip_to_hf` first.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sumie.configs import TextEncoderConfig
from sumie.errors import ConfigError

LAYER_NORM_EPS = 1e-5  # OpenAI CLIP, OpenCLIP and transformers all use the nn.LayerNorm default
ACTIVATIONS = ("quick_gelu", "gelu")


def _activation(x: Tensor, kind: str) -> Tensor:
    """quick_gelu (x * sigmoid(1.702 x), OpenAI CLIP) or exact erf GELU (OpenCLIP)."""
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if kind == "gelu":
        return F.gelu(x)
    raise ConfigError(f"unknown text encoder activation {kind!r}; use one of {ACTIVATIONS}")


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections: [B, T, C] -> [B, T, C] (causal for text)."""

    def __init__(self, width: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        if width % heads != 0:
            raise ConfigError(f"CLIP width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> [B, T, C]; causal: each token attends to itself and earlier tokens only."""
        b, t, c = x.shape
        shape = (b, t, self.heads, c // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class CLIPMLP(nn.Module):
    """Two-layer feed-forward block: [B, T, C] -> [B, T, C]."""

    def __init__(self, width: int, intermediate: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown text encoder activation {activation!r}; use one of {ACTIVATIONS}")
        self.activation = activation
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> [B, T, C]."""
        return self.fc2(_activation(self.fc1(x), self.activation))


class TowerConfig(Protocol):
    """What the shared transformer layers read from a text or an image tower config."""

    @property
    def width(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def intermediate(self) -> int: ...
    @property
    def activation(self) -> str: ...


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then + mlp(ln2(x)); [B, T, C] -> [B, T, C]."""

    def __init__(self, cfg: TowerConfig, causal: bool = True) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg.width, cfg.intermediate, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> [B, T, C]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings: [B, T] ids -> [B, T, C]."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: Tensor, token_embeds: Tensor | None = None) -> Tensor:
        """tokens: [B, T] (T <= max_positions) -> [B, T, C]; ``token_embeds`` [B, T, C] replaces the lookup."""
        t = tokens.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ConfigError(
                f"prompt has {t} tokens but the text encoder takes at most "
                f"{self.position_embedding.num_embeddings}; split it into chunks first"
            )
        x = self.token_embedding(tokens) if token_embeds is None else token_embeds
        return x + self.position_embedding.weight[:t]


class CLIPEncoder(nn.Module):
    """The stack of transformer layers (holds ``layers.N``); causal for text, bidirectional for images."""

    def __init__(self, cfg: TowerConfig, causal: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder layers and final LayerNorm (the ``text_model.*`` keys)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)


class CLIPTextModel(nn.Module):
    """CLIP text encoder: ids [B, 77] -> (hidden [B, 77, width], pooled [B, projection_dim or width])."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )
        self.gradient_checkpointing = False  # training: recompute each layer in the backward pass (torch checkpoint)

    def _layer(self, block: nn.Module, x: Tensor) -> Tensor:
        """One encoder layer, under gradient checkpointing when it is on and autograd records."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _layer_index(self, layer: int) -> int:
        """Python-style index into the per-layer outputs (-1 = last layer) -> index in [0, layers)."""
        n = len(self.text_model.encoder.layers)
        if not -n <= layer < n:
            raise ConfigError(
                f"text encoder {self.cfg.name!r} has {n} layers; layer must be in [-{n}, {n - 1}]: {layer}"
            )
        return layer % n

    def forward(
        self,
        tokens: Tensor,
        layer: int | None = None,
        final_norm: bool | None = None,
        need_pooled: bool = True,
        token_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """tokens [B, T] -> (hidden [B, T, width], pooled [B, projection_dim or width] or None).

        ``hidden`` is the output of transformer layer ``layer`` (-1 last, -2 penultimate = "clip skip 2";
        None -> ``cfg.layer``), passed through ``final_layer_norm`` when ``final_norm`` (None ->
        ``cfg.final_norm``). ``pooled`` is always the final-normed last-layer state at the EOS token (the
        largest id, as OpenAI and OpenCLIP pool), then ``text_projection`` when present. With
        ``need_pooled=False`` the layers after ``layer`` are skipped and ``pooled`` is None. ``token_embeds``
        [B, T, width] replaces the token lookup (textual-inversion vectors); ``tokens`` still locate the EOS.
        """
        stop = self._layer_index(self.cfg.layer if layer is None else layer)
        norm = self.cfg.final_norm if final_norm is None else final_norm
        tm = self.text_model
        layers = tm.encoder.layers

        x = tm.embeddings(tokens, token_embeds)
        for block in layers[: stop + 1]:
            x = self._layer(block, x)
        hidden = tm.final_layer_norm(x) if norm else x
        if not need_pooled:
            return hidden, None

        for block in layers[stop + 1 :]:
            x = self._layer(block, x)
        eos = tokens.argmax(dim=-1)  # first occurrence of the largest id: EOS for both pad=EOS and pad=0
        pooled = tm.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled
