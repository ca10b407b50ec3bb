"""Reference forwards of the upscaler architectures as their authors define them, over raw state dicts in the
published key layouts (functional: F.conv2d / F.linear / F.layer_norm; no Sumie module), and generators of the
published key names and shapes. Test oracles only.

Sources: xinntao/ESRGAN ``RRDBNet_arch.py`` and the old ``architecture.py`` (``model.N`` sequential), BasicSR
``rrdbnet_arch.py`` (``conv_first``, ``body.N.rdbK``, pixel-unshuffle for x2 / x1) and ``srvgg_arch.py``,
JingyunLiang/SwinIR ``models/network_swinir.py``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

Sd = dict[str, Tensor]


def _c(sd: Sd, name: str, x: Tensor, pad: int = 1) -> Tensor:
    return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"], padding=pad)


def _lrelu(x: Tensor, slope: float = 0.2) -> Tensor:
    return torch.where(x >= 0, x, x * slope)


# ------------------------------------------------------------------------------------------------ ESRGAN


def _rdb(sd: Sd, name: str, x: Tensor, conv_fmt: str) -> Tensor:
    """ResidualDenseBlock_5C: conv1..conv4 with LeakyReLU over growing concatenations, conv5, x + 0.2 * x5."""
    x1 = _lrelu(_c(sd, name + conv_fmt.format(1), x))
    x2 = _lrelu(_c(sd, name + conv_fmt.format(2), torch.cat((x, x1), 1)))
    x3 = _lrelu(_c(sd, name + conv_fmt.format(3), torch.cat((x, x1, x2), 1)))
    x4 = _lrelu(_c(sd, name + conv_fmt.format(4), torch.cat((x, x1, x2, x3), 1)))
    x5 = _c(sd, name + conv_fmt.format(5), torch.cat((x, x1, x2, x3, x4), 1))
    return x5 * 0.2 + x


def esrgan_old(sd: Sd, x: Tensor) -> Tensor:
    """The old ``model.N`` sequential: conv, shortcut(RRDBs + conv), [upsample, conv, lrelu] * n, conv, lrelu, conv."""
    nb = max(int(m[1]) for k in sd if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    fea = _c(sd, "model.0", x)
    t = fea
    for i in range(nb):
        r = t
        for j in (1, 2, 3):
            r = _rdb(sd, f"model.1.sub.{i}.RDB{j}", r, ".conv{}.0")
        t = r * 0.2 + t
    t = _c(sd, f"model.1.sub.{nb}", t)
    h = fea + t
    idx = sorted({int(m[1]) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    tail = [i for i in idx if i >= 2]
    for i in tail[:-2]:
        h = _lrelu(_c(sd, f"model.{i}", F.interpolate(h, scale_factor=2, mode="nearest")))
    return _c(sd, f"model.{tail[-1]}", _lrelu(_c(sd, f"model.{tail[-2]}", h)))


def esrgan_basicsr(sd: Sd, x: Tensor, scale: int) -> Tensor:
    """BasicSR RRDBNet(scale): pixel_unshuffle by 2 (scale 2) or 4 (scale 1), then the x4 network."""
    if scale == 2:
        x = F.pixel_unshuffle(x, 2)
    elif scale == 1:
        x = F.pixel_unshuffle(x, 4)
    nb = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    feat = _c(sd, "conv_first", x)
    body = feat
    for i in range(nb):
        r = body
        for j in (1, 2, 3):
            r = _rdb(sd, f"body.{i}.rdb{j}", r, ".conv{}")
        body = r * 0.2 + body
    feat = feat + _c(sd, "conv_body", body)
    feat = _lrelu(_c(sd, "conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = _lrelu(_c(sd, "conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return _c(sd, "conv_last", _lrelu(_c(sd, "conv_hr", feat)))


def esrgan_old_keys(in_nc: int, out_nc: int, nf: int, nb: int, gc: int, n_up: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the old ESRGAN layout (4x-UltraSharp, Remacri, ESRGAN_4x, 1x / 2x community models)."""
    k: dict[str, tuple[int, ...]] = {"model.0.weight": (nf, in_nc, 3, 3), "model.0.bias": (nf,)}
    for i in range(nb):
        for j in (1, 2, 3):
            for c in range(1, 6):
                cout = nf if c == 5 else gc
                k[f"model.1.sub.{i}.RDB{j}.conv{c}.0.weight"] = (cout, nf + (c - 1) * gc, 3, 3)
                k[f"model.1.sub.{i}.RDB{j}.conv{c}.0.bias"] = (cout,)
    k[f"model.1.sub.{nb}.weight"], k[f"model.1.sub.{nb}.bias"] = (nf, nf, 3, 3), (nf,)
    for u in range(n_up):
        k[f"model.{3 * (u + 1)}.weight"], k[f"model.{3 * (u + 1)}.bias"] = (nf, nf, 3, 3), (nf,)
    hr = 3 * n_up + 2
    k[f"model.{hr}.weight"], k[f"model.{hr}.bias"] = (nf, nf, 3, 3), (nf,)
    k[f"model.{hr + 2}.weight"], k[f"model.{hr + 2}.bias"] = (out_nc, nf, 3, 3), (out_nc,)
    return k


