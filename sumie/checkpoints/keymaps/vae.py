"""VAE key maps: diffusers ``AutoencoderKL`` <-> LDM ``first_stage_model`` (prefix stripped), TAESD layouts.

Sumie's AutoencoderKL uses the LDM layout; Sumie's TAESD uses the published Sequential-index layout
of madebyollin/taesd under ``encoder.`` / ``decoder.`` prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from sumie.configs import VAEConfig
from sumie.errors import CheckpointError

__all__ = [
    "diffusers_to_ldm_vae",
    "ldm_to_diffusers_vae",
    "vae_attention_to_conv",
    "infer_vae_config",
    "taesd_keys_to_sumie",
]

_P = r"(weight|bias)"
_RESNET_D2L = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_RESNET_L2D = {v: k for k, v in _RESNET_D2L.items()}
# Old diffusers (< 0.14) AttentionBlock names map onto the same LDM names as the current Attention names.
_ATTN_D2L = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_ATTN_L2D = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PROJ_LDM = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str | None]]


def _lookup(table: dict[str, str], name: str) -> str | None:
    return table.get(name)


def _apply(sd: Mapping[str, Tensor], rules: list[Rule], what: str) -> dict[str, str]:
    """Old key -> new key for every key of sd; CheckpointError listing the keys no rule maps."""
    out: dict[str, str] = {}
    bad: list[str] = []
    for key in sd:
        new = None
        for pat, fn in rules:
            m = pat.match(key)
            if m is not None:
                new = fn(m)
                break
        if new is None:
            bad.append(key)
        else:
            out[key] = new
    if bad:
        shown = ", ".join(bad[:8]) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
        raise CheckpointError(f"cannot map {len(bad)} {what} VAE key(s): {shown}")
    if len(set(out.values())) != len(out):
        raise CheckpointError(f"{what} VAE state dict maps two keys onto one (mixed old and new names?)")
    return out


def _max_index(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) if found else -1


def diffusers_to_ldm_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM ``first_stage_model`` keys (prefix stripped)."""
    n_up = _max_index(sd, r"^decoder\.up_blocks\.(\d+)\.") + 1

    def up(i: str) -> int:
        return n_up - 1 - int(i)

    rules: list[Rule] = [
        (re.compile(rf"^(encoder|decoder)\.(conv_in|conv_out)\.{_P}$"), lambda m: m.group(0)),
        (re.compile(rf"^(quant_conv|post_quant_conv)\.{_P}$"), lambda m: m.group(0)),
        (re.compile(rf"^(encoder|decoder)\.conv_norm_out\.{_P}$"), lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (
            re.compile(rf"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_D2L, m[3])) and f"encoder.down.{m[1]}.block.{m[2]}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}$"),
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            re.compile(rf"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_D2L, m[3])) and f"decoder.up.{up(m[1])}.block.{m[2]}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}$"),
            lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}",
        ),
        (
            re.compile(rf"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_D2L, m[3])) and f"{m[1]}.mid.block_{int(m[2]) + 1}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.([\w.]+?)\.{_P}$"),
            lambda m: (r := _lookup(_ATTN_D2L, m[2])) and f"{m[1]}.mid.attn_1.{r}.{m[3]}",
        ),
    ]
    names = _apply(sd, rules, "diffusers")
    return vae_attention_to_conv({names[k]: v for k, v in sd.items()})


def ldm_to_diffusers_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM ``first_stage_model`` keys (prefix stripped) -> diffusers ``AutoencoderKL`` state dict."""
    n_up = _max_index(sd, r"^decoder\.up\.(\d+)\.") + 1

    def up(i: str) -> int:
        return n_up - 1 - int(i)

    rules: list[Rule] = [
        (re.compile(rf"^(encoder|decoder)\.(conv_in|conv_out)\.{_P}$"), lambda m: m.group(0)),
        (re.compile(rf"^(quant_conv|post_quant_conv)\.{_P}$"), lambda m: m.group(0)),
        (re.compile(rf"^(encoder|decoder)\.norm_out\.{_P}$"), lambda m: f"{m[1]}.conv_norm_out.{m[2]}"),
        (
            re.compile(rf"^encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_L2D, m[3])) and f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^encoder\.down\.(\d+)\.downsample\.conv\.{_P}$"),
            lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
        ),
        (
            re.compile(rf"^decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_L2D, m[3])) and f"decoder.up_blocks.{up(m[1])}.resnets.{m[2]}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^decoder\.up\.(\d+)\.upsample\.conv\.{_P}$"),
            lambda m: f"decoder.up_blocks.{up(m[1])}.upsamplers.0.conv.{m[2]}",
        ),
        (
            re.compile(rf"^(encoder|decoder)\.mid\.block_([12])\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_RESNET_L2D, m[3])) and f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{r}.{m[4]}",
        ),
        (
            re.compile(rf"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.{_P}$"),
            lambda m: (r := _lookup(_ATTN_L2D, m[2])) and f"{m[1]}.mid_block.attentions.0.{r}.{m[3]}",
        ),
    ]
    names = _apply(sd, rules, "LDM")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if _ATTN_PROJ_LDM.match(k) and v.ndim > 2:
            v = v.reshape(v.shape[0], v.shape[1])  # 1x1 conv -> Linear
        out[names[k]] = v
    return out


def vae_attention_to_conv(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM-layout dict whose ``mid.attn_1.{q,k,v,proj_out}.weight`` may be Linear [C, C]: make them [C, C, 1, 1]."""
    out = dict(sd)
    for k, v in sd.items():
        if _ATTN_PROJ_LDM.match(k) and v.ndim != 4:
            if v.ndim not in (2, 3) or v.shape[2:].numel() != 1:
                raise CheckpointError(f"VAE attention weight {k} has unexpected shape {tuple(v.shape)}")
            out[k] = v.reshape(v.shape[0], v.shape[1], 1, 1)
    return out


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"VAE state dict lacks {key!r} (expected LDM layout without 'first_stage_model.')")
    return tuple(sd[key].shape)


