"""CLIP vision and IP-Adapter nodes (nodes.py CLIPVisionLoader / CLIPVisionEncode; ComfyUI_IPAdapter_plus
IPAdapterModelLoader / IPAdapterAdvanced) on a tiny random SD1 model, a random CLIP image tower at the real patch and
image size (transformers' own model is the oracle) and random IP-Adapter files at the tiny UNet's shapes.

* ``clip_preprocess`` (comfy/clip_vision.py): a 224 x 224 IMAGE is only rounded to 8-bit levels and normalised, so
  the encoder's outputs are compared with transformers' ``CLIPVisionModelWithProjection`` on those pixels; another
  size is resized (bicubic, antialias) so the short side is 224 and centre-cropped, or squashed with crop "none";
* IPAdapterAdvanced: a plain adapter's tokens equal Sumie's A1111-path tokens (``image_tokens``) for a 224 x 224
  image; weight 0 gives exactly the image without the adapter (``ipadapter_attention`` returns 0), as does a range
  that never holds a step's sigma; weight 1 changes it; unsupported settings fail with clear errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ip_adapter_testfiles import TINY_VISION, adapter_state_dict, write_adapter, write_encoder
from PIL import Image
from safetensors.torch import save_file
from test_comfy_execution import example_prompt, mad, run, saved

from sumie.adapters.ip_adapter.files import IPAdapterSpec
from sumie.adapters.ip_adapter.hook import cross_attention_sites, image_tokens
from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.checkpoints.save import random_single_file
from sumie.comfy import NODE_CLASSES, ComfyEnvironment, ComfyFolders, check_request
from sumie.comfy.nodes.base import RunContext
from sumie.comfy.nodes.loaders import load_checkpoint
from sumie.comfy.nodes.vision import adapter_tokens
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.pipelines.control import JobControl

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/checkpoints/tiny_sd1, models/clip_vision/tiny_vit (a transformers folder), models/ipadapter/{plain,
    plus} adapters at the tiny UNet's cross-attention widths."""
    base = tmp_path_factory.mktemp("comfy_vision")
    models = base / "models"
    (models / "checkpoints").mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(models / "checkpoints" / "tiny_sd1.safetensors"))
    write_encoder(models / "clip_vision" / "tiny_vit", seed=21)
    unet = ModelManager(ModelFolders(base)).get("checkpoint", "tiny_sd1.safetensors").unet
    inner = tuple(attn.to_k.out_features for _, attn in cross_attention_sites(unet))
    cross = TINY["sd1"].unet.context_dim
    plain = IPAdapterSpec("plain", TINY_VISION["projection_dim"], cross, 4, inner)
    plus = IPAdapterSpec("plus", TINY_VISION["hidden_size"], cross, 16, inner, (48, 4, 2, 4))
    write_adapter(models / "ipadapter" / "plain.safetensors", adapter_state_dict(plain, seed=22, scale=3.0))
    write_adapter(models / "ipadapter" / "plus.bin", adapter_state_dict(plus, seed=23, scale=3.0))
    return base


@pytest.fixture(scope="module")
def manager(root: Path) -> ModelManager:
    """The module's model manager."""
    return ModelManager(ModelFolders(root))


def reference_picture(w: int = 224, h: int = 224) -> Image.Image:
    """A structured RGB picture."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x // 16 + y // 16) % 2) * 255], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture
def env(tmp_path: Path, manager: ModelManager) -> ComfyEnvironment:
    """Fresh folders with reference images (224 x 224 and 300 x 240)."""
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    reference_picture().save(folders.input / "ref.png")
    reference_picture(300, 240).save(folders.input / "wide.png")
    return ComfyEnvironment(folders, manager)


def node(env: ComfyEnvironment, name: str, **inputs: Any) -> tuple[Any, ...]:
    """One node's outputs."""
    return NODE_CLASSES[name]().run(RunContext(env, "1", {}, None, JobControl()), **inputs).outputs


def oracle(root: Path) -> Any:
    """transformers' model of the clip_vision folder."""
    import transformers

    return transformers.CLIPVisionModelWithProjection.from_pretrained(root / "models" / "clip_vision" / "tiny_vit")


