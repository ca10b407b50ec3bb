"""Token merging for Stable Diffusion (ToMe; Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

Before self-attention of the highest-resolution transformer blocks, ``r = int(ratio * N)`` of the N image tokens are
merged into similar ones, attention runs on the N - r that remain, and every merged token then takes its
destination's output ("unmerge"). Matching is bipartite and local (the paper's sec. 3.3, "2D random"): the h x w
grid is cut into sy x sx cells, one token per cell is a destination, every other token a source; each source's most
cosine-similar destination (on the block's input tokens) is its match, and the r sources with the best matches are
averaged into their destinations. A1111 (through the ``tomesd`` package) uses one fixed destination per cell (its
top-left token), merges in self-attention only, at the full latent resolution only (``max_downsample=1``), with
sx = sy = 2; those are the defaults here. ``generator`` draws a random destination per cell instead (tomesd's
``use_rand``; as tomesd, only for even batches, which keeps a cond and its uncond on the same draw).

:class:`TokenMerging` is the UNet hook (:attr:`sumie.models.hooks.UNetOptions.token_merge`); nothing here changes a
module. SDXL has no attention at full resolution, so ``max_downsample=1`` merges nothing there (as in A1111).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sumie.models.hooks import AttnSite, UNetOptions

__all__ = ["MergeFn", "TokenMerging", "bipartite_soft_matching_2d"]

MergeFn = Callable[[Tensor], Tensor]


def _destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None,
                  device: torch.device) -> Tensor:
    """Bool mask [h * w]: one destination per full sy x sx cell (top-left, or drawn from ``generator``)."""
    hs, ws = h // sy, w // sx
    pick = (torch.zeros(hs, ws, dtype=torch.int64) if generator is None
            else torch.randint(sy * sx, (hs, ws), generator=generator, device=generator.device).cpu())
    cells = torch.zeros(hs, ws, sy * sx, dtype=torch.bool)
    cells.scatter_(2, pick[..., None], True)
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[: hs * sy, : ws * sx] = cells.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
    return grid.flatten().to(device)


def bipartite_soft_matching_2d(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int,
                               generator: torch.Generator | None = None) -> tuple[MergeFn, MergeFn]:
    """(merge, unmerge) for tokens [B, N = h * w, C] matched on ``metric`` [B, N, C] (ToMe's 2D bipartite matching).

    merge: [B, N, C'] -> [B, N - r, C'] (unmatched sources, then destinations averaged with their sources);
    unmerge: [B, N - r, C'] -> [B, N, C'] (each merged source takes its destination's value). r <= 0 changes nothing.
    """
    b, n, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    with torch.no_grad():
        is_dst = _destinations(h, w, sx, sy, generator, metric.device)
        dst_pos = is_dst.nonzero().flatten()  # [Nd] token positions
        src_pos = (~is_dst).nonzero().flatten()  # [Ns]
        r = min(r, src_pos.numel())
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_pos] @ unit[:, dst_pos].transpose(-1, -2)  # [B, Ns, Nd] cosine similarity
        best, best_dst = scores.max(dim=-1)  # [B, Ns]
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # source indices [B, r], [B, Ns - r]
        into = best_dst.gather(1, merged)  # destination index of each merged source [B, r]
    nd = dst_pos.numel()

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_pos], x[:, dst_pos]
        unm = src.gather(1, kept[..., None].expand(-1, -1, c))
        moving = src.gather(1, merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), moving, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        c = y.shape[-1]
        unm, dst = y[:, : y.shape[1] - nd], y[:, y.shape[1] - nd :]
        out = y.new_zeros(b, n, c)
        out[:, dst_pos] = dst
        src_out = y.new_zeros(b, src_pos.numel(), c)
        src_out.scatter_(1, kept[..., None].expand(-1, -1, c), unm)
        src_out.scatter_(1, merged[..., None].expand(-1, -1, c), dst.gather(1, into[..., None].expand(-1, -1, c)))
        out[:, src_pos] = src_out
        return out

    return merge, unmerge


@dataclass
class TokenMerging:
    """The ToMe hook of one sampling pass: merges ``ratio`` of the self-attention tokens where the image is at most
    ``max_downsample`` times smaller than the latent ``latent_size`` (h, w); see the module docstring."""

    ratio: float
    latent_size: tuple[int, int]
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    generator: torch.Generator | None = None

    def __call__(self, x: Tensor, site: AttnSite, options: UNetOptions) -> tuple[MergeFn, MergeFn] | None:
        """(merge, unmerge) for the self-attention at ``site`` from its block input x [B, N, C], or None."""
        h, w = site.size
        lh, lw = self.latent_size
        if math.ceil(math.sqrt((lh * lw) // (h * w))) > self.max_downsample:
            return None
        r = int(x.shape[1] * self.ratio)
        if r <= 0:
            return None
        generator = self.generator if x.shape[0] % 2 == 0 else None
        return bipartite_soft_matching_2d(x, w, h, self.sx, self.sy, r, generator)
