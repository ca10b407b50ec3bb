"""Adapters trained on a frozen checkpoint: LoRA (Hu et al. 2021, kohya's layout) and textual inversion (Gal et al.
2022, A1111's files).

LoRA: every targeted Linear / Conv2d of the UNet and text encoders is wrapped, through a
:class:`~sumie.adapters.patcher.ModelPatcher` object patch, by a :class:`LoRAWrapped` module that holds the frozen
original and a :class:`LoRAAdapter` (``lora_down``, ``lora_up``, ``alpha``) and returns
``base(x) + up(down(x)) * alpha / rank``; ``unpatch()`` puts the originals back (nothing else is changed, no
``forward`` is replaced). The adapters live in one :class:`LoRANetwork` keyed by their kohya names, so its
``state_dict`` is a kohya file's tensors. Init as kohya's ``networks.lora``: down kaiming-uniform (a = sqrt 5), up 0.

Textual inversion: :class:`TextualInversion` holds ``num_vectors`` trainable vectors per text encoder, initialised
from the init word's token embeddings (A1111's spreading of its tokens over the vectors); prompts are encoded by the
same chunking and embedding placement as generation (:mod:`sumie.prompts.text_conditioning`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sumie.adapters.lora.names import default_targets, kohya_name
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.configs import ModelConfig
from sumie.errors import ConfigError
from sumie.models.clip import CLIPTextModel
from sumie.prompts.embeddings import Embedding, EmbeddingLibrary
from sumie.prompts.text_conditioning import _encode, _pad_after_eos, tokenize_prompt
from sumie.prompts.tokenizer import CLIPTokenizer

__all__ = ["LORA_PARTS", "LoRAAdapter", "LoRANetwork", "LoRASpec", "LoRAWrapped", "TextualInversion",
           "base_model_version", "lora_module_paths", "save_embedding", "save_lora"]

LORA_PARTS = ("attention", "ff", "conv", "text_encoder")  # what [lora] targets may name
_FF = ("ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class LoRASpec:
    """The network's shape: rank/alpha of Linear and 1x1 layers, conv_rank/conv_alpha of larger kernels (0 = none)."""

    rank: int = 8
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    targets: tuple[str, ...] = ("attention", "ff")


class LoRAAdapter(nn.Module):
    """The low-rank branch of one layer: ``lora_down`` [rank, in(, k, k)], ``lora_up`` [out, rank(, 1, 1)]."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ConfigError(f"LoRA on a grouped convolution ({base}) is not supported")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,  # type: ignore[arg-type]
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ConfigError(f"LoRA wraps Linear and Conv2d layers, not {type(base).__name__}")
        w = base.weight
        self.lora_down.to(device=w.device, dtype=torch.float32)
        self.lora_up.to(device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's LoRAModule init
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor on ``up @ down``."""
        return float(self.alpha) / self.rank

    def forward(self, x: Tensor) -> Tensor:
        """The branch's output ``up(down(x)) * alpha / rank`` (same shape as the base layer's)."""
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The weight change it makes: ``alpha / rank * up @ down`` in the base weight's shape (fp32)."""
        down, up = self.lora_down.weight.float(), self.lora_up.weight.float()
        if down.ndim == 2:
            return up @ down * self.scale
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale


