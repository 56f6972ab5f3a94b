"""Calibration across processes: statistics are sums over samples, so each process takes a shard of the windows
and the sums are all-reduced.

Launched by ``torchrun`` / ``accelerate launch`` (any initialised ``torch.distributed`` process group: gloo on
CPU, NCCL on GPU). Each process runs the blocks on its own windows, the Hessians ``H = 2/N Σ x xᵀ`` are combined
token-weighted (``Σ_r N_r H_r / Σ_r N_r``, the one-process value up to summation order), and every process then
solves the same modules from the same statistics — so all hold the same model and any of them can save it
(conventionally the main process). The plan is decided once, on rank 0, and broadcast: scores that are not
Hessian sums (LIM, Fisher) come from rank 0's shard.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(batches: torch.Tensor) -> torch.Tensor:
    """This process's windows (every ``size``-th from ``rank``); all of them in a single process."""
    rank, size = world()
    if size == 1:
        return batches
    if batches.shape[0] < size:
        raise ValueError(f"{batches.shape[0]} calibration windows cannot be shared by {size} processes; "
                         "use at least one window per process")
    return batches[rank::size]


def combine_hessian(hessian: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """The token-weighted mean of every process's ``hessian`` (in place) and the total token count."""
    rank, size = world()
    if size == 1:
        return hessian, tokens
    count = torch.tensor([float(tokens)], dtype=torch.float64)
    weighted = hessian.double() * tokens
    torch.distributed.all_reduce(weighted)
    torch.distributed.all_reduce(count)
    total = float(count.item())
    hessian.copy_((weighted / max(total, 1.0)).to(hessian.dtype))
    return hessian, int(total)


def same_everywhere(value):
    """Rank 0's ``value`` (any picklable object) on every process."""
    rank, size = world()
    if size == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
