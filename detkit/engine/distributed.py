"""Helpers for data-parallel training under ``torchrun``.

detkit has no launcher of its own: start several processes with
``torchrun --nproc_per_node N tools/train_det.py ...`` (or
``python -m torch.distributed.run``). Each process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment; :func:`init_distributed`
joins the process group (NCCL on CUDA, Gloo on CPU). Without those variables
everything here degrades to single-process no-ops.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = [
    "batch_size_per_process",
    "broadcast_buffers",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "select_device",
    "reduce_dict",
    "all_gather_object",
    "broadcast_object",
    "unwrap_model",
]


def is_distributed() -> bool:
    """True when a process group with more than zero members is initialized."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank of this process on its machine (``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0; only rank 0 writes files and prints progress."""
    return get_rank() == 0


def select_device(prefer_cuda: bool = True) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (and wanted), else ``cpu``."""
    if prefer_cuda and torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None, timeout_min: int = 30) -> torch.device:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 and return this process's device.

    The backend is NCCL when the device is CUDA, Gloo otherwise. Calling it twice is harmless.
    """
    device = device if device is not None else select_device()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not is_distributed():
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "WORLD_SIZE > 1 but RANK/MASTER_ADDR are unset: start multi-process runs with torchrun"
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min))
    return device


def destroy_distributed() -> None:
    """Leave the process group (end of a torchrun job)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def reduce_dict(values: Mapping[str, torch.Tensor | float], average: bool = True) -> dict[str, float]:
    """All-reduce a dict of scalars (e.g. losses, for logging) and return plain floats.

    Every process must pass the same keys. The result is the mean (or sum) over processes.
    """
    keys = sorted(values)
    if not keys:
        return {}
    vec = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float64).detach().reshape(()).cpu() for k in keys]
    )
    if is_distributed() and get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        vec = vec.to(dev)
        dist.all_reduce(vec)
        if average:
            vec /= get_world_size()
        vec = vec.cpu()
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process; a one-element list when not distributed."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every process and return it."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every process, in place; returns ``module``.

    Parameters stay in sync under DDP, but each process updates its BN statistics from its own
    batches after DDP's last broadcast (and plain BN replaces SyncBN on CPU), so without this every
    process would evaluate a slightly different model than the checkpoint, which rank ``src`` writes.
    """
    if is_distributed() and get_world_size() > 1:
        on_gpu = dist.get_backend() == "nccl"
        for buf in module.buffers():
            t = buf.cuda() if on_gpu and not buf.is_cuda else buf
            dist.broadcast(t, src=src)
            if t is not buf:
                buf.copy_(t)
    return module


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def batch_size_per_process(total: int, key: str = "train.batch_size") -> int:
    """``total`` (the batch over all processes) split evenly over them; a :class:`ConfigError` naming
    ``key`` when it does not divide."""
    world = get_world_size()
    if total % world != 0 or total < world:
        raise ConfigError(f"{key}={total} (total over processes) must be a positive multiple of the {world} "
                          f"processes; pick a multiple of {world}")
    return total // world