class LoRAWrapped(nn.Module):
    """A frozen layer plus its LoRA branch: ``base(x) + adapter(x)`` (installed by a ModelPatcher object patch)."""

    def __init__(self, base: nn.Module, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out] (Linear) or [B, in, H, W] -> [B, out, H', W'] (Conv2d)."""
        y = self.base(x)
        return y + self.adapter(x).to(y.dtype)


def lora_module_paths(config: ModelConfig, targets: Iterable[str]) -> dict[str, list[str]]:
    """Component ("unet", "clip_l", ...) -> the module paths (Sumie layout) the chosen target parts wrap."""
    targets = list(targets)
    bad = [t for t in targets if t not in LORA_PARTS]
    if bad:
        raise ConfigError(f"[lora] targets: unknown part {bad[0]!r}; use some of {', '.join(LORA_PARTS)}")
    out: dict[str, list[str]] = {}
    unet: list[str] = []
    lora = default_targets(config, "unet", "lora")
    if "attention" in targets:
        unet += [p for p in lora if not p.endswith(_FF)]
    if "ff" in targets:
        unet += [p for p in lora if p.endswith(_FF)]
    if "conv" in targets:
        unet += default_targets(config, "unet", "conv")
    if unet:
        out["unet"] = unet
    if "text_encoder" in targets:
        for t in config.text_encoders:
            out[t.name] = default_targets(config, t.name, "lora")
    return out


class LoRANetwork(nn.Module):
    """The LoRA adapters of a model keyed by kohya name; ``state_dict()`` is the tensors of a kohya file."""

    def __init__(self, config: ModelConfig, modules: Mapping[str, nn.Module], spec: LoRASpec) -> None:
        super().__init__()
        self.config, self.spec = config, spec
        self.adapters = nn.ModuleDict()
        self.paths: dict[str, str] = {}  # kohya name -> patcher path ("unet.input_blocks.1.1.proj_in")
        for component, paths in lora_module_paths(config, spec.targets).items():
            root = modules[component]
            for path in paths:
                base = root.get_submodule(path)
                kxk = isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
                rank, alpha = (spec.conv_rank, spec.conv_alpha) if kxk else (spec.rank, spec.alpha)
                if rank == 0:
                    continue
                name = kohya_name(config, component, path)
                self.adapters[name] = LoRAAdapter(base, rank, alpha)
                self.paths[name] = f"{component}.{path}"
        if not self.adapters:
            raise ConfigError(f"[lora] targets {list(spec.targets)} with rank {spec.rank} / conv_rank "
                              f"{spec.conv_rank} select no layer; add targets or set a rank")

    def part(self, prefix: str) -> list[nn.Parameter]:
        """Parameters of the adapters whose kohya name starts with ``prefix`` (``lora_unet_``, ``lora_te``)."""
        return [p for name, a in self.adapters.items() if name.startswith(prefix) for p in a.parameters()]

    def install(self, patcher: ModelPatcher) -> None:
        """Describe one wrapper per adapter as object patches (apply with ``patcher.patch()``)."""
        for name, adapter in self.adapters.items():
            patcher.wrap_module(self.paths[name], lambda base, a=adapter: LoRAWrapped(base, a))

    def deltas(self) -> dict[str, Tensor]:
        """Patcher weight key -> the weight change of each adapter (for merging or comparing)."""
        return {f"{self.paths[n]}.weight": a.delta() for n, a in self.adapters.items()}  # type: ignore[union-attr]


def base_model_version(config: ModelConfig) -> str:
    """kohya's ``ss_base_model_version``: sd_v1, sd_v2 (``_v`` for v-prediction), sdxl_base_v1-0."""
    if config.family == "sd1":
        return "sd_v1"
    if config.family == "sd2":
        return "sd_v2" + ("_v" if config.prediction == "v" else "")
    return "sdxl_base_v1-0" if config.family == "sdxl" else config.family


def _hashes(tensors: Mapping[str, Tensor]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the safetensors bytes without metadata) and ``sshs_legacy_hash``."""
    from safetensors.torch import save

    data = save(dict(tensors))  # without metadata, as kohya's precalculate_safetensors_hashes
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # A1111's old hash: 64 KiB at offset 1 MiB
    return hashlib.sha256(data).hexdigest(), legacy


def save_lora(path: Path, network: LoRANetwork, *, dtype: torch.dtype, metadata: Mapping[str, str]) -> Path:
    """Write the network as a kohya ``.safetensors`` (``lora_down``/``lora_up``/``alpha`` per module), atomically."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in network.adapters.state_dict().items()}
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _hashes(tensors)
    save_safetensors_atomic(tensors, path, metadata=meta)
    return path


