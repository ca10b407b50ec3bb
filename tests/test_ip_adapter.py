"""IP-Adapter (Ye et al. 2023) against diffusers' ``load_ip_adapter`` and transformers' CLIP image tower.

Oracles: transformers ``CLIPVisionModelWithProjection`` (hidden states, image_embeds) and ``CLIPImageProcessor``
(its PIL backend: what it falls back to without torchvision, and what diffusers' pipelines build); diffusers 0.42
``StableDiffusionPipeline.load_ip_adapter`` reading random-weight IP-Adapter files (released key names and layout,
written to tmp_path) with a random ``image_encoder`` folder, offline: ``encode_image`` + ``encoder_hid_proj`` for the
image tokens, the UNet with ``IPAdapterAttnProcessor2_0`` for the noise prediction, and the whole pipeline with
``ip_adapter_image`` for images (test_pipeline_parity's tiny SD1 model, scheduler and comparison: mean |diff| < 1/255
and < 0.05 levels). Real key names and shapes of the six released files are checked on the meta device against
Sumie's full-size SD1.5 / SDXL UNets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_pipeline_parity as pp
import torch
import transformers
from ip_adapter_testfiles import (
    REAL,
    SD15_INNER,
    SDXL_INNER,
    TINY_VISION,
    adapter_state_dict,
    real_keys,
    vision_model,
    write_adapter,
    write_encoder,
)
from PIL import Image
from test_pipeline_parity import sd1, sdxl, tokenizers  # noqa: F401 - the fixtures

from sumie.adapters.ip_adapter.files import (
    IPAdapterModel,
    IPAdapterSpec,
    load_image_encoder,
    load_ip_adapter,
    spec_from_state_dict,
)
from sumie.adapters.ip_adapter.hook import IPAdapterHook, check_fits, cross_attention_sites, image_tokens, sigma_range
from sumie.adapters.ip_adapter.images import clip_preprocess
from sumie.cli.main import main
from sumie.configs import SD1, SDXL
from sumie.errors import CheckpointError, ConfigError
from sumie.models.clip_vision import (
    CLIP_VISION_BIGG,
    CLIP_VISION_H,
    CLIPVisionConfig,
    CLIPVisionModel,
    config_from_state_dict,
)
from sumie.models.hooks import CallInfo, UNetOptions
from sumie.models.unet import UNetModel
from sumie.pipelines.params import HiresParams, IPAdapterUnit

TINY_CFG = CLIPVisionConfig("tiny", TINY_VISION["hidden_size"], TINY_VISION["num_hidden_layers"],
                            TINY_VISION["num_attention_heads"], TINY_VISION["intermediate_size"], "gelu", 14, 224,
                            TINY_VISION["projection_dim"])
CROSS = 64  # the tiny SD1 model's context width
INNER = (32, 64, 64, 64, 32, 32, 64)  # its cross-attention widths in diffusers' processor order (down, up, mid)
PLAIN = IPAdapterSpec("plain", TINY_VISION["projection_dim"], CROSS, 4, INNER)
PLUS = IPAdapterSpec("plus", TINY_VISION["hidden_size"], CROSS, 16, INNER, (48, 4, 2, 4))  # diffusers assumes depth 4


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A non-square RGB image with structure (gradients and noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 7 + y / 11)], -1)
    arr = arr + rng.normal(0, 25, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _tiny_encoder() -> tuple[transformers.CLIPVisionModelWithProjection, CLIPVisionModel]:
    ref = vision_model(seed=3)
    return ref, CLIPVisionModel.from_state_dict(ref.state_dict(), cfg=TINY_CFG)


# ------------------------------------------------------------------------------------------------ CLIP image tower


def test_vision_tower_matches_transformers() -> None:
    ref, ours = _tiny_encoder()
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixels, output_hidden_states=True)
        got = ours(pixels)
    torch.testing.assert_close(got.penultimate, want.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=1e-5, rtol=1e-5)
    assert (got.penultimate - want.hidden_states[-1]).abs().max() > 1e-2  # the last layer is not the penultimate
    fast = ours(pixels, need_embeds=False)
    assert torch.equal(fast.penultimate, got.penultimate) and fast.image_embeds.shape == (3, 0)


def _to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers layout -> OpenCLIP ``visual.*`` (test-side inverse: q/k/v fused, projection transposed)."""
    out: dict[str, torch.Tensor] = {"text_projection": torch.zeros(2, 2)}  # a text key: ignored
    ren = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
           "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
           "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
           "post_layernorm.bias": "ln_post.bias"}
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        rest = k.removeprefix("vision_model.")
        if rest in ren:
            out["visual." + ren[rest]] = v
        elif rest.startswith("encoder.layers."):
            i, name = rest.removeprefix("encoder.layers.").split(".", 1)
            mod, param = name.rsplit(".", 1)
            if mod.startswith("self_attn.") and mod[-6:] in ("q_proj", "k_proj", "v_proj"):
                if mod.endswith("q_proj"):
                    parts = [sd[f"vision_model.encoder.layers.{i}.self_attn.{c}_proj.{param}"] for c in "qkv"]
                    out[f"visual.transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts)
            else:
                out[f"visual.transformer.resblocks.{i}.{layer[mod]}.{param}"] = v
    return out


def test_vision_tower_layouts_load_the_same(tmp_path: Path) -> None:
    """transformers / ComfyUI clip_vision (prefixes), OpenCLIP visual.* and an image_encoder folder: one model."""
    ref, ours = _tiny_encoder()
    sd = {k: v for k, v in ref.state_dict().items()}
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    want = ours(pixels)
    for variant in (_to_openclip(sd), {"clip_vision_model." + k: v for k, v in sd.items()}):
        other = CLIPVisionModel.from_state_dict(variant, cfg=TINY_CFG)
        got = other(pixels)
        assert torch.equal(got.image_embeds, want.image_embeds) and torch.equal(got.penultimate, want.penultimate)
    ref.save_pretrained(tmp_path / "image_encoder")  # a diffusers image_encoder folder: config.json gives the heads
    got = load_image_encoder(tmp_path / "image_encoder")(pixels)
    assert got.penultimate.shape == want.penultimate.shape
    torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="width 32 is not one of the known towers"):
        load_image_encoder(tmp_path / "image_encoder" / "model.safetensors")  # a lone file: heads unknown
    with pytest.raises(CheckpointError, match="not a CLIP image encoder"):
        CLIPVisionModel.from_state_dict({"foo.weight": torch.zeros(1)})


