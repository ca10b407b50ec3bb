"""Upscale-model nodes and ``embedding:`` words in ComfyUI graphs, on random-weight models.

* ``ImageUpscaleWithModel`` (comfy_extras/nodes_upscale_model.py): one pass of the model, output exactly ``scale``
  times the input, clamped to [0, 1]; compared with Sumie's upscaler module applied directly (the same computation:
  exact) and with Sumie's tiled runner for an image above the 512-pixel tile;
* ``embedding:NAME`` (sd1_clip.py ``tokenize_with_weights``): the same vectors in the same slots as Sumie's own prompt
  path (A1111's ``EmbeddingLibrary``) puts them (exact), weighted as ComfyUI weights any token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import upscaler_reference as ref
from PIL import Image
from safetensors.torch import save_file
from test_comfy_execution import run as run_graph
from test_comfy_execution import saved

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.checkpoints.save import random_single_file
from sumie.comfy import NODE_CLASSES, ComfyEnvironment, ComfyFolders
from sumie.comfy.nodes.base import RunContext
from sumie.comfy.nodes.loaders import load_checkpoint
from sumie.comfy.nodes.upscale import upscale_image
from sumie.comfy.tokens import comfy_chunks
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.pipelines.control import JobControl
from sumie.pipelines.upscale import run_tiled
from sumie.prompts.embeddings import EmbeddingLibrary, load_embedding_file
from sumie.prompts.text_conditioning import ConditioningOptions, TextConditioner
from sumie.prompts.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI folder: tiny SD1 checkpoint, a x2 Real-ESRGAN compact upscaler, embeddings (SD1 width, a wrong
    width, one in a subfolder)."""
    base = tmp_path_factory.mktemp("comfy_up_emb")
    models = base / "models"
    (models / "checkpoints").mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(models / "checkpoints" / "tiny_sd1.safetensors"))
    (models / "upscale_models").mkdir()
    torch.save({"params": ref.random_weights(ref.srvgg_keys(8, 2, 2, prefix=""), 3)},
               models / "upscale_models" / "2x_compact.pth")
    width = TINY["sd1"].text_encoders[0].width
    g = torch.Generator().manual_seed(11)
    (models / "embeddings" / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.randn(3, width, generator=g)}, str(models / "embeddings" / "mystyle.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=g)}, "name": "deep"},
               models / "embeddings" / "sub" / "deep.pt")
    save_file({"emb_params": torch.randn(10, width, generator=g)}, str(models / "embeddings" / "long.safetensors"))
    save_file({"emb_params": torch.randn(2, width + 8, generator=g)}, str(models / "embeddings" / "wide.safetensors"))
    return base


@pytest.fixture
def env(tmp_path: Path, root: Path) -> ComfyEnvironment:
    """Fresh folders with a 40 x 24 input image."""
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(folders.input / "small.png")
    return ComfyEnvironment(folders, ModelManager(ModelFolders(root)))


def ctx(env: ComfyEnvironment) -> RunContext:
    """A run context for calling nodes directly."""
    return RunContext(env, "1", {}, None, JobControl())


def node(env: ComfyEnvironment, name: str, **inputs: Any) -> tuple[Any, ...]:
    """One node's outputs."""
    return NODE_CLASSES[name]().run(ctx(env), **inputs).outputs


# ---------------------------------------------------------------- upscaling