def lora_metadata(network: LoRANetwork, *, output_name: str, steps: int, lr: float, unet_lr: float | None,
                  text_encoder_lr: float | None, started: float, resolution: int, extra: Mapping[str, str]) -> dict:
    """kohya's ``ss_*`` training metadata (what A1111 and ComfyUI read: network module, dim, alpha, base model)."""
    s = network.spec
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(s.rank),
        "ss_network_alpha": _num(s.alpha),
        "ss_base_model_version": base_model_version(network.config),
        "ss_v2": str(network.config.family == "sd2"),
        "ss_output_name": output_name,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": _num(lr),
        "ss_unet_lr": _num(unet_lr if unet_lr is not None else lr),
        "ss_text_encoder_lr": _num(text_encoder_lr if text_encoder_lr is not None else lr),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_network_train_unet_only": str(not any(n.startswith("lora_te") for n in network.adapters)),
        "ss_network_args": json.dumps({"conv_dim": str(s.conv_rank), "conv_alpha": _num(s.conv_alpha)}
                                      if s.conv_rank else {}),
        "ss_training_comment": "trained by sumie",
        **extra,
    }
    return meta


def _num(x: float) -> str:
    return repr(float(x)) if float(x) != int(x) else str(int(x)) if abs(x) >= 1 else repr(float(x))


class TextualInversion(nn.Module):
    """Trainable token vectors for a new word: ``vectors[encoder name]`` [num_vectors, width]."""

    def __init__(self, name: str, config: ModelConfig, encoders: Sequence[CLIPTextModel], num_vectors: int,
                 init_word: str, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        if not tokenizer.encode(name):
            raise ConfigError(f"[train] embedding_name {name!r} has no tokens; use a word")
        ids = tokenizer.encode(init_word) if init_word else []
        if init_word and not ids:
            raise ConfigError(f"[train] init_word {init_word!r} has no tokens; use a word (or \"\" for zeros)")
        self.name, self.config = name, config
        self.vectors = nn.ParameterDict()
        for enc, te in zip(config.text_encoders, encoders, strict=True):
            table = te.text_model.embeddings.token_embedding.weight.detach().float()
            init = torch.zeros(num_vectors, enc.width, device=table.device)
            if ids:  # A1111's create_embedding: vector i <- token i * len(ids) // num_vectors of the init text
                emb = table[torch.tensor(ids, device=table.device)]
                for i in range(num_vectors):
                    init[i] = emb[i * len(ids) // num_vectors]
            self.vectors[enc.name] = nn.Parameter(init)
        self.tokenizer = tokenizer
        self.library = EmbeddingLibrary(config, tokenizer)
        self.library.add(Embedding(name, dict(self.vectors.items())))

    def encode(self, encoders: Sequence[CLIPTextModel], captions: Sequence[str]) -> Tensor:
        """Captions -> UNet context [B, 77, sum of widths] with the word's vectors placed as generation places them."""
        chunks = [tokenize_prompt(c, self.tokenizer, self.library)[0][0] for c in captions]  # one 77-token chunk
        parts = []
        for enc, te in zip(self.config.text_encoders, encoders, strict=True):
            device = te.text_model.embeddings.token_embedding.weight.device
            ids = _pad_after_eos([c.tokens for c in chunks], self.tokenizer.EOS, enc.pad_id)
            fixes = [[(off, self.vectors[enc.name]) for off, _ in c.fixes] for c in chunks]
            hidden, _ = _encode(te, torch.tensor(ids, device=device), fixes, enc.layer, enc.final_norm, False)
            parts.append(hidden)
        return torch.cat(parts, dim=-1)

    def tensors(self) -> dict[str, Tensor]:
        """The A1111 file's tensors: ``emb_params`` for one encoder, ``clip_l``/``clip_g`` for SDXL-type models."""
        vec = {k: v.detach().float().cpu().contiguous() for k, v in self.vectors.items()}
        if len(vec) == 1:
            return {"emb_params": next(iter(vec.values()))}
        return vec


def save_embedding(path: Path, ti: TextualInversion, *, steps: int, dtype: torch.dtype = torch.float32) -> Path:
    """Write an A1111 ``.safetensors`` embedding (loadable by :func:`~sumie.prompts.embeddings.load_embedding_file`)."""
    tensors = {k: v.to(dtype) for k, v in ti.tensors().items()}
    meta = {"sumie.embedding": json.dumps({"name": ti.name, "step": steps, "vectors": next(
        iter(tensors.values())).shape[0]})}
    save_safetensors_atomic(tensors, path, metadata=meta)
    return path

