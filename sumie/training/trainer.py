"""The training loop: ``Trainer(load_config("run.toml")).run()`` (``sumie train run.toml``).

One optimizer step = ``grad_accum`` micro-batches (AdamW, Loshchilov & Hutter 2019), global-norm clipping, the LR
schedule (linear warmup, then constant / cosine / linear decay) and an EMA update. ``what = "vae"`` trains an
AutoencoderKL (stage 1) and exports ``vae.safetensors`` with a data-derived latent scaling factor;
``what = "diffusion"`` trains the UNet (and the text encoder, jointly) on latents of that frozen VAE (stage 2)
and exports one single-file checkpoint in the original layout with the EMA weights.

Runs are resumable bit for bit: every random draw of a step comes from one generator (posterior sample, caption
dropout, timesteps, noise), the data order is a function of (seed, epoch, position), and a checkpoint stores all
of it (:mod:`sumie.training.state`). Ctrl-C finishes the current step, saves a checkpoint and returns
(``TrainResult.interrupted``); a second Ctrl-C stops at once (the last checkpoint stays valid, writes are atomic).

Under ``torchrun`` (``Trainer(dist=...)``, or an initialised default process group) the run is data-parallel
(:mod:`sumie.training.distributed`): each rank takes its part of every global batch, draws the whole batch's random
numbers and keeps its rows, and the gradients are summed over ranks before the optimizer step, so the result
equals a one-process run at the same ``batch_size`` up to float summation order. Rank 0 alone writes the log
(the global loss), checkpoints (with every rank's global RNG state), samples and the export.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sumie.configs import config_to_dict
from sumie.errors import ConfigError, SumieError
from sumie.models.vae import DiagonalGaussian
from sumie.training.build import TrainModels, build_models, export_vae, latent_scaling_factor
from sumie.training.config import TrainConfig
from sumie.training.data import (
    MASK_SUFFIX,
    Batch,
    BatchStream,
    FolderDataset,
    IndexedData,
    LatentCache,
    Sample,
    synthetic_dataset,
)
from sumie.training.distributed import Dist
from sumie.training.ema import EMA
from sumie.training.losses import (
    NoiseSchedule,
    diffusion_loss,
    foreground_weights,
    min_snr_weights,
    timestep_weights,
    vae_loss,
)
from sumie.training.state import (
    CHECKPOINT_DIR,
    capture_rng,
    find_checkpoint,
    list_checkpoints,
    load_state,
    restore_rng,
    save_state,
)

__all__ = ["Hook", "TrainResult", "Trainer", "TrainingError", "make_data"]

# hook(trainer, step, loss) after every completed optimizer step; raising KeyboardInterrupt stops like Ctrl-C
Hook = Callable[["Trainer", int, float], None]


class TrainingError(SumieError):
    """The run cannot continue (non-finite loss or gradients); the last good state is saved first."""


@dataclass
class TrainResult:
    """How a :meth:`Trainer.run` ended."""

    step: int
    interrupted: bool
    checkpoint: Path | None
    export: Path | None
    losses: list[float] = field(default_factory=list)  # loss of every step run in this session


def make_data(cfg: TrainConfig) -> IndexedData:
    """The run's dataset, fully checked (a :class:`~sumie.training.data.DataError` names what is wrong)."""
    d = cfg.data
    if d.folder is not None:
        return FolderDataset(d.folder, d.resolution, crop=d.crop, buckets=d.buckets, bucket_step=d.bucket_step,
                             bucket_max_ratio=d.bucket_max_ratio, caption_extension=d.caption_extension,
                             missing_captions=d.missing_captions)
    return synthetic_dataset(d.synthetic or {}, d.resolution)


def _lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based): linear warmup, then the decay."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