def test_upscale_node_is_the_model_applied(env: ComfyEnvironment) -> None:
    """Up to 512 px the node's IMAGE is the upscaler module on the image, clamped (exact), at 2x the size."""
    (model,) = node(env, "UpscaleModelLoader", model_name="2x_compact.pth")
    (image, _) = node(env, "LoadImage", image="small.png")
    (out,) = node(env, "ImageUpscaleWithModel", upscale_model=model, image=image)
    assert tuple(out.shape) == (1, 48, 80, 3)
    with torch.no_grad():
        direct = model.module(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    assert float((direct - model.module(image.movedim(-1, 1)).movedim(1, -1)).abs().max()) > 0  # the clamp acts


def test_upscale_above_one_tile_keeps_scale_times_size(env: ComfyEnvironment) -> None:
    """A 2 x 600 x 530 batch: tiles of 512 overlapping by 32 through Sumie's tiled runner, output 1200 x 1060."""
    (model,) = node(env, "UpscaleModelLoader", model_name="2x_compact.pth")
    image = torch.rand(2, 530, 600, 3, generator=torch.Generator().manual_seed(1))
    out = upscale_image(model, image)
    assert tuple(out.shape) == (2, 1060, 1200, 3)
    with torch.no_grad():
        want = run_tiled(model.module, image.movedim(-1, 1), 2, 512, 32).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_upscale_graph_saves_the_bigger_image(env: ComfyEnvironment) -> None:
    """LoadImage -> UpscaleModelLoader -> ImageUpscaleWithModel -> SaveImage writes an 80 x 48 PNG."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x_compact.pth"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
    }
    result, _ = run_graph(env, prompt)
    assert result.success, result.error
    assert Image.open(saved(env, result)[0]).size == (80, 48)


# ---------------------------------------------------------------- embeddings


def _comfy(env: ComfyEnvironment, text: str) -> torch.Tensor:
    clip = load_checkpoint(env, "tiny_sd1.safetensors")[1]
    (cond,) = node(env, "CLIPTextEncode", clip=clip, text=text)
    return cond[0][0]


def _sumie(env: ComfyEnvironment, text: str) -> torch.Tensor:
    """Sumie's own prompt path (A1111's tokenizer and embedding library) for the same prompt."""
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    folder = env.manager.folders.dirs("embedding")[0]  # type: ignore[union-attr]
    lib = EmbeddingLibrary(models.config, CLIPTokenizer())
    for name in ("mystyle.safetensors", "sub/deep.pt", "long.safetensors"):
        lib.load_file(folder / name)
    return TextConditioner(models.config, models.text_encoders, lib, ConditioningOptions())([text]).context


def test_embedding_word_equals_sumies_prompt_path(env: ComfyEnvironment) -> None:
    """``embedding:mystyle`` / ``embedding:sub/deep.pt`` give the vectors Sumie's prompt path puts for the file's
    name (exact), and differ from the plain word."""
    ours = _comfy(env, "a photo of embedding:mystyle cat, embedding:sub/deep.pt")
    assert torch.equal(ours, _sumie(env, "a photo of mystyle cat, deep"))
    assert not torch.allclose(ours, _comfy(env, "a photo of mystyle cat, deep"), atol=1e-3)
    # a trailing comma is not part of the name; an unknown name stays text
    assert torch.equal(_comfy(env, "embedding:mystyle, cat"), _sumie(env, "mystyle , cat"))
    tok = CLIPTokenizer()
    unknown = comfy_chunks("embedding:nothere cat", tok, lambda name: None)
    text = comfy_chunks("embedding:nothere cat", tok)
    assert [c.tokens for c in unknown] == [c.tokens for c in text] and unknown[0].fixes == ()
    words = (*tok.encode("embedding:nothere"), *tok.encode("cat"))
    assert unknown[0].tokens[1:1 + len(words)] == words


def test_weighted_embedding_uses_comfyuis_token_weighting(env: ComfyEnvironment) -> None:
    """``(embedding:mystyle:1.2)``: its 3 slots become (z - z_empty) * 1.2 + z_empty, the rest stays."""
    plain, weighted = _comfy(env, "a embedding:mystyle b"), _comfy(env, "a (embedding:mystyle:1.2) b")
    empty = _comfy(env, "")
    want = plain.clone()
    want[:, 2:5] = (plain[:, 2:5] - empty[:, 2:5]) * 1.2 + empty[:, 2:5]
    torch.testing.assert_close(weighted, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weighted, plain, atol=1e-3)


def test_long_embedding_spans_chunks(env: ComfyEnvironment) -> None:
    """A 10-vector embedding is a large word: after 70 tokens it fills the first chunk and goes on in the next,
    each part with its own vectors."""
    folder = env.manager.folders.dirs("embedding")[0]  # type: ignore[union-attr]
    emb = load_embedding_file(folder / "long.safetensors")
    chunks = comfy_chunks(" ".join(["cat"] * 70) + " embedding:long", CLIPTokenizer(), {"long": emb}.get)
    assert len(chunks) == 2
    (o1, e1), (o2, e2) = chunks[0].fixes[0], chunks[1].fixes[0]
    assert (o1, o2) == (70, 0)
    assert torch.equal(e1.vectors["*"], emb.vectors["*"][:5]) and torch.equal(e2.vectors["*"], emb.vectors["*"][5:])
    assert chunks[0].tokens[71:76] == (0,) * 5 and chunks[0].tokens[76] == CLIPTokenizer.EOS


def test_embedding_of_another_width_is_a_clear_error(env: ComfyEnvironment) -> None:
    """An embedding made for another model fails with a message naming it."""
    with pytest.raises(ConfigError, match="embedding:wide"):
        _comfy(env, "embedding:wide")


def test_upscale_halves_the_tile_on_out_of_memory(env: ComfyEnvironment) -> None:
    """A model that runs out of memory on tiles above ``limit`` px: the node retries with half the tile (ComfyUI's
    rule) and gives the result of that tile size; when even 128 fails it gives up with the error."""
    (model,) = node(env, "UpscaleModelLoader", model_name="2x_compact.pth")
    inner = model.module

    class Limited(torch.nn.Module):
        def __init__(self, limit: int) -> None:
            super().__init__()
            self.inner, self.limit, self.seen = inner, limit, []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(max(x.shape[-2:]))
            if max(x.shape[-2:]) > self.limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    image = torch.rand(1, 300, 280, 3, generator=torch.Generator().manual_seed(2))
    limited = Limited(256)
    out = upscale_image(type(model)(limited, model.spec), image)
    assert limited.seen[0] == 300 and max(limited.seen[1:]) <= 256  # one 512 tile, then tiles of 256
    with torch.no_grad():
        want = run_tiled(inner, image.movedim(-1, 1), 2, 256, 32).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    never = Limited(0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        upscale_image(type(model)(never, model.spec), image)
    assert sorted(set(never.seen), reverse=True)[:3] == [300, 256, 128]  # 512 (the whole image), 256, 128, then up
