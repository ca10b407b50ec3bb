"""Data-parallel training over processes started by ``torchrun`` (gloo on CPU, NCCL on CUDA).

Every rank computes the same global batch order (:class:`~sumie.training.data.BatchStream`, a function of seed,
epoch and position) and the same random draws for the whole global batch (one generator, same seed on every
rank), then works on its contiguous part of each batch (:func:`shard_span`). The loss of a part is weighted by its
share of the batch, the accumulated gradients are summed over ranks with one all-reduce per optimizer step (what
DDP's averaging does, with the same "no gradient" semantics as one process), so every rank takes the same
optimizer step and a run on N processes equals a run on one at the same global batch up to float summation order.

The process group is the only global state: :func:`process_group` creates it from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and destroys it on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sumie.errors import ConfigError
from sumie.training.data import shard_span

__all__ = ["Dist", "DistEnv", "dist_env", "process_group", "shard_span"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_BUCKET = 1 << 24  # gradient elements per all-reduce (64 MiB of fp32)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The torchrun environment of this process, or None when it was not started by torchrun (or world size 1)."""
    env = os.environ if environ is None else environ
    present = [k for k in _ENV if k in env]
    if not present:
        return None
    missing = [k for k in _ENV if k not in env]
    if missing:
        raise ConfigError(f"distributed training needs {', '.join(_ENV)} in the environment; {', '.join(missing)} "
                          "missing: start it with torchrun --nproc_per_node N -m sumie train CONFIG")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {env['RANK']!r}, "
                          f"{env['WORLD_SIZE']!r}, {env['LOCAL_RANK']!r}") from None
    if not (0 <= rank < world and local >= 0):
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return DistEnv(rank, world, local) if world > 1 else None


class Dist:
    """Collectives the trainer needs, over one process group (CPU tensors on gloo, ``device`` tensors on NCCL)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, group: Any = None) -> None:
        self.rank, self.world_size, self.device, self.group = rank, world_size, device, group

    @classmethod
    def current(cls, device: torch.device) -> Dist | None:
        """The default process group (if one is initialised with more than one rank) as a Dist."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), comm)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files)."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a float64 vector."""
        x = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(x, group=self.group)
        return x.tolist()

    def all_reduce_grads(self, params: Sequence[Tensor]) -> None:
        """Sum gradients over ranks in place; a parameter without a gradient on every rank keeps ``grad = None``."""
        flags = self.sum([float(p.grad is not None) for p in params])
        live = [p for p, f in zip(params, flags, strict=True) if f > 0]
        for p in live:
            if p.grad is None:  # unused here, used on another rank: contributes zeros
                p.grad = torch.zeros_like(p)
        bucket: list[Tensor] = []
        size = 0
        for p in live:
            bucket.append(p.grad)  # type: ignore[arg-type]
            size += p.numel()
            if size >= _BUCKET:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[Tensor]) -> None:
        by_type: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for g in grads:
            by_type.setdefault((g.dtype, g.device), []).append(g)
        for group in by_type.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            comm = flat.to(self.device)
            dist.all_reduce(comm, group=self.group)
            k = 0
            for g in group:
                g.copy_(comm[k:k + g.numel()].view_as(g))
                k += g.numel()

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values (models start identical on every rank)."""
        for t in tensors:
            own = t.detach()
            buf = own.to(self.device)
            dist.broadcast(buf, src=0, group=self.group)
            if buf.data_ptr() != own.data_ptr():  # NCCL with a CPU tensor: copied there and back
                own.copy_(buf)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistEnv | None]:
    """Initialise the default process group from torchrun's environment (if any) and destroy it on exit.

    NCCL for a CUDA device (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Yields the environment, or None
    outside torchrun (nothing is initialised then).
    """
    env = dist_env()
    if env is None:
        yield None
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run sumie train without torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= env.local_rank:
            raise ConfigError(f"[train] device = {device!r} under torchrun needs a GPU per process (LOCAL_RANK "
                              f"{env.local_rank}); set --nproc_per_node to the number of GPUs or device = \"cpu\"")
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            **({"device_id": torch.device("cuda", env.local_rank)} if cuda else {}))
    try:
        yield env
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank reaches teardown before any closes its connections: a rank that tears down gloo while a peer
    # still talks to it aborts the process (std::terminate, SIGABRT), seen about once in 30 CI runs
    dist.barrier()
    dist.destroy_process_group()
