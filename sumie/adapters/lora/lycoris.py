"""LyCORIS formats (KohakuBlueleaf/LyCORIS): LoHa, LoKr, full weight differences and norm differences.

LoHa (Hyeon-Woo et al. 2022): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), each factor a Tucker product with ``hada_t1`` /
``hada_t2`` for a 3x3 conv. LoKr (Edalati et al. 2022): ΔW = w1 ⊗ w2, each factor whole (``lokr_w1``) or a product
(``lokr_w1_a @ lokr_w1_b``), w2 a Tucker product with ``lokr_t2``; alpha/rank scales it only when a factor is a
product (LyCORIS uses scale 1 otherwise). Full: ``diff`` / ``diff_b`` are ΔW and Δb; norms: ``w_norm`` / ``b_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUFFIXES: dict[str, tuple[str, str]] = {
    **{f".hada_{p}": (f"hada_{p}", "loha") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": (f"lokr_{p}", "lokr") for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
    ".diff": ("diff", "full"),
    ".diff_b": ("diff_b", "full"),
    ".w_norm": ("diff", "full"),  # a norm layer's weight difference (LyCORIS NormModule)
    ".b_norm": ("diff_b", "full"),
}


def kind_of(parts: dict[str, Tensor]) -> str | None:
    """"loha", "lokr" or "full" from the parts present, else None."""
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    return None


def missing(kind: str, parts: dict[str, Tensor]) -> list[str]:
    """Parts a complete module of ``kind`` lacks."""
    if kind == "loha":
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            need.append("hada_t2" if "hada_t1" in parts else "hada_t1")
        return [p for p in need if p not in parts]
    if kind == "lokr":
        out = []
        for w in ("lokr_w1", "lokr_w2"):
            if w not in parts and not (f"{w}_a" in parts and f"{w}_b" in parts):
                out.append(f"{w} or {w}_a/{w}_b")
        return out
    return []


def rank(kind: str, parts: dict[str, Tensor]) -> int | None:
    """The rank alpha divides by: LoHa's factor rank; LoKr's when a factor is a product (None: scale 1)."""
    if kind == "loha":
        return int(parts["hada_w1_b"].shape[0])
    if kind == "lokr":
        if "lokr_w1_b" in parts and "lokr_w1" not in parts:
            return int(parts["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in parts and "lokr_w2" not in parts:
            return int(parts["lokr_w2_b"].shape[0])
    return None


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Tucker product: core [r, r, kh, kw], a [r, out], b [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", _f32(core), _f32(a), _f32(b))


def _loha(parts: dict[str, Tensor]) -> Tensor:
    if "hada_t1" in parts:
        w1 = _tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
        w2 = _tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        return w1 * w2

    def half(a: Tensor, b: Tensor) -> Tensor:
        return _f32(a).reshape(a.shape[0], -1) @ _f32(b).reshape(b.shape[0], -1)

    return half(parts["hada_w1_a"], parts["hada_w1_b"]) * half(parts["hada_w2_a"], parts["hada_w2_b"])


def _lokr(parts: dict[str, Tensor]) -> Tensor:
    w1 = parts.get("lokr_w1")
    w1 = _f32(w1) if w1 is not None else _f32(parts["lokr_w1_a"]) @ _f32(parts["lokr_w1_b"])
    w2 = parts.get("lokr_w2")
    if w2 is not None:
        w2 = _f32(w2)
    elif "lokr_t2" in parts:
        w2 = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        b = parts["lokr_w2_b"]
        w2 = _f32(parts["lokr_w2_a"]) @ _f32(b).reshape(b.shape[0], -1)
    while w1.ndim < w2.ndim:
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def delta(kind: str, parts: dict[str, Tensor]) -> Tensor | None:
    """ΔW in fp32, unscaled (flattened where the factors are: the caller reshapes to the weight), or None."""
    if kind == "loha":
        return _loha(parts)
    if kind == "lokr":
        return _lokr(parts)
    d = parts.get("diff")
    return None if d is None else _f32(d)


def bias_delta(kind: str, parts: dict[str, Tensor]) -> Tensor | None:
    """Δb of a full module (``diff_b`` / ``b_norm``), or None."""
    b = parts.get("diff_b") if kind == "full" else None
    return None if b is None else _f32(b)
