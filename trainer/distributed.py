"""Data-parallel training under torchrun: process group, gradient averaging, rank-0 I/O.

The training loops run unchanged on one process or under
``torchrun --nproc_per_node N`` (one process per device; gloo on CPU, NCCL on GPU).
Multi-node works the same way through torchrun's rendezvous, e.g. on each of 2 nodes::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 --rdzv_id RUN -m deeprecon.trainer.cli gan ...

Gradients are averaged explicitly with :func:`all_reduce_grads` after each backward
(as stylegan2-ada does) instead of wrapping the networks in DistributedDataParallel:
a GAN step switches between networks and lazy regularisation passes, which
DDP's bucketed hooks handle poorly. Every rank starts from rank 0's parameters
(:func:`broadcast_module`) and applies the same averaged gradients, so the replicas
stay identical; only rank 0 writes checkpoints, samples and logs.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deeprecon.runtime.errors import UnavailableError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; an error naming what is missing when CUDA
    is asked for and not there (no silent fallback to the CPU)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UnavailableError(
                f"device {device!r} asked for, but this torch has no usable CUDA "
                f"(torch {torch.__version__}, cuda {torch.version.cuda})",
                hint="use --device cpu, or install a CUDA build of torch on a GPU machine")
        d = torch.device(device)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UnavailableError(f"{device} asked for, but only "
                                   f"{torch.cuda.device_count()} CUDA device(s) are visible")
        return d
    raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1),
    else run as a single process. On CUDA each rank takes ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce).
    A parameter without a gradient on this step contributes zeros."""
    if not info.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over the ranks (in place; returned)."""
    if info.distributed:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) along dim 0 over the ranks, in rank
    order."""
    if not info.distributed:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)




def decorrelate_rng(seed: int, info: DistInfo) -> None:
    """After every rank has built identical networks from ``seed``, give each rank > 0
    a random stream of its own (latent samples, augmentation); rank 0 keeps the stream a
    single process would have."""
    if info.rank > 0:
        torch.manual_seed(seed + 7919 * info.rank)


def gather_rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, for rank 0's checkpoint (a collective: call on all
    ranks). Empty for a single process (the checkpoint stores its RNG anyway)."""
    if not info.distributed:
        return {}
    out = {}
    states = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(info.device)
    for name, state in states.items():
        gathered = all_gather_cat(state[None].to(info.device), info).cpu()  # [W, n]
        for r in range(info.world_size):
            out[f"rank_rng.{name}.{r}"] = gathered[r]
    return out


def restore_rng_states(tensors, info: DistInfo) -> None:
    """Set this rank's RNG states from :func:`gather_rng_states`'s tensors (a resumed
    distributed run; the same world size is required)."""
    if not info.distributed:
        return
    key = f"rank_rng.cpu.{info.rank}"
    if key not in tensors or f"rank_rng.cpu.{info.world_size}" in tensors:
        raise UsageError("--resume: the checkpoint was written with another number of ranks",
                         hint="resume with the same torchrun --nproc_per_node")
    torch.set_rng_state(tensors[key])
    if info.device.type == "cuda" and f"rank_rng.cuda.{info.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank_rng.cuda.{info.rank}"], info.device)


__all__ = ["DistInfo", "resolve_device", "init_distributed", "shutdown", "barrier",
           "broadcast_module", "all_reduce_grads", "all_reduce_sum", "all_gather_cat",
           "decorrelate_rng", "gather_rng_states", "restore_rng_states"]