@pytest.mark.parametrize("cfg", [CLIP_VISION_H, CLIP_VISION_BIGG], ids=["vit-h", "bigg"])
def test_real_towers_keys_and_config_from_shapes(cfg: CLIPVisionConfig) -> None:
    """ViT-H/14 and bigG/14 at full size on the meta device: transformers' keys and shapes, config from shapes."""
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.intermediate,
                                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, patch_size=14,
                                           image_size=224, projection_dim=cfg.projection_dim, hidden_act="gelu")
    with torch.device("meta"):
        ref = transformers.CLIPVisionModelWithProjection(hf_cfg)
        ours = CLIPVisionModel(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert config_from_state_dict(ref.state_dict()) == cfg


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size,mode", [((300, 400), "RGB"), ((517, 230), "RGB"), ((150, 100), "RGB"),
                                       ((224, 224), "RGB"), ((333, 257), "RGBA"), ((260, 300), "L")])
def test_preprocessing_matches_clip_image_processor(size: tuple[int, int], mode: str) -> None:
    """Sumie's CLIP preprocessing is CLIPImageProcessor's, bit for bit (non-square, upscaled, RGBA over white, L)."""
    im = picture(*size, seed=size[0])
    if mode == "RGBA":
        alpha = Image.fromarray((np.arange(size[0] * size[1]) % 256).reshape(size[1], size[0]).astype(np.uint8))
        im = im.convert("RGBA")
        im.putalpha(alpha)
    elif mode == "L":
        im = im.convert("L")
    want = transformers.CLIPImageProcessor()(im, return_tensors="pt").pixel_values
    got = clip_preprocess([im])
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("name", list(REAL))
def test_released_files_key_names_and_shapes_load_with_nothing_missing(name: str) -> None:
    """Each released file's keys (names and shapes, meta tensors) -> the right kind and sizes, every key used, and
    the adapter fits the full-size UNet of its family (with the matching encoder) and not the other."""
    spec = REAL[name]
    sd = {k: torch.empty(s, device="meta") for k, s in real_keys(spec).items()}
    assert spec_from_state_dict(sd, name) == spec
    with torch.device("meta"):
        model = IPAdapterModel(spec)
    model.load_state_dict(sd, strict=True, assign=True)
    xl = "sdxl" in name
    with torch.device("meta"):
        unet = UNetModel((SDXL if xl else SD1).unet)
        other = UNetModel((SD1 if xl else SDXL).unet)
        encoder = CLIPVisionModel(CLIP_VISION_BIGG if name == "ip-adapter_sdxl" else CLIP_VISION_H)
        wrong = CLIPVisionModel(CLIP_VISION_H if name == "ip-adapter_sdxl" else CLIP_VISION_BIGG)
    widths = tuple(attn.to_k.out_features for _, attn in cross_attention_sites(unet))
    assert widths == (SDXL_INNER if xl else SD15_INNER)
    check_fits(model, encoder, unet, name)
    with pytest.raises(ConfigError, match="pick an IP-Adapter made for this model's family"):
        check_fits(model, encoder, other, name)
    with pytest.raises(ConfigError, match="use the image encoder the adapter was trained with"):
        check_fits(model, wrong, unet, name)