def infer_vae_config(sd: Mapping[str, Tensor]) -> VAEConfig:
    """VAEConfig from the shapes of an LDM-layout VAE state dict; scaling/shift factors and groups stay default."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
    n_levels = _max_index(sd, r"^encoder\.down\.(\d+)\.") + 1
    if n_levels <= 0:
        raise CheckpointError("VAE state dict has no 'encoder.down.N' blocks (not an LDM-layout VAE)")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels))
    num_res_blocks = _max_index(sd, r"^encoder\.down\.0\.block\.(\d+)\.") + 1
    z_channels = _shape(sd, "decoder.conv_in.weight")[1]
    embed_dim = _shape(sd, "post_quant_conv.weight")[1]
    out_channels = _shape(sd, "decoder.conv_out.weight")[0]
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
    )


# --------------------------------------------------------------------------------------------------- TAESD

# Inside one part (Sequential index N): conv weight/bias, or a Block's conv.{0,2,4} / skip.
_TAESD_INNER = re.compile(r"^(\d+)\.((?:conv\.[024]\.)?(?:weight|bias)|skip\.weight)$")
_TAESD_PARTS = ("encoder", "decoder")


def _taesd_inner(key: str, part: str, offset: int) -> str | None:
    m = _TAESD_INNER.match(key)
    return None if m is None else f"{part}.{int(m[1]) + offset}.{m[2]}"


def taesd_keys_to_sumie(sd: Mapping[str, Tensor], part: str | None = None) -> dict[str, Tensor]:
    """Any TAESD layout -> Sumie's (``encoder.N...`` / ``decoder.N...``, published Sequential indices).

    part='encoder'/'decoder': sd is one published file (``0.weight``, ``1.conv.0.weight``...) or one diffusers
    sub-module (``layers.N...``). part=None: sd holds prefixed keys (diffusers ``AutoencoderTiny``
    ``encoder.layers.N``/``decoder.layers.N``, ComfyUI ``taesd_encoder.N``/``taesd_decoder.N``, or Sumie's
    own), or one bare published part, recognised by its first conv (the decoder's index 0 is its Clamp).
    """
    if part is not None and part not in _TAESD_PARTS:
        raise CheckpointError(f"TAESD part must be 'encoder', 'decoder' or None, not {part!r}")
    keys = list(sd)
    if part is None and keys and all(k[:1].isdigit() for k in keys):
        part = "encoder" if "0.weight" in sd else "decoder"
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        new: str | None = None
        if part is not None:
            if key.startswith("layers."):  # diffusers EncoderTiny/DecoderTiny alone: decoder lacks the Clamp
                new = _taesd_inner(key[len("layers.") :], part, 1 if part == "decoder" else 0)
            else:
                new = _taesd_inner(key, part, 0)
        elif key in ("vae_scale", "vae_shift"):  # ComfyUI's combined file: its own latent scaling scalars
            continue
        else:
            head, _, rest = key.partition(".")
            if head in _TAESD_PARTS and rest.startswith("layers."):  # diffusers AutoencoderTiny
                new = _taesd_inner(rest[len("layers.") :], head, 1 if head == "decoder" else 0)
            elif head in ("taesd_encoder", "taesd_decoder"):  # ComfyUI
                new = _taesd_inner(rest, head[len("taesd_") :], 0)
            elif head in _TAESD_PARTS:  # Sumie's own
                new = _taesd_inner(rest, head, 0)
        if new is None:
            bad.append(key)
        else:
            out[new] = value
    if bad:
        shown = ", ".join(bad[:8]) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
        raise CheckpointError(f"cannot map {len(bad)} TAESD key(s): {shown}")
    if not out:
        raise CheckpointError("TAESD state dict is empty")
    return out
