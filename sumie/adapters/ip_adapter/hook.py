"""IP-Adapter in the UNet: image tokens as extra keys / values of every cross-attention layer (Ye et al. 2023).

``out = attn(q, k_text, v_text) + scale * attn(q, to_k_ip(tokens), to_v_ip(tokens))`` before ``to_out``, through
:attr:`sumie.models.hooks.UNetOptions.extra_kv`. As diffusers' pipelines compute it:

* plain adapters project the CLIP ``image_embeds``; their uncond tokens are the projection of a zero embedding;
* plus adapters resample the penultimate CLIP hidden states; their uncond tokens are the resampled hidden states of
  an all-zero pixel tensor (``encode_image(torch.zeros_like(image))``);
* several images of one unit are encoded as a batch and their tokens concatenated ([1, images * n, cross_dim]:
  diffusers' ``[batch, num_images, n, dim]`` reshaped in ``IPAdapterAttnProcessor2_0``); several units add their
  terms;
* cond rows (``CallInfo.rows`` > 0) see the image tokens, uncond rows the uncond tokens, both with the same scale.

The step range is ComfyUI's (``percent_to_sigma``): the unit acts while sigma lies between the training schedule's
sigma at ``t = (1 - start) * 999`` and at ``t = (1 - end) * 999`` (start 0: from the first step; end 1: to the
last), so img2img and hires passes follow the same fractions of the noise level; outside, and at weight 0, the
layer gets nothing (exactly the image without the adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from sumie.adapters.ip_adapter.files import IPAdapterModel
from sumie.adapters.ip_adapter.images import clip_preprocess
from sumie.errors import ConfigError
from sumie.models.attention import SpatialTransformer
from sumie.models.clip_vision import CLIPVisionModel
from sumie.models.hooks import AttnSite, ExtraTokens, UNetOptions
from sumie.sampling.discretization import DiscreteSigmas

__all__ = ["IPAdapterHook", "cross_attention_sites", "image_tokens", "sigma_range"]

SiteKey = tuple[tuple[str, int], int]  # (block, transformer block index)


def cross_attention_sites(unet: torch.nn.Module) -> list[tuple[SiteKey, torch.nn.Module]]:
    """The UNet's cross-attention layers in diffusers' ``attn_processors`` order: input blocks, output blocks, then
    the middle block (diffusers registers ``up_blocks`` before ``mid_block``), transformer blocks in order."""
    out: list[tuple[SiteKey, torch.nn.Module]] = []
    groups = [("input", list(unet.input_blocks)), ("output", list(unet.output_blocks)),  # type: ignore[attr-defined]
              ("middle", [unet.middle_block])]  # type: ignore[attr-defined]
    for kind, blocks in groups:
        for i, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for j, tb in enumerate(layer.transformer_blocks):
                        out.append((((kind, i), j), tb.attn2))  # type: ignore[union-attr]
    return out


def check_fits(adapter: IPAdapterModel, encoder: CLIPVisionModel | None, unet: torch.nn.Module, name: str,
               encoder_name: str = "the image encoder") -> None:
    """Clear errors before any step: image features of the encoder's width, context width and layer count of the
    UNet's."""
    spec = adapter.spec
    if encoder is not None:
        have = encoder.cfg.projection_dim if spec.kind == "plain" else encoder.cfg.width
        what = "image embedding (projection)" if spec.kind == "plain" else "hidden-state"
        if have != spec.embed_dim:
            raise ConfigError(f"IP-Adapter {name} takes {spec.embed_dim}-wide CLIP {what} features but "
                              f"{encoder_name} ({encoder.cfg.name}) gives {have}; use the image encoder the adapter "
                              "was trained with (ViT-H/14 for *_sd15 and *_vit-h, bigG/14 for ip-adapter_sdxl)")
    sites = cross_attention_sites(unet)
    context = unet.config.context_dim  # type: ignore[attr-defined]
    if spec.cross_dim != context or len(sites) != len(spec.inner):
        raise ConfigError(f"IP-Adapter {name} is for a UNet with {len(spec.inner)} cross-attention layers of context "
                          f"width {spec.cross_dim}; this model has {len(sites)} of width {context}: pick an "
                          "IP-Adapter made for this model's family (sd15 or sdxl)")
    for (key, attn), width in zip(sites, spec.inner, strict=True):
        if attn.to_k.out_features != width:  # type: ignore[union-attr]
            raise ConfigError(f"IP-Adapter {name}: layer {key} has width {attn.to_k.out_features}, the file "  # type: ignore[union-attr]
                              f"{width}; pick an IP-Adapter made for this model")