def test_bin_and_safetensors_read_the_same(tmp_path: Path) -> None:
    sd = adapter_state_dict(PLUS, seed=4)
    a = load_ip_adapter(write_adapter(tmp_path / "a.bin", sd))
    b = load_ip_adapter(write_adapter(tmp_path / "b.safetensors", sd))
    assert a.spec == b.spec == PLUS
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {"image_proj." + k for k in a.image_proj.state_dict()} | {f"ip_adapter.{k}" for k in
                                                                       a.ip_adapter.state_dict()} == set(sd)


def test_bad_adapter_files_fail_clearly(tmp_path: Path) -> None:
    sd = adapter_state_dict(PLAIN)
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        spec_from_state_dict({k: v for k, v in sd.items() if k.startswith("image_proj.")})
    gap = {k: v for k, v in sd.items() if not k.startswith("ip_adapter.3.")}
    with pytest.raises(CheckpointError, match="N = 1, 3, 5"):
        spec_from_state_dict(gap)
    face = {k: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    face.update({"image_proj.proj.0.weight": torch.zeros(2, 2), "image_proj.proj.3.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="full-face / FaceID"):
        spec_from_state_dict(face)
    with pytest.raises(CheckpointError, match="no such file"):
        load_ip_adapter(tmp_path / "missing.bin")


# ------------------------------------------------------------------------------------------------ diffusers parity


@dataclasses.dataclass
class Loaded:
    pipe: Any
    adapter: IPAdapterModel
    encoder: CLIPVisionModel
    path: Path
    encoder_path: Path


def _load_both(m: pp.Models, toks: dict[str, Any], root: Path, spec: IPAdapterSpec, suffix: str,
               seed: int, pipeline: str = "StableDiffusionPipeline", spacing: str = "linspace") -> Loaded:
    """The random adapter file and image_encoder folder, read by diffusers' load_ip_adapter and by Sumie."""
    path = write_adapter(root / "models" / f"ip-adapter{suffix}", adapter_state_dict(spec, seed=seed, scale=3.0))
    write_encoder(root / "models" / "image_encoder", seed=seed + 1)
    pipe = pp.pipeline(pipeline, m, pp.SCHEDS["euler"].make(spacing), toks)
    pipe.load_ip_adapter(str(root), subfolder="models", weight_name=path.name, local_files_only=True)
    encoder = CLIPVisionModel.from_state_dict(pipe.image_encoder.state_dict(), cfg=TINY_CFG)
    return Loaded(pipe, load_ip_adapter(path), encoder, path, root / "models" / "image_encoder")


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_image_tokens_and_unet_match_diffusers(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                               tmp_path: Path, kind: str) -> None:
    """Image tokens (``encode_image`` + ``encoder_hid_proj``, cond and uncond, two images) and the UNet's noise
    prediction with the adapter (IPAdapterAttnProcessor2_0 vs Sumie's extra_kv hook) agree with diffusers."""
    spec, suffix = (PLAIN, ".bin") if kind == "plain" else (PLUS, ".safetensors")
    both = _load_both(sd1, tokenizers, tmp_path, spec, suffix, seed=7)
    pipe, unet_ref = both.pipe, both.pipe.unet
    images = [picture(300, 200, 1), picture(180, 260, 2)]
    embeds, neg = pipe.encode_image(images, "cpu", 1, output_hidden_states=kind == "plus")
    with torch.no_grad():
        proj = unet_ref.encoder_hid_proj([torch.cat([neg[None], embeds[None]])])[0]  # [2, images, n, cross]
    cond, uncond = image_tokens(both.adapter, both.encoder, images)
    n = spec.tokens
    assert cond.shape == uncond.shape == (1, 2 * n, CROSS)
    torch.testing.assert_close(cond, proj[1].reshape(1, 2 * n, CROSS), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(uncond, proj[0].reshape(1, 2 * n, CROSS), atol=2e-5, rtol=1e-4)
    assert (cond - uncond).abs().mean() > 0.1

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, CROSS, generator=gen)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        want = unet_ref(x, t, ctx, added_cond_kwargs={"image_embeds": [torch.cat([neg[None], embeds[None]])]}).sample
        unet = sd1.engine.models.unet
        hook = IPAdapterHook.for_unet(both.adapter, unet, cond, uncond, 1.0)
        call = CallInfo(0, torch.ones(2), torch.tensor([0, 1]))
        got = unet(x, t, ctx, options=UNetOptions(extra_kv=[hook], call=call))
        plain = unet(x, t, ctx)
    print(f"{kind}: tokens max |diff| {(cond - proj[1].reshape(cond.shape)).abs().max():.1e}, UNet max |diff| "
          f"{(got - want).abs().max():.1e} (output std {want.std():.2f})")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().mean() > 100 * 1e-4  # the adapter moved the prediction far beyond the tolerance


GEN_IMAGES = {"plain": [(256, 192, 11)], "plus": [(200, 320, 12), (240, 240, 13)]}


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_generation_matches_diffusers_pipeline(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                               tmp_path: Path, kind: str) -> None:
    """``Engine.generate`` with an IP-Adapter unit vs ``StableDiffusionPipeline(ip_adapter_image=...)``: same images
    (test_pipeline_parity's tolerance); weight 0 gives exactly the plain image; the adapter changes it."""
    spec, suffix = (PLAIN, ".bin") if kind == "plain" else (PLUS, ".safetensors")
    both = _load_both(sd1, tokenizers, tmp_path, spec, suffix, seed=21)
    images = [picture(*s) for s in GEN_IMAGES[kind]]
    s = pp.SCHEDS["euler"]
    sigmas = s.sigmas_fn(sd1.engine, "linspace")
    unit = IPAdapterUnit(str(both.path), images, encoder=str(both.encoder_path))
    res = sd1.engine.generate(pp.params(sampler=s.sampler, ip_adapters=[unit]), sigmas_fn=sigmas)
    zero = sd1.engine.generate(pp.params(sampler=s.sampler, ip_adapters=[dataclasses.replace(unit, weight=0.0)]),
                               sigmas_fn=sigmas)
    ours, plain = pp.u8(res.images), pp.u8(sd1.engine.generate(pp.params(sampler=s.sampler), sigmas_fn=sigmas).images)
    n = len(pp.SEEDS)
    ref = both.pipe([pp.PROMPT] * n, negative_prompt=[pp.NEGATIVE] * n, num_inference_steps=4, guidance_scale=7.0,
                    height=64, width=64, output_type="np", latents=pp.start_noise((4, 8, 8), pp.SEEDS),
                    ip_adapter_image=[images]).images
    pp.check(ours, pp.ref_u8(ref), f"IP-Adapter {kind} txt2img (Sumie vs diffusers load_ip_adapter)")
    assert pp.mad(ours, plain) > 20 * pp.STRICT  # the adapter changed the image far beyond the tolerance
    assert np.array_equal(pp.u8(zero.images), plain)  # weight 0: exactly the image without it
    assert "IP-Adapter 0: \"Model: ip-adapter" in res.infotexts[0] and "Weight: 1" in res.infotexts[0]


def _sdxl_spec(m: pp.Models) -> IPAdapterSpec:
    """A plain adapter for the tiny SDXL UNet (depth-2 transformers: two sites per block, in order)."""
    widths = tuple(attn.to_k.out_features for _, attn in cross_attention_sites(m.engine.models.unet))
    assert len(widths) == 8 and len(set(widths)) == 1  # one width: only the numbers can tell a wrong order
    return IPAdapterSpec("plain", TINY_VISION["projection_dim"], 128, 4, widths)


def test_sdxl_generation_matches_diffusers_pipeline(sdxl: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                                    tmp_path: Path) -> None:
    """SDXL (``StableDiffusionXLPipeline.load_ip_adapter``, text_time conditioning, transformer depth 2) with a plain
    adapter: the same images as diffusers."""
    both = _load_both(sdxl, tokenizers, tmp_path, _sdxl_spec(sdxl), ".safetensors", seed=31,
                      pipeline="StableDiffusionXLPipeline", spacing="leading")
    images = [picture(210, 280, 14)]
    s = pp.SCHEDS["euler"]
    unit = IPAdapterUnit(str(both.path), images, encoder=str(both.encoder_path))
    p = pp.params(sampler=s.sampler, cfg_scale=6.0, ip_adapters=[unit])
    ours = pp.u8(sdxl.engine.generate(p, sigmas_fn=s.sigmas_fn(sdxl.engine, "leading")).images)
    plain = pp.u8(sdxl.engine.generate(dataclasses.replace(p, ip_adapters=[]),
                                       sigmas_fn=s.sigmas_fn(sdxl.engine, "leading")).images)
    ref = both.pipe(pp.PROMPT, negative_prompt=pp.NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64,
                    width=64, num_images_per_prompt=len(pp.SEEDS), latents=pp.start_noise((4, 8, 8), pp.SEEDS),
                    output_type="np", ip_adapter_image=images).images
    pp.check(ours, pp.ref_u8(ref), "IP-Adapter sdxl txt2img (Sumie vs diffusers load_ip_adapter)")
    assert pp.mad(ours, plain) > 20 * pp.STRICT


def test_two_units_match_diffusers_multi_adapter(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                                 tmp_path: Path) -> None:
    """A plain and a plus unit with their own weights (diffusers: two adapters in one ``load_ip_adapter`` call,
    ``set_ip_adapter_scale([w1, w2])``): the terms add; the same images."""
    models = tmp_path / "models"
    a = write_adapter(models / "plain.bin", adapter_state_dict(PLAIN, seed=41, scale=3.0))
    b = write_adapter(models / "plus.safetensors", adapter_state_dict(PLUS, seed=42, scale=3.0))
    write_encoder(models / "image_encoder", seed=43)
    pipe = pp.pipeline("StableDiffusionPipeline", sd1, pp.SCHEDS["euler"].make("linspace"), tokenizers)
    pipe.load_ip_adapter([str(tmp_path)] * 2, subfolder=["models"] * 2, weight_name=[a.name, b.name],
                         local_files_only=True)
    pipe.set_ip_adapter_scale([0.7, 1.3])
    im_a, im_b = [picture(230, 170, 15)], [picture(170, 230, 16)]
    units = [IPAdapterUnit(str(a), im_a, weight=0.7), IPAdapterUnit(str(b), im_b, weight=1.3)]  # encoder: found
    s = pp.SCHEDS["euler"]
    res = sd1.engine.generate(pp.params(sampler=s.sampler, ip_adapters=units),
                              sigmas_fn=s.sigmas_fn(sd1.engine, "linspace"))
    n = len(pp.SEEDS)
    ref = pipe([pp.PROMPT] * n, negative_prompt=[pp.NEGATIVE] * n, num_inference_steps=4, guidance_scale=7.0,
               height=64, width=64, output_type="np", latents=pp.start_noise((4, 8, 8), pp.SEEDS),
               ip_adapter_image=[im_a, im_b]).images
    pp.check(pp.u8(res.images), pp.ref_u8(ref), "two IP-Adapter units (Sumie vs diffusers multi-adapter)")
    assert "IP-Adapter 1: " in res.infotexts[0] and "Weight: 1.3" in res.infotexts[0]


# ------------------------------------------------------------------------------------------------ use and errors


def test_step_range_is_comfyui_percent_to_sigma(sd1: pp.Models) -> None:  # noqa: F811
    """start / end -> sigma bounds as ComfyUI's ``ModelSamplingDiscrete.percent_to_sigma`` (sigma(t = (1 - p) *
    999), log-interpolated; 0 -> no upper bound, 1 -> 0); the hook acts only inside and not at weight 0."""
    d = sd1.engine.discretization
    hi, lo = sigma_range(d, 0.25, 0.5)
    log = d.sigmas.double().log()

    def sigma_at(t: float) -> float:  # ComfyUI ModelSamplingDiscrete.sigma: log-linear between integer timesteps
        w = t - int(t)
        return float(torch.exp(log[int(t)] * (1 - w) + log[int(t) + 1] * w))

    assert hi == pytest.approx(sigma_at(0.75 * 999), rel=1e-6) and lo == pytest.approx(sigma_at(0.5 * 999), rel=1e-6)
    assert sigma_range(d, 0.0, 1.0) == (float("inf"), 0.0)
    k = {(("input", 1), 0): (torch.ones(1, 2, 4), torch.zeros(1, 2, 4))}
    hook = IPAdapterHook(k, k, 0.7, hi, lo)
    from sumie.models.hooks import AttnSite

    site = AttnSite(("input", 1), 0, "cross", (8, 8))
    rows = torch.tensor([0, 1, 1])

    def at(sigma: float, h: IPAdapterHook = hook) -> Any:
        return h(site, UNetOptions(call=CallInfo(0, torch.full((3,), sigma), rows)))

    assert at(hi * 1.01) is None and at(lo * 0.99) is None
    inside = at((hi * lo) ** 0.5)
    assert inside.scale == 0.7 and inside.k.shape == (3, 2, 4)
    assert torch.equal(inside.k[0], torch.zeros(2, 4)) and torch.equal(inside.k[1:], torch.ones(2, 2, 4))
    assert at((hi * lo) ** 0.5, dataclasses.replace(hook, weight=0.0)) is None
    assert hook(AttnSite(("input", 2), 0, "cross", (8, 8)), UNetOptions()) is None  # no such layer


def test_step_range_img2img_and_hires(sd1: pp.Models, tmp_path: Path) -> None:  # noqa: F811
    """The unit acts in img2img and in both hires passes; a step range in the middle gives an image between none
    and the full range; start = end = 1 (no step inside) gives exactly the plain image."""
    a = write_adapter(tmp_path / "models" / "ip.bin", adapter_state_dict(PLAIN, seed=51, scale=3.0))
    write_encoder(tmp_path / "models" / "image_encoder", seed=52)
    unit = IPAdapterUnit(str(a), [picture(120, 90, 17)])
    eng = sd1.engine

    def run(units: list[IPAdapterUnit], **kw: Any) -> np.ndarray:
        return pp.u8(eng.generate(pp.params(ip_adapters=units, **kw)).images)

    plain, full = run([]), run([unit])
    half = run([dataclasses.replace(unit, start=0.5)])
    assert pp.mad(full, plain) > 1.0 and pp.mad(half, plain) > 0.2 and pp.mad(half, full) > 0.2
    assert np.array_equal(run([dataclasses.replace(unit, start=1.0, end=1.0)]), plain)
    init = dict(init_images=[pp.init_image()], denoising_strength=0.6)
    assert pp.mad(run([unit], **init), run([], **init)) > 1.0
    hires = dict(hires=HiresParams(scale=1.5, steps=2, denoising_strength=0.5))
    assert pp.mad(run([unit], **hires), run([], **hires)) > 1.0


def test_errors_before_any_step(sd1: pp.Models, tmp_path: Path) -> None:  # noqa: F811
    """An adapter for another UNet, an encoder of another width, no encoder, no image, a bad range: ConfigError
    before the sampler runs (no progress event)."""
    steps: list[Any] = []
    other_cross = IPAdapterSpec("plain", TINY_VISION["projection_dim"], 128, 4, INNER)
    wrong_cross = write_adapter(tmp_path / "xl" / "ip-adapter_sdxl.bin", adapter_state_dict(other_cross))
    plain = write_adapter(tmp_path / "sd" / "ip.bin", adapter_state_dict(PLAIN))
    wide = write_adapter(tmp_path / "sd" / "wide.bin", adapter_state_dict(dataclasses.replace(PLAIN, embed_dim=40)))
    write_encoder(tmp_path / "enc")
    eng = sd1.engine
    img = [picture(64, 80)]
    cases = [
        (IPAdapterUnit(str(wrong_cross), img, encoder=str(tmp_path / "enc")), "made for this model's family"),
        (IPAdapterUnit(str(wide), img, encoder=str(tmp_path / "enc")), "takes 40-wide CLIP image embedding"),
        (IPAdapterUnit(str(plain), img), "needs a CLIP image encoder"),
        (IPAdapterUnit(str(plain), [], encoder=str(tmp_path / "enc")), "no reference image"),
        (IPAdapterUnit(str(plain), img, start=0.8, end=0.2, encoder=str(tmp_path / "enc")), "0 <= start <= end"),
        (IPAdapterUnit(str(tmp_path / "nope.bin"), img), "no such file"),
    ]
    for unit, message in cases:
        with pytest.raises((ConfigError, CheckpointError), match=message):
            eng.generate(pp.params(ip_adapters=[unit]), progress=steps.append)
    assert not steps


def test_cli_ip_adapter_groups_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--ip-adapter`` opens a unit; its options follow it; bad input: one line on stderr, exit code 2."""
    from sumie.cli.ip_adapter import units_from_args

    a = write_adapter(tmp_path / "a.bin", adapter_state_dict(PLAIN))
    b = write_adapter(tmp_path / "b.bin", adapter_state_dict(PLUS))
    im1, im2 = tmp_path / "r1.png", tmp_path / "r2.png"
    picture(40, 30).save(im1)
    picture(30, 40).save(im2)
    units = units_from_args([("--ip-adapter", str(a)), ("--ip-image", str(im1)), ("--ip-weight", "0.6"),
                             ("--ip-adapter", str(b)), ("--ip-image", str(im1)), ("--ip-image", str(im2)),
                             ("--ip-start", "0.2"), ("--ip-end", "0.9"), ("--clip-vision", str(a))])
    assert [(Path(u.model).name, len(u.images), u.weight, u.start, u.end) for u in units] == [
        ("a.bin", 1, 0.6, 0.0, 1.0), ("b.bin", 2, 1.0, 0.2, 0.9)]
    assert units[0].encoder is None and units[1].encoder == str(a)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for argv, message in [
        (["--ip-image", str(im1)], "give --ip-adapter FILE before"),
        (["--ip-adapter", str(a)], "no --ip-image after it"),
        (["--ip-adapter", str(tmp_path / "none.bin"), "--ip-image", str(im1)], "no such file"),
        (["--ip-adapter", str(a), "--ip-image", str(tmp_path / "bad.png")], "cannot read the image"),
        (["--ip-adapter", str(a), "--ip-image", str(im1), "--ip-weight", "x"], "not a number"),
    ]:
        code = main(["generate", "a cat", "--steps", "1", "-o", str(tmp_path / "out.png"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_generates_with_an_ip_adapter_from_a_comfyui_folder(tmp_path: Path) -> None:
    """``sumie generate --models-dir COMFY --ip-adapter NAME --ip-image IMG --clip-vision NAME`` on the embedded
    model: names found in models/ipadapter and models/clip_vision, the infotext records the unit, and the image
    differs from the one without the adapter."""
    import sumie

    engine = sumie.load()
    widths = tuple(attn.to_k.out_features for _, attn in cross_attention_sites(engine.models.unet))
    cross = engine.models.config.unet.context_dim
    models = tmp_path / "comfy" / "models"
    (models / "checkpoints").mkdir(parents=True)
    spec = IPAdapterSpec("plain", TINY_VISION["projection_dim"], cross, 4, widths)
    write_adapter(models / "ipadapter" / "tiny-ip.safetensors", adapter_state_dict(spec, seed=5, scale=3.0))
    write_encoder(models / "clip_vision" / "tiny-vision", seed=6)
    ref = tmp_path / "ref.png"
    picture(90, 60, 9).save(ref)
    out_ip, out_plain = tmp_path / "ip.png", tmp_path / "plain.png"
    base = ["generate", "a red cube", "--seed", "3", "--steps", "3", "-q", "--models-dir", str(tmp_path / "comfy")]
    assert main([*base, "-o", str(out_plain)]) == 0
    assert main([*base, "--ip-adapter", "tiny-ip", "--ip-image", str(ref), "--ip-weight", "0.8", "--clip-vision",
                 "tiny-vision", "-o", str(out_ip)]) == 0
    text = Image.open(out_ip).info["parameters"]
    assert 'IP-Adapter 0: "Model: tiny-ip [' in text and "Weight: 0.8" in text and "Encoder: tiny-vision" in text
    assert np.abs(np.asarray(Image.open(out_ip), float) - np.asarray(Image.open(out_plain), float)).mean() > 1.0
