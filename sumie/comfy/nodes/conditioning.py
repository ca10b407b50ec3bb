"""Text conditioning nodes (nodes.py: CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine / Concat / ZeroOut /
SetTimestepRange / SetArea / SetAreaPercentage / SetMask; comfy_extras/nodes_clip_sdxl.py: CLIPTextEncodeSDXL,
CLIPTextEncodeSDXLRefiner).

Prompts are split into chunks as ComfyUI does (:mod:`sumie.comfy.tokens`), encoded by Sumie's text encoders
(:class:`~sumie.prompts.text_conditioning.TextConditioner`) and weighted as ComfyUI does
(``sd1_clip.ClipTokenWeightEncoder``): a token of weight w != 1 becomes ``(z - z_empty) * w + z_empty``,
``z_empty`` the encoding of the empty prompt at that position. Textual-inversion ``embedding:name`` words read the
embeddings folders (:func:`embedding_lookup`) and are placed as Sumie's prompt path places embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import MAX_RESOLUTION, InputTypes, Node, RunContext
from sumie.comfy.tokens import EmbeddingLookup, comfy_chunks
from sumie.comfy.values import ComfyClip, Conditioning, NodeOutput, applied
from sumie.configs import ModelConfig
from sumie.errors import ConfigError
from sumie.prompts.embeddings import Embedding, load_embedding_file
from sumie.prompts.text_conditioning import ConditioningOptions, PromptChunk, TextConditioner

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # sd1_clip.load_embed's order


def embedding_lookup(env: ComfyEnvironment, config: ModelConfig) -> EmbeddingLookup | None:
    """``embedding:NAME`` -> the file ``NAME`` (or ``NAME`` + .safetensors / .pt / .bin) in the first embeddings folder
    that has it, never outside it (``sd1_clip.load_embed``); None without an embeddings folder (the words stay
    text, as ComfyUI's without an embedding directory). An embedding that does not fit the model is a ConfigError."""
    folders = env.manager.folders
    dirs = folders.dirs("embedding") if folders is not None else []
    if not dirs:
        return None
    loaded: dict[Path, Embedding] = {}

    def find(name: str) -> Embedding | None:
        for base in dirs:
            root = os.path.abspath(base)
            full = os.path.abspath(os.path.join(root, name))
            if os.path.commonpath((root, full)) != root:
                continue
            candidates = [full] if os.path.isfile(full) else [full + s for s in EMBEDDING_SUFFIXES]
            path = next((Path(c) for c in candidates if os.path.isfile(c)), None)
            if path is None:
                continue
            if path not in loaded:
                emb = load_embedding_file(path)
                try:
                    emb.check(config)
                except ConfigError as e:
                    raise ConfigError(f"embedding:{name}: {e}") from None
                loaded[path] = emb
            return loaded[path]
        return None

    return find


class _ComfyConditioner(TextConditioner):
    """Sumie's text encoders fed ComfyUI's chunks (:func:`sumie.comfy.tokens.comfy_chunks`), weights left out."""

    lookup: EmbeddingLookup | None = None

    def tokenize(self, text: str) -> tuple[list[PromptChunk], int]:
        """ComfyUI's chunks of a prompt and their token count."""
        chunks = comfy_chunks(text, self.tokenizer, self.lookup)
        return chunks, sum(t not in (self.tokenizer.BOS, self.tokenizer.EOS) for c in chunks for t in c.tokens)


def _conditioner(clip: ComfyClip, embeddings: EmbeddingLookup | None) -> TextConditioner:
    m = clip.models
    skip = 1 if clip.layer is None else -clip.layer
    out = _ComfyConditioner(m.config, m.text_encoders, None, ConditioningOptions(emphasis="Ignore", clip_skip=skip))
    out.lookup = embeddings
    return out


def encode_text(clip: ComfyClip, text: str,
                embeddings: EmbeddingLookup | None = None) -> tuple[Tensor, Tensor | None, int]:
    """(context [1, 77k, D], pooled [1, P] or None, chunks k) of one prompt with ComfyUI's token weighting;
    ``embeddings`` resolves ``embedding:NAME`` words (:func:`embedding_lookup`)."""
    conditioner = _conditioner(clip, embeddings)
    chunks, _ = conditioner.tokenize(text)
    with applied(clip.patcher, clip.patches), torch.no_grad():
        out = conditioner([text])
        context = out.context
        weights = torch.tensor([w for c in chunks for w in c.multipliers], dtype=torch.float32)
        if bool((weights != 1.0).any()):
            empty = conditioner.empty().context.repeat(1, len(chunks), 1)
            w = weights.to(context.device)[None, :, None]
            context = torch.where(w != 1.0, (context - empty) * w + empty, context)
    return context.float().cpu(), None if out.pooled is None else out.pooled.float().cpu(), len(chunks)


class CLIPTextEncode(Node):
    """nodes.py ``CLIPTextEncode``: text -> [[context, {"pooled_output": pooled}]]."""

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                   "diffusion model towards generating specific images.")
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The text and the CLIP."""
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
        }}

    def run(self, ctx: RunContext, clip: ComfyClip, text: str) -> NodeOutput:
        """Encode the prompt."""
        context, pooled, _ = encode_text(clip, text, embedding_lookup(ctx.env, clip.models.config))
        return NodeOutput(([[context, {"pooled_output": pooled}]],))


class CLIPTextEncodeSDXL(Node):
    """comfy_extras/nodes_clip_sdxl.py ``CLIPTextEncodeSDXL``: CLIP-L and bigG prompts apart, with SDXL's sizes."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/conditioning"
    PYTHON_MODULE = "comfy_extras.nodes_clip_sdxl"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Sizes, crops and the two texts."""
        size = ("INT", {"default": 1024.0, "min": 0, "max": MAX_RESOLUTION})
        crop = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION})
        text = ("STRING", {"multiline": True, "dynamicPrompts": True})
        return {"required": {"width": size, "height": size, "crop_w": crop, "crop_h": crop, "target_width": size,
                             "target_height": size, "text_g": text, "clip": ("CLIP",), "text_l": text}}

    def run(self, ctx: RunContext, clip: ComfyClip, width: int, height: int, crop_w: int, crop_h: int,
            target_width: int, target_height: int, text_g: str, text_l: str) -> NodeOutput:
        """CLIP-L features of ``text_l`` beside bigG features of ``text_g`` (chunk counts padded with the empty
        prompt), pooled output from ``text_g``."""
        names = [e.name for e in clip.models.config.text_encoders]
        if len(names) != 2:
            raise ConfigError("CLIPTextEncodeSDXL needs an SDXL model (two text encoders); use CLIPTextEncode")
        lookup = embedding_lookup(ctx.env, clip.models.config)
        ctx_g, pooled, n_g = encode_text(clip, text_g, lookup)
        ctx_l, _, n_l = encode_text(clip, text_l, lookup)
        width_l = clip.models.config.text_encoders[0].width
        empty, _, _ = encode_text(clip, "")
        n = max(n_g, n_l)
        ctx_g = torch.cat([ctx_g] + [empty] * (n - n_g), dim=1)
        ctx_l = torch.cat([ctx_l] + [empty] * (n - n_l), dim=1)
        context = torch.cat([ctx_l[..., :width_l], ctx_g[..., width_l:]], dim=-1)
        opts = {"pooled_output": pooled, "width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                "target_width": target_width, "target_height": target_height}
        return NodeOutput(([[context, opts]],))


class CLIPTextEncodeSDXLRefiner(Node):
    """comfy_extras/nodes_clip_sdxl.py ``CLIPTextEncodeSDXLRefiner``: the prompt with the refiner's aesthetic
    score and size."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/conditioning"
    PYTHON_MODULE = "comfy_extras.nodes_clip_sdxl"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Aesthetic score, size, text."""
        size = ("INT", {"default": 1024.0, "min": 0, "max": MAX_RESOLUTION})
        return {"required": {"ascore": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}),
                             "width": size, "height": size,
                             "text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)}}

    def run(self, ctx: RunContext, ascore: float, width: int, height: int, text: str, clip: ComfyClip) -> NodeOutput:
        """[[context, {pooled_output, aesthetic_score, width, height}]]."""
        context, pooled, _ = encode_text(clip, text, embedding_lookup(ctx.env, clip.models.config))
        opts = {"pooled_output": pooled, "aesthetic_score": float(ascore), "width": width, "height": height}
        return NodeOutput(([[context, opts]],))


class CLIPSetLastLayer(Node):
    """nodes.py ``CLIPSetLastLayer``: -1 the last layer, -2 the penultimate (A1111's clip skip 2)."""

    RETURN_TYPES = ("CLIP",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Set Last Layer"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The CLIP and the layer."""
        return {"required": {"clip": ("CLIP",),
                             "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})}}

    def run(self, ctx: RunContext, clip: ComfyClip, stop_at_clip_layer: int) -> NodeOutput:
        """A CLIP that stops at the layer."""
        return NodeOutput((clip.with_layer(int(stop_at_clip_layer)),))


def _with(conditioning: Conditioning, **values: Any) -> Conditioning:
    """Every entry with ``values`` set in its options (node_helpers.conditioning_set_values)."""
    return [[c[0], {**c[1], **values}] for c in conditioning]


class ConditioningCombine(Node):
    """nodes.py ``ConditioningCombine``: both lists of entries (their predictions are averaged)."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Combine)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Two conditionings."""
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    def run(self, ctx: RunContext, conditioning_1: Conditioning, conditioning_2: Conditioning) -> NodeOutput:
        """The concatenated lists."""
        return NodeOutput((list(conditioning_1) + list(conditioning_2),))


class ConditioningConcat(Node):
    """nodes.py ``ConditioningConcat``: the first entry of ``conditioning_from`` appended along the tokens."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Concat)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Two conditionings."""
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    def run(self, ctx: RunContext, conditioning_to: Conditioning, conditioning_from: Conditioning) -> NodeOutput:
        """Each ``to`` entry's tokens followed by the first ``from`` entry's."""
        src = conditioning_from[0][0]
        return NodeOutput(([[torch.cat([c[0], src], dim=1), dict(c[1])] for c in conditioning_to],))


class ConditioningZeroOut(Node):
    """nodes.py ``ConditioningZeroOut``: contexts and pooled outputs set to zeros."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/conditioning"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """One conditioning."""
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def run(self, ctx: RunContext, conditioning: Conditioning) -> NodeOutput:
        """Zeros of the same shapes."""
        out = []
        for c in conditioning:
            opts = dict(c[1])
            if opts.get("pooled_output") is not None:
                opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
            out.append([torch.zeros_like(c[0]), opts])
        return NodeOutput((out,))


class ConditioningSetTimestepRange(Node):
    """nodes.py ``ConditioningSetTimestepRange``: the entries act only from ``start`` to ``end`` of sampling."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "advanced/conditioning"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The conditioning and the range as fractions of the schedule."""
        return {"required": {"conditioning": ("CONDITIONING",),
                             "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                             "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})}}

    def run(self, ctx: RunContext, conditioning: Conditioning, start: float, end: float) -> NodeOutput:
        """Entries with ``start_percent`` / ``end_percent``."""
        return NodeOutput((_with(conditioning, start_percent=float(start), end_percent=float(end)),))


class ConditioningSetArea(Node):
    """nodes.py ``ConditioningSetArea``: the entries act on a rectangle (pixels / 8), edges ramped over 8 cells."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Set Area)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The conditioning, the rectangle and its strength."""
        size = {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}
        pos = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"conditioning": ("CONDITIONING",), "width": ("INT", size), "height": ("INT", dict(size)),
                             "x": ("INT", pos), "y": ("INT", dict(pos)),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})}}

    def run(self, ctx: RunContext, conditioning: Conditioning, width: int, height: int, x: int, y: int,
            strength: float) -> NodeOutput:
        """Entries with ``area`` (h, w, y, x) in latent cells and ``strength``."""
        area = (height // 8, width // 8, y // 8, x // 8)
        return NodeOutput((_with(conditioning, area=area, strength=float(strength), set_area_to_bounds=False),))


class ConditioningSetAreaPercentage(Node):
    """nodes.py ``ConditioningSetAreaPercentage``: the rectangle as fractions of the latent."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Set Area with Percentage)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The conditioning, the rectangle as fractions and its strength."""
        def frac(default: float) -> tuple[str, dict[str, Any]]:
            return ("FLOAT", {"default": default, "min": 0, "max": 1.0, "step": 0.01})

        return {"required": {"conditioning": ("CONDITIONING",), "width": frac(1.0), "height": frac(1.0),
                             "x": frac(0), "y": frac(0),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})}}

    def run(self, ctx: RunContext, conditioning: Conditioning, width: float, height: float, x: float, y: float,
            strength: float) -> NodeOutput:
        """Entries with ``area`` ("percentage", h, w, y, x)."""
        return NodeOutput((_with(conditioning, area=("percentage", height, width, y, x), strength=float(strength),
                                 set_area_to_bounds=False),))