@torch.no_grad()
def image_tokens(adapter: IPAdapterModel, encoder: CLIPVisionModel, images: Sequence[Image.Image] | Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(cond, uncond) image prompt tokens, each [1, images * n, cross_dim] (see the module docstring)."""
    pixels = images if isinstance(images, Tensor) else clip_preprocess(images)
    pixels = pixels.to(device=encoder.visual_projection.weight.device, dtype=encoder.dtype)
    proj = adapter.image_proj
    if adapter.spec.kind == "plain":
        embeds = encoder(pixels).image_embeds
        cond, uncond = proj(embeds), proj(torch.zeros_like(embeds))
    else:
        cond = proj(encoder(pixels, need_embeds=False).penultimate)
        uncond = proj(encoder(torch.zeros_like(pixels), need_embeds=False).penultimate)
    return cond.reshape(1, -1, cond.shape[-1]), uncond.reshape(1, -1, uncond.shape[-1])


def sigma_range(discretization: DiscreteSigmas, start: float, end: float) -> tuple[float, float]:
    """(sigma_hi, sigma_lo): ComfyUI's ``percent_to_sigma`` of start and end (start <= 0: inf; end >= 1: 0)."""
    def at(p: float) -> float:
        if p <= 0.0:
            return float("inf")
        if p >= 1.0:
            return 0.0
        n = discretization.sigmas.shape[0] - 1
        return float(discretization.t_to_sigma(torch.tensor((1.0 - p) * n, dtype=torch.float64)))

    return at(start), at(end)


@dataclass
class IPAdapterHook:
    """One unit's :data:`~sumie.models.hooks.ExtraKV`: per-layer keys / values of cond and uncond tokens, a weight
    and a sigma range (see the module docstring). Call :meth:`for_unet` to build it."""

    k: dict[SiteKey, tuple[Tensor, Tensor]]  # site -> (cond k, uncond k), each [1, L, inner]
    v: dict[SiteKey, tuple[Tensor, Tensor]]
    weight: float
    sigma_hi: float = float("inf")
    sigma_lo: float = 0.0

    @classmethod
    @torch.no_grad()
    def for_unet(cls, adapter: IPAdapterModel, unet: torch.nn.Module, cond: Tensor, uncond: Tensor, weight: float,
                 sigma_hi: float = float("inf"), sigma_lo: float = 0.0) -> IPAdapterHook:
        """Project the tokens [1, L, cross_dim] through every layer's ``to_k_ip`` / ``to_v_ip`` once."""
        ks: dict[SiteKey, tuple[Tensor, Tensor]] = {}
        vs: dict[SiteKey, tuple[Tensor, Tensor]] = {}
        param = next(unet.parameters())
        for (key, _), pair in zip(cross_attention_sites(unet), adapter.layers, strict=True):
            c, u = cond.to(pair.to_k_ip.weight), uncond.to(pair.to_k_ip.weight)
            ks[key] = (pair.to_k_ip(c).to(param), pair.to_k_ip(u).to(param))
            vs[key] = (pair.to_v_ip(c).to(param), pair.to_v_ip(u).to(param))
        return cls(ks, vs, float(weight), sigma_hi, sigma_lo)

    def active(self, options: UNetOptions) -> bool:
        """Whether this call's sigma is inside the unit's range (no call info: always)."""
        call = options.call
        if call is None:
            return True
        s = float(call.sigma.max())
        return self.sigma_lo <= s <= self.sigma_hi

    def __call__(self, site: AttnSite, options: UNetOptions) -> ExtraTokens | None:
        """Extra tokens for the layer at ``site``: [B, L, inner] (cond / uncond per row), or None."""
        key = (site.block, site.index)
        if self.weight == 0.0 or key not in self.k or not self.active(options):
            return None
        (kc, ku), (vc, vu) = self.k[key], self.v[key]
        call = options.call
        if call is None:
            return ExtraTokens(kc, vc, self.weight)
        uncond = call.uncond.to(kc.device).view(-1, 1, 1)
        if not bool(uncond.any()):
            return ExtraTokens(kc, vc, self.weight)
        return ExtraTokens(torch.where(uncond, ku, kc), torch.where(uncond, vu, vc), self.weight)