def test_clip_vision_encode_matches_transformers(env: ComfyEnvironment, root: Path) -> None:
    """CLIPVisionEncode's image embedding and penultimate states equal transformers' on ComfyUI's pixels."""
    (encoder,) = node(env, "CLIPVisionLoader", clip_name="tiny_vit")
    ref_model = oracle(root)
    for name, crop in (("ref.png", "center"), ("wide.png", "center"), ("wide.png", "none")):
        (image, _) = node(env, "LoadImage", image=name)
        (out,) = node(env, "CLIPVisionEncode", clip_vision=encoder, image=image, crop=crop)
        x = image.movedim(-1, 1)
        if x.shape[-2:] != (224, 224):
            if crop == "center":
                k = 224 / min(x.shape[-2:])
                x = F.interpolate(x, size=(round(k * x.shape[-2]), round(k * x.shape[-1])), mode="bicubic",
                                  antialias=True)
                top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
                x = x[:, :, top:top + 224, left:left + 224]
            else:
                x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
        pixels = ((x * 255).clamp(0, 255).round() / 255 - MEAN) / STD
        with torch.no_grad():
            want = ref_model(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(out.image_embeds, want.image_embeds, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.penultimate, want.hidden_states[-2], rtol=1e-4, atol=1e-4)


def test_plain_adapter_tokens_equal_sumies_ip_adapter_path(env: ComfyEnvironment) -> None:
    """For a 224 x 224 image ComfyUI's and transformers' preprocessing agree, so the node's tokens equal the ones
    Sumie's own IP-Adapter units make (plain adapter: the uncond tokens are the projection of a zero embedding)."""
    (encoder,) = node(env, "CLIPVisionLoader", clip_name="tiny_vit")
    (adapter,) = node(env, "IPAdapterModelLoader", ipadapter_file="plain.safetensors")
    (image, _) = node(env, "LoadImage", image="ref.png")
    cond, uncond = adapter_tokens(adapter, encoder, image)
    want_cond, want_uncond = image_tokens(adapter, encoder, [reference_picture()])
    torch.testing.assert_close(cond, want_cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uncond, want_uncond, rtol=0, atol=0)


def ip_prompt(weight: float, start: float = 0.0, end: float = 1.0, adapter: str = "plain.safetensors",
              **extra: Any) -> dict[str, Any]:
    """The example graph with LoadImage + CLIPVisionLoader + IPAdapterModelLoader -> IPAdapterAdvanced -> KSampler."""
    p = example_prompt("tiny_sd1.safetensors")
    p["20"] = {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}
    p["21"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny_vit"}}
    p["22"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": adapter}}
    p["23"] = {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": ["4", 0], "ipadapter": ["22", 0], "image": ["20", 0], "weight": weight, "weight_type": "linear",
        "combine_embeds": "concat", "start_at": start, "end_at": end, "embeds_scaling": "V only",
        "clip_vision": ["21", 0], **extra}}
    p["3"]["inputs"]["model"] = ["23", 0]
    return p


def image_of(env: ComfyEnvironment, prompt: dict[str, Any]) -> np.ndarray:
    """Run a graph; its saved image."""
    result, _ = run(env, prompt)
    assert result.success, result.error
    return np.asarray(Image.open(saved(env, result)[0]).convert("RGB"))


@pytest.mark.parametrize("adapter", ["plain.safetensors", "plus.bin"])
def test_ip_adapter_graph_weight_zero_is_no_adapter(env: ComfyEnvironment, adapter: str) -> None:
    """The graph runs; weight 0 and a range no step falls in give the plain graph's image exactly; weight 1 and a
    late start change it."""
    plain = image_of(env, example_prompt("tiny_sd1.safetensors"))
    np.testing.assert_array_equal(image_of(env, ip_prompt(0.0, adapter=adapter)), plain)
    np.testing.assert_array_equal(image_of(env, ip_prompt(1.0, 1.0, 1.0, adapter=adapter)), plain)
    full = image_of(env, ip_prompt(1.0, adapter=adapter))
    late = image_of(env, ip_prompt(1.0, 0.5, 1.0, adapter=adapter))
    print(f"{adapter}: the adapter changes the image by {mad(full, plain):.2f}/255, starting at 0.5 by "
          f"{mad(late, plain):.2f}/255")
    assert mad(full, plain) > 2.0 and mad(late, plain) > 0.5 and mad(full, late) > 0.5


def test_ip_adapter_subset_is_enforced(env: ComfyEnvironment) -> None:
    """Unsupported weight types / scalings fail validation; a negative image, a missing CLIP vision model or
    several reference images fail the run with a message naming them."""
    body = check_request({"prompt": ip_prompt(1.0, weight_type="ease in", embeds_scaling="K+V")}, env).body
    assert body is not None
    details = [e["details"] for e in body["node_errors"]["23"]["errors"]]
    assert all(e["type"] == "custom_validation_failed" for e in body["node_errors"]["23"]["errors"])
    assert any("weight_type 'ease in' is not supported" in d for d in details)
    p = ip_prompt(1.0, image_negative=["20", 0])
    result, _ = run(env, p)
    assert not result.success and "image_negative is not supported" in result.error["exception_message"]
    p = ip_prompt(1.0)
    del p["23"]["inputs"]["clip_vision"]
    result, _ = run(env, p)
    assert not result.success and "Missing CLIPVision model" in result.error["exception_message"]
    (encoder,) = node(env, "CLIPVisionLoader", clip_name="tiny_vit")
    (adapter,) = node(env, "IPAdapterModelLoader", ipadapter_file="plain.safetensors")
    (image, _) = node(env, "LoadImage", image="ref.png")
    model = load_checkpoint(env, "tiny_sd1.safetensors")[0]
    with pytest.raises(ConfigError, match="one reference image per node"):
        node(env, "IPAdapterAdvanced", model=model, ipadapter=adapter, image=torch.cat([image, image]), weight=1.0,
             weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
             clip_vision=encoder)
