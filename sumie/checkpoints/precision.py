"""The dtype of each network of a checkpoint: one run dtype, with the text encoders and the VAE allowed their own.

SDXL's VAE overflows in float16 (diffusers marks it ``force_upcast``; A1111 users pass ``--no-half-vae``): unless a
VAE dtype is given, an SDXL-type model run in float16 keeps its VAE in float32. Any other half-precision VAE that
overflows is upcast when it happens (:func:`sumie.pipelines.vae_io.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sumie.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["DTYPES", "Precision", "parse_dtype"]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"``, ``"float16"``, ``torch.float16`` ... -> the torch dtype (fp32, bf16 or fp16)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"dtype {name} is not a run dtype; use fp32, bf16 or fp16")
        return name
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return DTYPES[key]


@dataclass(frozen=True)
class Precision:
    """Run dtypes: ``unet`` (and the default of the others), ``text_encoder``, ``vae`` (None = automatic)."""

    unet: torch.dtype = torch.float32
    text_encoder: torch.dtype | None = None
    vae: torch.dtype | None = None

    @classmethod
    def of(cls, dtype: torch.dtype | Precision) -> Precision:
        """A precision from a plain dtype (every network in it, VAE upcast where needed) or itself."""
        return dtype if isinstance(dtype, Precision) else cls(parse_dtype(dtype))

    def text_dtype(self) -> torch.dtype:
        """The text encoders' dtype."""
        return self.text_encoder or self.unet

    def vae_dtype(self, family: str) -> torch.dtype:
        """The VAE's dtype: as given, else float32 for an SDXL-type model run in float16, else the UNet's."""
        if self.vae is not None:
            return self.vae
        if self.unet == torch.float16 and family.startswith("sdxl"):
            return torch.float32
        return self.unet