class ConditioningSetMask(Node):
    """nodes.py ``ConditioningSetMask``: the entries act where the mask is, weighted by it."""

    RETURN_TYPES = ("CONDITIONING",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Set Mask)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The conditioning, the mask, its strength, and whether to work on the mask's bounding box only."""
        return {"required": {"conditioning": ("CONDITIONING",), "mask": ("MASK",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                             "set_cond_area": (["default", "mask bounds"],)}}

    def run(self, ctx: RunContext, conditioning: Conditioning, mask: Tensor, strength: float,
            set_cond_area: str) -> NodeOutput:
        """Entries with ``mask`` [B, H, W], ``mask_strength`` and ``set_area_to_bounds``."""
        mask = mask[None] if mask.ndim < 3 else mask
        return NodeOutput((_with(conditioning, mask=mask, set_area_to_bounds=set_cond_area != "default",
                                 mask_strength=float(strength)),))


NODES: dict[str, type[Node]] = {
    "CLIPTextEncode": CLIPTextEncode,
    "CLIPSetLastLayer": CLIPSetLastLayer,
    "ConditioningCombine": ConditioningCombine,
    "ConditioningConcat": ConditioningConcat,
    "ConditioningZeroOut": ConditioningZeroOut,
    "ConditioningSetTimestepRange": ConditioningSetTimestepRange,
    "CLIPTextEncodeSDXL": CLIPTextEncodeSDXL,
    "CLIPTextEncodeSDXLRefiner": CLIPTextEncodeSDXLRefiner,
    "ConditioningSetArea": ConditioningSetArea,
    "ConditioningSetAreaPercentage": ConditioningSetAreaPercentage,
    "ConditioningSetMask": ConditioningSetMask,
}