class Trainer:
    """A training run (see the module docstring). Data and models are checked and built in the constructor."""

    def __init__(self, cfg: TrainConfig, *, resume: str | Path | None = None, hooks: Sequence[Hook] = (),
                 progress: bool | None = None, data: IndexedData | None = None, dist: Dist | None = None) -> None:
        self.dist = dist if dist is not None else Dist.current(torch.device(cfg.train.device))
        if self.dist is not None and cfg.train.device.startswith("cuda"):  # one GPU per rank: cuda:LOCAL_RANK
            cfg = replace(cfg, train=replace(cfg.train, device=f"cuda:{torch.cuda.current_device()}"))
        self.cfg = cfg
        t = cfg.train
        self.out = Path(cfg.output.dir)
        self.hooks = list(hooks)
        self.is_main = self.dist is None or self.dist.is_main
        self.show_progress = (progress if progress is not None else cfg.output.progress) if self.is_main else False
        if resume is None and list_checkpoints(self.out):
            raise ConfigError(f"{self.out} already holds checkpoints of a run; continue it with --resume "
                              f"(Trainer(resume=...)) or set another [output] dir")
        self.data = data if data is not None else make_data(cfg)
        self.models: TrainModels = build_models(cfg)
        factor = self.models.vae.downscale
        sizes = {s for i in range(len(self.data)) for s in [self.data.bucket_of(i)]}
        bad = sorted(s for s in sizes if s[0] % factor or s[1] % factor)
        if bad:
            raise ConfigError(f"image size {bad[0][0]}x{bad[0][1]} is not a multiple of the VAE's {factor}x "
                              f"downscale; set [data] resolution (and bucket_step) to multiples of {factor}")
        self.device = torch.device(t.device)
        self.what = t.what
        self.generator = torch.Generator().manual_seed(t.seed)
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        self.stream = BatchStream(self.data, t.batch_size, t.seed, shuffle=cfg.data.shuffle, flip=cfg.data.flip,
                                  num_workers=cfg.data.num_workers, rank=rank, world_size=world)
        if self.stream.smallest_batch() < world:
            raise ConfigError(f"{world} processes need batches of at least {world} images, but a batch holds "
                              f"{self.stream.smallest_batch()} ([train] batch_size, or a bucket with fewer images); "
                              "raise batch_size, add images or run fewer processes")
        # an adapter is trained on its checkpoint's schedule: zero terminal SNR when the file says so
        self.zero_terminal_snr = t.zero_terminal_snr or (bool(self.models.adapters) and self.models.zero_terminal_snr)
        self.schedule = NoiseSchedule.sd(zero_terminal_snr=self.zero_terminal_snr)
        self.timestep_weights = timestep_weights(self.schedule.num_steps, t.timestep_bias_strategy,
                                                 t.timestep_bias_portion, t.timestep_bias_multiplier,
                                                 t.timestep_bias_begin, t.timestep_bias_end)
        if self.zero_terminal_snr and self.models.config.prediction != "v":
            raise ConfigError("[train] zero_terminal_snr needs v-prediction (eps is undefined at zero SNR); "
                              "set [train] prediction = \"v\"")
        if t.foreground_weight != 1 and not getattr(self.data, "has_masks", lambda: False)():
            raise ConfigError("[train] foreground_weight needs masks: the synthetic shapes have them; for a folder "
                              f"put a {MASK_SUFFIX} beside each image (white = subject), or remove foreground_weight")
        self._masks: dict[tuple[int, bool, int], Tensor] = {}  # latent-size masks, a pure function of the key
        self.tokenizer: Any = None
        self._token_cache: dict[tuple[str, int], list[int]] = {}
        if self.what != "vae":
            from sumie.prompts.tokenizer import CLIPTokenizer

            self.tokenizer = CLIPTokenizer()
        groups = self.models.param_groups(t.lr, t.unet_lr, t.text_encoder_lr)
        self.started = time.time()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.adam_eps,
                                           weight_decay=t.weight_decay, fused=True)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, t.warmup_steps, t.steps, t.lr_schedule))
        self.ema = EMA(self.params, t.ema_decay, t.ema_start, t.ema_warmup) if t.ema_decay > 0 else None
        self.step = 0
        self.latents: LatentCache | None = None
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self._stop = False
        self._committing = False
        self._loss_avg: float | None = None
        if resume is not None:
            self.load_checkpoint(find_checkpoint(Path(resume)))
        if self.dist is not None:  # every rank starts from rank 0's weights (as DDP does)
            self.dist.broadcast_([v for m in self.models.trainable().values() for v in m.state_dict().values()])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_checkpoint` needs to continue exactly."""
        return {
            "step": self.step,
            "what": self.what,
            "config_text": self.cfg.text,
            "model_config": config_to_dict(self.models.config),
            "sources": self._sources(),
            "modules": {name: m.state_dict() for name, m in self.models.trainable().items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": capture_rng(),
            "rng_ranks": self.dist.gather(capture_rng()) if self.dist is not None else [],
            "data": self.stream.state_dict(),
        }

    def _sources(self) -> dict[str, str]:
        out = {}
        for key, path in self.models.sources.items():
            p = Path(path)
            size = p.stat().st_size if p.is_file() else 0
            out[key] = f"{p.name}:{size}"
        return out

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (atomic; the oldest beyond ``keep_checkpoints`` are removed).

        Data-parallel: every rank calls it at the same step (the RNG states are gathered); rank 0 writes.
        """
        info = {"step": self.step, "what": self.what, "loss": self._loss_avg, "time": time.time()}
        state = self.state_dict()
        if self.is_main:
            path = save_state(self.out, self.step, state, self.cfg.output.keep_checkpoints, info)
        else:
            path = self.out / CHECKPOINT_DIR / f"step_{self.step:08d}"
        self.last_checkpoint, self._saved_step = path, self.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a checkpoint folder; its model and stage must match this config."""
        state = load_state(path)
        if state["what"] != self.what:
            raise ConfigError(f"{path} is a what = {state['what']!r} checkpoint; this config trains {self.what!r}")
        mine = config_to_dict(self.models.config)
        if state["model_config"] != mine:
            diff = sorted(k for k in mine if mine[k] != state["model_config"].get(k))
            raise ConfigError(f"{path}: the checkpoint's model differs from the config's ({', '.join(diff)}); "
                              "resume with the config the run was started with")
        if state["sources"] != self._sources():
            raise ConfigError(f"{path}: init_from/vae_from changed since the checkpoint ({state['sources']} -> "
                              f"{self._sources()}); resume with the same files")
        trainable = self.models.trainable()
        if set(state["modules"]) != set(trainable):
            raise ConfigError(f"{path}: the checkpoint trains {sorted(state['modules'])}, this config "
                              f"{sorted(trainable)}; keep train_text_encoder as it was")
        for name, module in trainable.items():
            module.load_state_dict(state["modules"][name])
        if (state["ema"] is None) != (self.ema is None):
            raise ConfigError(f"{path}: ema_decay was {'off' if state['ema'] is None else 'on'} in the checkpoint; "
                              "keep it as it was")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        ranks = state.get("rng_ranks") or []
        rank = self.dist.rank if self.dist is not None else 0
        # the global RNGs of this rank when the world size is unchanged (no training draw uses them)
        restore_rng(ranks[rank] if len(ranks) == (self.dist.world_size if self.dist else 1) else state["rng"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.last_checkpoint, self._saved_step = path, self.step

    def _snapshot(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rng": capture_rng(), "data": self.stream.state_dict()}

    def _restore(self, snap: dict[str, Any]) -> None:
        self.generator.set_state(snap["generator"])
        restore_rng(snap["rng"])
        self.stream.load_state_dict(snap["data"])

    # ---------------------------------------------------------------- one step
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def _tokens(self, captions: list[str], pad_id: int) -> Tensor:
        rows = []
        for c in captions:
            key = (c, pad_id)
            ids = self._token_cache.get(key)
            if ids is None:
                if len(self._token_cache) > 200_000:
                    self._token_cache.clear()
                ids = self.tokenizer.pad_sequence(self.tokenizer.encode(c), pad_id)
                self._token_cache[key] = ids
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def encode_text(self, captions: list[str]) -> Tensor:
        """Captions -> UNet context [B, 77, sum of widths], as the engine encodes a plain prompt (clip skip 1)."""
        grad = self.models.text_grad and torch.is_grad_enabled()
        ti = self.models.embedding
        if ti is not None:
            with torch.set_grad_enabled(grad):
                return ti.encode(self.models.text_encoders, captions)
        parts = []
        for te, tcfg in zip(self.models.text_encoders, self.models.config.text_encoders, strict=True):
            with torch.set_grad_enabled(grad):
                hidden, _ = te(self._tokens(captions, tcfg.pad_id), layer=tcfg.layer, final_norm=tcfg.final_norm,
                               need_pooled=False)
            parts.append(hidden)
        return torch.cat(parts, dim=-1)

    def _rows(self, draw: Tensor, offset: int, n: int) -> Tensor:
        """This rank's rows of a draw made for the whole global batch (all of it in one process)."""
        return draw[offset:offset + n]

    def _posterior_sample(self, post: DiagonalGaussian, offset: int, total: int) -> Tensor:
        """z = mean + std * eps (as :meth:`DiagonalGaussian.sample`), eps drawn for the global batch, our rows."""
        n = post.mean.shape[0]
        eps = torch.randn((total, *post.mean.shape[1:]), generator=self.generator, dtype=torch.float32)
        eps = self._rows(eps, offset, n).to(device=post.mean.device, dtype=post.mean.dtype)
        return post.mean + post.std * eps

    def _diffusion_loss(self, samples: list[Sample], images: Tensor | None, captions: list[str], offset: int = 0,
                        total: int | None = None) -> tuple[Tensor, dict[str, float]]:
        """Loss of rows ``offset ..`` of a global batch of ``total`` (default: the batch is all of it)."""
        vae, g = self.models.vae, self.generator
        n = len(samples)
        total = n if total is None else total
        with torch.no_grad():
            if self.latents is not None:
                z = self.latents.sample(samples, g, offset, total).to(self.device)
            else:
                assert images is not None
                with self._autocast():
                    post = vae.encode(images.to(self.device))
                z = self._posterior_sample(post, offset, total).float()
            x0 = vae.scale_latents(z)
        p = self.cfg.data.caption_dropout
        if p > 0:
            drop = self._rows(torch.rand(total, generator=g) < p, offset, n).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        t = self._rows(self.schedule.sample_timesteps(total, g, self.timestep_weights), offset, n)
        noise = self._rows(torch.randn((total, *x0.shape[1:]), generator=g, dtype=torch.float32), offset, n)
        noise = noise.to(self.device)
        x_t = self.schedule.add_noise(x0, noise, t.to(self.device))
        prediction = self.models.config.prediction
        target = self.schedule.target(x0, noise, t, prediction)
        weights = None
        if self.cfg.train.min_snr_gamma > 0:
            weights = min_snr_weights(self.schedule.snr(t), self.cfg.train.min_snr_gamma, prediction)
        pixel_weights = None
        if self.cfg.train.foreground_weight != 1:
            mask = self._latent_masks(samples, (x0.shape[-2], x0.shape[-1]))
            pixel_weights = foreground_weights(mask, self.cfg.train.foreground_weight).to(self.device)
        with self._autocast():
            context = self.encode_text(captions)
            pred = self.models.unet(x_t, t.to(self.device), context)  # type: ignore[misc]
        return diffusion_loss(pred, target, weights, pixel_weights), {}

    def _latent_masks(self, samples: list[Sample], size: tuple[int, int]) -> Tensor:
        """Subject masks of a batch area-averaged to latent size: [B, 1, h, w] in [0, 1] (zeros without a mask)."""
        crop_matters = self.cfg.data.crop == "random"
        out = []
        for s in samples:
            key = (s.index, s.flip, s.crop_seed if crop_matters else 0)
            m = self._masks.get(key)
            if m is None:
                full = self.data.load_mask(s.index, s.flip, s.crop_seed)
                m = (torch.zeros(1, *size) if full is None
                     else torch.nn.functional.adaptive_avg_pool2d(full.float(), size))
                if not crop_matters:
                    self._masks[key] = m
            out.append(m)
        return torch.stack(out)

    def _vae_loss(self, images: Tensor, offset: int = 0, total: int | None = None) -> tuple[Tensor, dict[str, float]]:
        t = self.cfg.train
        x = images.to(self.device)
        with self._autocast():
            with torch.set_grad_enabled(t.train_vae_encoder):
                post = self.models.vae.encode(x)
            recon = self.models.vae.decode(self._posterior_sample(post, offset, len(x) if total is None else total))
        return vae_loss(x, recon, post, kl_weight=t.kl_weight, recon_kind=t.recon, edge_weight=t.edge_weight,
                        multiscale_weight=t.multiscale_weight)

    def _micro_batch(self) -> tuple[Tensor, dict[str, float], float]:
        """Loss of this rank's part of the next global batch, its parts, and its share of the batch (1 alone)."""
        if self.latents is not None:
            everything = self.stream.next_samples()
            lo, hi = self.stream.span(len(everything))
            samples = everything[lo:hi]
            loss, parts = self._diffusion_loss(samples, None, [self.latents.caption(s) for s in samples], lo,
                                               len(everything))
            return loss, parts, (hi - lo) / len(everything)
        batch: Batch = next(self.stream)
        if self.what == "vae":
            loss, parts = self._vae_loss(batch.images, batch.offset, batch.total)
        else:
            loss, parts = self._diffusion_loss(batch.samples, batch.images, batch.captions, batch.offset, batch.total)
        return loss, parts, len(batch.samples) / batch.total

    def _check_loss(self, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(f"the loss is {value} at step {self.step + 1}; lower [train] lr, set grad_clip or "
                                "turn off bf16")

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches: (mean loss, loss parts of the last micro-batch).

        Every loss here is a mean of per-image terms of equal size, so weighting a rank's loss by its share of the
        global batch and summing gradients over ranks gives the global batch's gradient.
        """
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = 0.0, {}
        for _ in range(t.grad_accum):
            loss, parts, share = self._micro_batch()
            value = float(loss.detach())
            if self.dist is None:
                self._check_loss(value)
            if loss.requires_grad:  # not when nothing trained took part (an embedding's word dropped everywhere)
                (loss * share / t.grad_accum).backward()
            total += value * share
            parts = {k: v * share for k, v in parts.items()}
        if self.dist is not None:  # the global loss and gradients; every rank decides alike from here on
            keys = sorted(parts)
            summed = self.dist.sum([total, *(parts[k] for k in keys)])
            total, parts = summed[0], dict(zip(keys, summed[1:], strict=True))
            self._check_loss(total)
            self.dist.all_reduce_grads(self.params)
        if t.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip, foreach=True))
        else:
            norms = [p.grad.detach().norm() for p in self.params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if not math.isfinite(norm):
            raise TrainingError(f"the gradient norm is {norm} at step {self.step + 1}; lower [train] lr or turn off "
                                "bf16")
        self._committing = True
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.step + 1)
        self._committing = False
        return total / t.grad_accum, {**parts, "grad_norm": norm}

    # ---------------------------------------------------------------- the loop
    def prepare(self) -> None:
        """Work before the first step: the latent cache (diffusion with ``cache_latents``)."""
        if self.what == "vae" or not self.cfg.data.cache_latents or self.latents is not None:
            return
        if self.cfg.data.crop == "random":
            raise ConfigError("[data] cache_latents needs crop = \"center\" (a random crop changes every epoch)")
        import hashlib

        h = hashlib.sha256(self.data.describe().encode())
        for v in self.models.vae.state_dict().values():
            h.update(v.detach().cpu().float().numpy().tobytes())
        h.update(str(self.cfg.data.flip).encode())
        path = self.out / "latents.pt"
        self.latents = LatentCache.load(path, h.hexdigest())
        if self.latents is None:  # data-parallel: each rank builds the same cache (no wait on rank 0), rank 0 saves
            self.latents = LatentCache.build(self.data, self.models.vae, self.cfg.data.flip,
                                             self.cfg.train.batch_size, h.hexdigest(), bool(self._bar_enabled()))
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                self.latents.save(path)

    def _bar_enabled(self) -> bool:
        return self.show_progress if self.show_progress is not None else sys.stderr.isatty()

    @contextlib.contextmanager
    def _sigint(self) -> Iterator[None]:
        """First Ctrl-C: stop after the current step (and save); second: KeyboardInterrupt at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        first = [0.0]

        def handler(signum: int, frame: object) -> None:
            # under torchrun one Ctrl-C arrives twice (from the terminal and from the agent): 2 s make one press
            if self._stop and (self.dist is None or time.monotonic() - first[0] > 2.0):
                raise KeyboardInterrupt
            if not self._stop:
                first[0] = time.monotonic()
                if self.is_main:
                    print("\nsumie: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr)
            self._stop = True

        def terminate(signum: int, frame: object) -> None:  # torchrun's agent may stop its workers with SIGTERM
            self._stop = True

        old = signal.signal(signal.SIGINT, handler)
        old_term = signal.signal(signal.SIGTERM, terminate) if self.dist is not None else None
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)

    def _should_stop(self) -> bool:
        """Whether a stop was asked for (Ctrl-C, SIGTERM, a hook): on any rank, agreed by all of them."""
        if self.dist is None:
            return self._stop
        return self.dist.sum([float(self._stop)])[0] > 0

    def _log_path(self) -> Path:
        return self.out / "loss.jsonl"

    def _trim_log(self) -> None:
        """Drop log lines of steps after the current one (written before a crash, redone after resume)."""
        p = self._log_path()
        if not p.is_file():
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        p.write_text("".join(k + "\n" for k in keep))

    def run(self) -> TrainResult:
        """Train to ``[train] steps``; returns how it ended (Ctrl-C: ``interrupted`` with a fresh checkpoint)."""
        from tqdm.auto import tqdm

        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.text and self.is_main:
            (self.out / "config.toml").write_text(cfg.text)
        self.prepare()
        if self.is_main:
            self._trim_log()
        losses: list[float] = []
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {self.what}", disable=not self._bar_enabled(),
                   dynamic_ncols=True)
        log = self._log_path().open("a") if self.is_main else None
        window: list[float] = []
        interrupted = agreed_stop = False
        try:
            with self._sigint():
                while True:
                    if self._should_stop():
                        agreed_stop = True
                        raise KeyboardInterrupt
                    if self.step >= t.steps:
                        break
                    snap = self._snapshot()
                    t0 = time.perf_counter()
                    try:
                        loss, parts = self.train_step()
                    except BaseException as e:
                        if self._committing:
                            raise
                        self._restore(snap)  # the step did not happen: continue/save from its start
                        # data-parallel: only a failure every rank saw (the global loss / norm) saves together
                        agreed = isinstance(e, TrainingError) or (self.dist is None and isinstance(e, SumieError))
                        if agreed and self.step > self._saved_step:
                            self.save_checkpoint()
                        raise
                    dt = time.perf_counter() - t0
                    self.step += 1
                    losses.append(loss)
                    window.append(loss)
                    self._loss_avg = loss if self._loss_avg is None else 0.9 * self._loss_avg + 0.1 * loss
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{self._loss_avg:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                    if self.step % cfg.output.log_every == 0 or self.step == t.steps:
                        if log is not None:
                            rec = {"step": self.step, "loss": loss, "avg": sum(window) / len(window), "lr": lr,
                                   "sec": round(dt, 4), **{k: v for k, v in parts.items()}}
                            log.write(json.dumps(rec) + "\n")
                            log.flush()
                        window = []
                    try:
                        for hook in self.hooks:
                            hook(self, self.step, loss)
                    except KeyboardInterrupt:  # stop after this step; every rank learns of it at the loop's top
                        self._stop = True
                    if cfg.output.checkpoint_every and self.step % cfg.output.checkpoint_every == 0:
                        self.save_checkpoint()
                    if cfg.output.sample_every and self.step % cfg.output.sample_every == 0 and self.is_main:
                        self.write_samples()
        except KeyboardInterrupt:
            interrupted = True
            if not self._committing and self.step > self._saved_step and (self.dist is None or agreed_stop):
                self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if interrupted:
            return TrainResult(self.step, True, self.last_checkpoint, None, losses)
        if self.step > self._saved_step:
            self.save_checkpoint()
        if cfg.output.sample_every and self.step % cfg.output.sample_every != 0 and self.is_main:
            self.write_samples()
        export = self.export() if self.is_main else None
        if self.dist is not None:  # every rank returns once the files are written, with rank 0's path
            export = self.dist.gather(export)[0]
        assert export is not None
        self.models.release()  # LoRA wrappers out: the networks are the checkpoint's again
        return TrainResult(self.step, False, self.last_checkpoint, export, losses)

    # ---------------------------------------------------------------- samples and export
    def _averaged(self) -> contextlib.AbstractContextManager[None]:
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def write_samples(self) -> list[Path]:
        """Sample images of the current (EMA) weights under ``samples/``; training state is left untouched."""
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        modules = list(self.models.all().values())
        with self._averaged(), torch.random.fork_rng(devices=[]):
            for m in modules:
                m.eval()
            try:
                images = self._sample_images()
            finally:
                for name, m in self.models.all().items():
                    m.train(name in self.models.trainable())
        grid = _grid(images, columns=len(images) // 2 if self.what == "vae" else len(images))
        path = folder / f"step_{self.step:08d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        grid.save(tmp, format="PNG")
        tmp.replace(path)
        return [path]

    def _sample_images(self) -> list[Image.Image]:
        if self.what == "vae":
            n = min(8, len(self.data))
            x = torch.stack([self.data.load(i)[0] for i in range(n)
                             if self.data.bucket_of(i) == self.data.bucket_of(0)])
            recon = self.models.vae.decode(self.models.vae.encode(x.to(self.device)).mode()).float().cpu()
            return [_to_image(v) for v in (*x, *recon)]
        engine = self.engine()
        from sumie.pipelines.params import GenerationParams

        o, res = self.cfg.output, self.cfg.data.resolution
        prompts = o.sample_prompts or [self.data.load(i)[1] for i in range(min(4, len(self.data)))]
        out = []
        for k, prompt in enumerate(prompts):
            params = GenerationParams(prompt=prompt, steps=o.sample_steps, cfg_scale=o.sample_cfg,
                                      sampler=o.sample_sampler, seed=o.sample_seed + k, width=res, height=res)
            out.extend(engine.generate(params).images)
        return out

    def engine(self) -> Any:
        """A generation :class:`~sumie.pipelines.engine.Engine` over the live modules (wrap in EMA swap yourself)."""
        from sumie.checkpoints.loader import StableDiffusionModels
        from sumie.pipelines.engine import Engine

        m = self.models
        if m.unet is None:
            raise ConfigError("a VAE run has no UNet to generate with")
        sd = StableDiffusionModels(config=m.config, unet=m.unet, vae=m.vae, text_encoders=m.text_encoders,
                                   source=str(self.out / f"step_{self.step}"), prediction_source="training",
                                   zero_terminal_snr=self.zero_terminal_snr)
        ti = m.embedding
        engine = Engine(sd, tokenizer=self.tokenizer, embeddings=ti.library if ti is not None else None)
        engine.show_progress = False
        return engine

    def export(self) -> Path:
        """Write the final model (EMA weights): a single-file checkpoint, or ``vae.safetensors`` for a VAE run."""
        o, m = self.cfg.output, self.models
        meta = {"sumie.training": json.dumps({"steps": self.step, "what": self.what, "config": self.cfg.source}),
                "sumie.resolution": str(self.cfg.data.resolution)}  # the size it was trained at
        if o.cfg_scale is not None:
            meta["sumie.cfg_scale"] = repr(float(o.cfg_scale))  # the engine's default CFG for this model
        with self._averaged(), torch.no_grad():
            if self.what in ("lora", "embedding"):
                return self._export_adapter()
            if self.what == "vae":
                path = self.out / (o.export if o.export != "model.safetensors" else "vae.safetensors")
                if ("scaling_factor" not in self.cfg.model.vae and "init_from" not in m.sources
                        and self.cfg.train.train_vae_encoder):  # a new latent space: measure its scale
                    m.vae.config = replace(m.vae.config, scaling_factor=self._estimate_scaling())
                    m.config = replace(m.config, vae=m.vae.config)
                export_vae(path, m.vae, meta)
            else:
                from sumie.checkpoints.save import save_single_file

                path = self.out / o.export
                save_single_file(path, m.config, m.unet, m.vae, m.text_encoders, extra_metadata=meta,  # type: ignore
                                 dtype=getattr(torch, o.export_dtype),
                                 zero_terminal_snr=self.cfg.train.zero_terminal_snr)
        return path

    def _export_adapter(self) -> Path:
        """Write the LoRA (kohya layout, ``ss_*`` metadata) or the embedding (A1111 layout) of the run."""
        from sumie.training.adapters import lora_metadata, save_embedding, save_lora

        o, t, m = self.cfg.output, self.cfg.train, self.models
        dtype = getattr(torch, o.export_dtype)
        if m.embedding is not None:
            return save_embedding(self.out / f"{t.embedding_name}.safetensors", m.embedding, steps=self.step,
                                  dtype=dtype)
        assert m.lora is not None
        path = self.out / (o.export if o.export != "model.safetensors" else "lora.safetensors")
        base = Path(m.sources.get("init_from", ""))
        extra = {"ss_sd_model_name": base.name, "ss_num_train_images": str(len(self.data)),
                 "ss_batch_size_per_device": str(t.batch_size), "ss_gradient_accumulation_steps": str(t.grad_accum),
                 "ss_lr_scheduler": t.lr_schedule, "ss_lr_warmup_steps": str(t.warmup_steps),
                 "ss_seed": str(t.seed), "ss_zero_terminal_snr": str(self.zero_terminal_snr),
                 "ss_v_parameterization": str(m.config.prediction == "v"),
                 "ss_min_snr_gamma": repr(t.min_snr_gamma) if t.min_snr_gamma else "None",
                 "sumie.training": json.dumps({"steps": self.step, "what": self.what, "config": self.cfg.source})}
        meta = lora_metadata(m.lora, output_name=path.stem, steps=self.step, lr=t.lr, unet_lr=t.unet_lr,
                             text_encoder_lr=t.text_encoder_lr, started=self.started,
                             resolution=self.cfg.data.resolution, extra=extra)
        return save_lora(path, m.lora, dtype=dtype, metadata=meta)

    def _estimate_scaling(self) -> float:
        """1 / std of latents over up to 8 batches of the first epoch's order (deterministic)."""
        stream = BatchStream(self.data, self.cfg.train.batch_size, self.cfg.train.seed, shuffle=self.cfg.data.shuffle)
        batches = [next(stream).images.to(self.device) for _ in range(min(8, len(stream.batches_of(0))))]
        self.models.vae.eval()
        return latent_scaling_factor(self.models.vae, batches)


def _to_image(x: Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image (A1111's truncation)."""
    arr = (255 * ((x.float().clamp(-1, 1) + 1) / 2)).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size tiled left to right, top to bottom."""
    columns = max(1, columns)
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (w * columns, h * rows), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % columns) * w, (k // columns) * h))
    return grid