def esrgan_basicsr_keys(num_in_ch: int, nf: int, nb: int, gc: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key -> shape of BasicSR's RRDBNet (RealESRGAN_x4plus: 3 in; x2plus: 12 in; ``params_ema.`` in the .pth)."""
    k: dict[str, tuple[int, ...]] = {"conv_first.weight": (nf, num_in_ch, 3, 3), "conv_first.bias": (nf,)}
    for i in range(nb):
        for j in (1, 2, 3):
            for c in range(1, 6):
                cout = nf if c == 5 else gc
                k[f"body.{i}.rdb{j}.conv{c}.weight"] = (cout, nf + (c - 1) * gc, 3, 3)
                k[f"body.{i}.rdb{j}.conv{c}.bias"] = (cout,)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        k[f"{name}.weight"], k[f"{name}.bias"] = (nf, nf, 3, 3), (nf,)
    k["conv_last.weight"], k["conv_last.bias"] = (3, nf, 3, 3), (3,)
    return {prefix + n: s for n, s in k.items()}


# ------------------------------------------------------------------------------------------------ SRVGG


def srvgg(sd: Sd, x: Tensor, upscale: int) -> Tensor:
    """SRVGGNetCompact: body = conv, PReLU, (conv, PReLU) * num_conv, conv; pixel_shuffle + nearest base."""
    n = max(int(k.split(".")[1]) for k in sd)
    out = x
    for i in range(0, n + 1):
        w = sd[f"body.{i}.weight"]
        if w.ndim == 4:
            out = F.conv2d(out, w, sd[f"body.{i}.bias"], padding=1)
        else:
            out = F.prelu(out, w)
    return F.pixel_shuffle(out, upscale) + F.interpolate(x, scale_factor=upscale, mode="nearest")


def srvgg_keys(num_feat: int, num_conv: int, upscale: int, prefix: str = "params.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of SRVGGNetCompact (realesr-general-x4v3: 64 feat, 32 convs; animevideov3: 16 convs)."""
    k: dict[str, tuple[int, ...]] = {"body.0.weight": (num_feat, 3, 3, 3), "body.0.bias": (num_feat,),
                                     "body.1.weight": (num_feat,)}
    for i in range(num_conv):
        k[f"body.{2 * i + 2}.weight"], k[f"body.{2 * i + 2}.bias"] = (num_feat, num_feat, 3, 3), (num_feat,)
        k[f"body.{2 * i + 3}.weight"] = (num_feat,)
    last = 2 * num_conv + 2
    k[f"body.{last}.weight"], k[f"body.{last}.bias"] = (3 * upscale**2, num_feat, 3, 3), (3 * upscale**2,)
    return {prefix + n: s for n, s in k.items()}


# ------------------------------------------------------------------------------------------------ SwinIR


def _window_partition(x: Tensor, ws: int) -> Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def _window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _calculate_mask(h: int, w: int, ws: int, shift: int) -> Tensor:
    img_mask = torch.zeros((1, h, w, 1))
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    mask_windows = _window_partition(img_mask, ws).view(-1, ws * ws)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def _relative_position_index(ws: int) -> Tensor:
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def _ln(sd: Sd, name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], 1e-5)


def _lin(sd: Sd, name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _swin_block(sd: Sd, p: str, x: Tensor, size: tuple[int, int], heads: int, ws: int, shift: int) -> Tensor:
    h, w = size
    b, _, c = x.shape
    shortcut = x
    x = _ln(sd, p + ".norm1", x).view(b, h, w, c)
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    xw = _window_partition(x, ws).view(-1, ws * ws, c)
    bw, n, _ = xw.shape
    qkv = _lin(sd, p + ".attn.qkv", xw).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    table = sd[p + ".attn.relative_position_bias_table"]
    bias = table[_relative_position_index(ws).view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1).contiguous()
    attn = attn + bias.unsqueeze(0)
    if shift > 0:
        mask = _calculate_mask(h, w, ws, shift)
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    xw = _lin(sd, p + ".attn.proj", (attn @ v).transpose(1, 2).reshape(bw, n, c))
    x = _window_reverse(xw.view(-1, ws, ws, c), ws, h, w)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + x.view(b, h * w, c)
    y = _lin(sd, p + ".mlp.fc2", F.gelu(_lin(sd, p + ".mlp.fc1", _ln(sd, p + ".norm2", x))))
    return x + y


def _resi(sd: Sd, p: str, x: Tensor) -> Tensor:
    if p + ".weight" in sd:
        return _c(sd, p, x)
    y = _lrelu(_c(sd, p + ".0", x))
    y = _lrelu(_c(sd, p + ".2", y, pad=0))
    return _c(sd, p + ".4", y)


def swinir(sd: Sd, x: Tensor, *, upscale: int, window_size: int, upsampler: str, depths: list[int],
           heads: list[int]) -> Tensor:
    """SwinIR.forward: check_image_size (reflect pad), mean, conv_first, RSTBs, norm, conv_after_body, head."""
    H, W = x.shape[2:]  # noqa: N806 (the authors' names)
    ws = window_size
    x = F.pad(x, (0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws), "reflect")
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    x = x - mean
    first = _c(sd, "conv_first", x)
    size = (first.shape[2], first.shape[3])
    t = first.flatten(2).transpose(1, 2)
    if "patch_embed.norm.weight" in sd:
        t = _ln(sd, "patch_embed.norm", t)
    for i, (d, nh) in enumerate(zip(depths, heads, strict=True)):
        r = t
        for j in range(d):
            r = _swin_block(sd, f"layers.{i}.residual_group.blocks.{j}", r, size, nh, ws, 0 if j % 2 == 0 else ws // 2)
        img = r.transpose(1, 2).view(r.shape[0], -1, *size)
        t = _resi(sd, f"layers.{i}.conv", img).flatten(2).transpose(1, 2) + t
    t = _ln(sd, "norm", t)
    feat = _resi(sd, "conv_after_body", t.transpose(1, 2).view(t.shape[0], -1, *size)) + first
    if upsampler == "pixelshuffle":
        y = _lrelu(_c(sd, "conv_before_upsample.0", feat), 0.01)
        i = 0
        while f"upsample.{i}.weight" in sd:
            y = _c(sd, f"upsample.{i}", y)
            y = F.pixel_shuffle(y, int(math.isqrt(y.shape[1] // sd[f"upsample.{i}.weight"].shape[1])))
            i += 2
        out = _c(sd, "conv_last", y)
    elif upsampler == "pixelshuffledirect":
        out = F.pixel_shuffle(_c(sd, "upsample.0", feat), upscale)
    elif upsampler == "nearest+conv":
        y = _lrelu(_c(sd, "conv_before_upsample.0", feat), 0.01)
        y = _lrelu(_c(sd, "conv_up1", F.interpolate(y, scale_factor=2, mode="nearest")))
        if upscale == 4:
            y = _lrelu(_c(sd, "conv_up2", F.interpolate(y, scale_factor=2, mode="nearest")))
        out = _c(sd, "conv_last", _lrelu(_c(sd, "conv_hr", y)))
    else:
        out = x + _c(sd, "conv_last", feat)
    out = out + mean
    return out[:, :, : H * upscale, : W * upscale]


def swinir_keys(*, embed_dim: int, depths: list[int], heads: list[int], window_size: int, mlp_ratio: float,
                upscale: int, upsampler: str, resi_connection: str = "1conv", img_size: int = 64,
                num_feat: int = 64, prefix: str = "params.") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a published SwinIR checkpoint, with its stored buffers (relative_position_index, attn_mask)."""
    c, ws = embed_dim, window_size
    k: dict[str, tuple[int, ...]] = {"conv_first.weight": (c, 3, 3, 3), "conv_first.bias": (c,),
                                     "patch_embed.norm.weight": (c,), "patch_embed.norm.bias": (c,)}

    def resi(name: str) -> None:
        if resi_connection == "1conv":
            k[name + ".weight"], k[name + ".bias"] = (c, c, 3, 3), (c,)
        else:
            k[name + ".0.weight"], k[name + ".0.bias"] = (c // 4, c, 3, 3), (c // 4,)
            k[name + ".2.weight"], k[name + ".2.bias"] = (c // 4, c // 4, 1, 1), (c // 4,)
            k[name + ".4.weight"], k[name + ".4.bias"] = (c, c // 4, 3, 3), (c,)

    n = ws * ws
    hidden = int(c * mlp_ratio)
    for i, (d, nh) in enumerate(zip(depths, heads, strict=True)):
        for j in range(d):
            p = f"layers.{i}.residual_group.blocks.{j}."
            k |= {p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                  p + "attn.relative_position_bias_table": ((2 * ws - 1) ** 2, nh),
                  p + "attn.relative_position_index": (n, n), p + "attn.qkv.weight": (3 * c, c),
                  p + "attn.qkv.bias": (3 * c,), p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                  p + "norm2.weight": (c,), p + "norm2.bias": (c,), p + "mlp.fc1.weight": (hidden, c),
                  p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (c, hidden), p + "mlp.fc2.bias": (c,)}
            if j % 2:
                k[p + "attn_mask"] = ((img_size // ws) ** 2, n, n)
        resi(f"layers.{i}.conv")
    k["norm.weight"], k["norm.bias"] = (c,), (c,)
    resi("conv_after_body")
    if upsampler in ("pixelshuffle", "nearest+conv"):
        k["conv_before_upsample.0.weight"], k["conv_before_upsample.0.bias"] = (num_feat, c, 3, 3), (num_feat,)
    if upsampler == "pixelshuffle" and upscale == 3:  # one conv to 9 * num_feat, PixelShuffle(3)
        k["upsample.0.weight"], k["upsample.0.bias"] = (9 * num_feat, num_feat, 3, 3), (9 * num_feat,)
    elif upsampler == "pixelshuffle":
        for u in range(int(math.log2(upscale))):
            k[f"upsample.{2 * u}.weight"], k[f"upsample.{2 * u}.bias"] = (4 * num_feat, num_feat, 3, 3), (4 * num_feat,)
    elif upsampler == "pixelshuffledirect":
        k["upsample.0.weight"], k["upsample.0.bias"] = (3 * upscale**2, c, 3, 3), (3 * upscale**2,)
    elif upsampler == "nearest+conv":
        for name in ["conv_up1"] + (["conv_up2"] if upscale == 4 else []) + ["conv_hr"]:
            k[name + ".weight"], k[name + ".bias"] = (num_feat, num_feat, 3, 3), (num_feat,)
    last_in = num_feat if upsampler in ("pixelshuffle", "nearest+conv") else c
    if upsampler != "pixelshuffledirect":
        k["conv_last.weight"], k["conv_last.bias"] = (3, last_in, 3, 3), (3,)
    return {prefix + n_: s for n_, s in k.items()}


# ------------------------------------------------------------------------------------------------ weights


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, device: str = "cpu") -> Sd:
    """Random tensors of those shapes: fan-in scaled normals for conv / linear weights, small values otherwise;
    integer buffers (relative_position_index) as the authors compute them; attn_mask zeros. ``device="meta"``: no
    data."""
    g = torch.Generator().manual_seed(seed)
    out: Sd = {}
    for k, s in shapes.items():
        if device == "meta":
            out[k] = torch.empty(s, device="meta", dtype=torch.long if k.endswith("index") else torch.float32)
        elif k.endswith("relative_position_index"):
            out[k] = _relative_position_index(math.isqrt(s[0]))
        elif k.endswith("attn_mask"):
            out[k] = torch.zeros(s)
        elif len(s) >= 2 and not k.endswith("bias_table"):
            out[k] = torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]))
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            out[k] = 1 + 0.1 * torch.randn(s, generator=g)
        else:
            out[k] = 0.1 * torch.randn(s, generator=g) if not k.endswith("bias_table") else torch.randn(s, generator=g)
    return out
