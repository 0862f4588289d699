"""Devices and processes: the device a run trains on, and torch.distributed for the
trainer: process group set-up from torchrun's environment, and the few
collectives the training loop needs.

Launched by torchrun (``torchrun --nproc_per_node N -m fastseq train ...``), each
process reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment
and joins the process group through torchrun's rendezvous (``MASTER_ADDR`` /
``MASTER_PORT`` or ``--rdzv-endpoint``): NCCL when training on CUDA devices (one
device per process, ``cuda:LOCAL_RANK``), gloo on CPU. Without those variables
(a plain ``fastseq train``) everything here is a no-op on a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ["Context", "pick_device", "setup", "teardown"]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and metrics."""
        return self.rank == 0

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        """Sum ``values`` (float64) over all processes."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (e.g. to stop together)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (picklable, small)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # NCCL communicates CUDA tensors only; gloo CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def setup(device: torch.device, timeout_minutes: float = 120.0) -> Context:
    """Join the process group torchrun describes in the environment, if any.

    Args:
        device: the device this run trains on (``pick_device``); with several
            processes on CUDA, each process takes ``cuda:LOCAL_RANK``.
        timeout_minutes: collective timeout; rank 0 validates alone while the
            others wait, so it must cover one evaluation.

    Returns:
        The :class:`Context` (rank 0 of 1 without torchrun).

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but ``LOCAL_RANK`` names a CUDA device that
            does not exist.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return Context(0, 1, 0, device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return Context(rank, world_size, local_rank, device)


def teardown(ctx: Context) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
