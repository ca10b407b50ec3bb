"""TAESD: the Tiny AutoEncoder for Stable Diffusion (madebyollin/taesd), ~1.2M parameters per side.

It shares SD's *scaled* latent space (latents ~= VAE latents * scaling_factor), so it decodes the
diffusion latents directly, e.g. for cheap previews. State-dict keys: the published Sequential
indices under ``encoder.`` / ``decoder.`` (``encoder.0.weight``, ``decoder.1.weight``, ``decoder.3.conv.0.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sumie.checkpoints.keymaps.vae import taesd_keys_to_sumie
from sumie.errors import CheckpointError, ConfigError

__all__ = ["TAESD"]

_WIDTH = 64


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1."""
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, C, h, w]."""
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)); skip is a 1x1 conv (no bias) only when widths differ."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W]."""
        return self.fuse(self.conv(x) + self.skip(x))


def _encoder(latent_channels: int) -> nn.Sequential:
    """[B, 3, H, W] in [0, 1] -> [B, latent_channels, H/8, W/8] (published layer order)."""
    w = _WIDTH
    layers: list[nn.Module] = [_conv(3, w), Block(w, w)]
    for _ in range(3):
        layers += [_conv(w, w, bias=False, stride=2), Block(w, w), Block(w, w), Block(w, w)]
    layers.append(_conv(w, latent_channels))
    return nn.Sequential(*layers)


def _decoder(latent_channels: int) -> nn.Sequential:
    """[B, latent_channels, h, w] -> [B, 3, 8h, 8w] in ~[0, 1] (published layer order, Clamp at index 0)."""
    w = _WIDTH
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, w), nn.ReLU()]
    for _ in range(3):
        layers += [
            Block(w, w),
            Block(w, w),
            Block(w, w),
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv(w, w, bias=False),
        ]
    layers += [Block(w, w), _conv(w, 3)]
    return nn.Sequential(*layers)


class TAESD(nn.Module):
    """Tiny autoencoder: images in [-1, 1] <-> SD latents *already scaled* by the VAE scaling factor."""

    def __init__(self, latent_channels: int = 4, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        if not (encoder or decoder):
            raise ConfigError("TAESD needs an encoder, a decoder or both")
        self.latent_channels = latent_channels
        self.encoder = _encoder(latent_channels) if encoder else None
        self.decoder = _decoder(latent_channels) if decoder else None

    def _first_param(self) -> Tensor:
        part = self.encoder if self.encoder is not None else self.decoder
        assert part is not None
        return next(part.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters (inputs are cast to it)."""
        return self._first_param().dtype

    def encode(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, latent_channels, H/8, W/8]."""
        if self.encoder is None:
            raise ConfigError("this TAESD was loaded without its encoder")
        return self.encoder((x.to(self.dtype) + 1) / 2)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents [B, latent_channels, h, w] -> images [B, 3, 8h, 8w], ~[-1, 1] (not clamped)."""
        if self.decoder is None:
            raise ConfigError("this TAESD was loaded without its decoder")
        return self.decoder(z.to(self.dtype)) * 2 - 1

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        part: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TAESD:
        """Build from any TAESD layout (see ``taesd_keys_to_sumie``); only the parts present are built."""
        own = taesd_keys_to_sumie(sd, part)
        has_enc = any(k.startswith("encoder.") for k in own)
        has_dec = any(k.startswith("decoder.") for k in own)
        if has_enc and "encoder.14.weight" in own:
            latent_channels = own["encoder.14.weight"].shape[0]
        elif has_dec and "decoder.1.weight" in own:
            latent_channels = own["decoder.1.weight"].shape[1]
        else:
            raise CheckpointError("TAESD state dict lacks 'encoder.14.weight' and 'decoder.1.weight'")
        with torch.device("meta"):
            model = cls(latent_channels, encoder=has_enc, decoder=has_dec)
        try:
            model.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"TAESD state dict does not fit the TAESD architecture: {e}") from e
        return model.to(device=device, dtype=dtype)

    def load_part(self, sd: Mapping[str, Tensor], part: str | None = None) -> None:
        """Load weights (any TAESD layout) into the parts present in sd; the others keep theirs."""
        own = taesd_keys_to_sumie(sd, part)
        for name in ("encoder", "decoder"):
            keys = {k[len(name) + 1 :]: v for k, v in own.items() if k.startswith(name + ".")}
            if not keys:
                continue
            module = getattr(self, name)
            if module is None:
                raise ConfigError(f"this TAESD was built without its {name}")
            try:
                module.load_state_dict(keys, strict=True, assign=True)
            except RuntimeError as e:
                raise CheckpointError(f"TAESD {name} weights do not fit: {e}") from e
