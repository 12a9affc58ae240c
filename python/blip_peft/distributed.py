"""Data-parallel training over `torch.distributed` (launched with `torchrun`): NCCL on GPUs, gloo on CPUs.

`blip_peft.train` uses this automatically when a process group is initialised or torchrun's environment
variables are set. The tutorial-style manual loop uses `all_reduce_gradients(model)` after `backward()`.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether this process is one of several (a process group is up, or torchrun started us)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_process_group(timeout_seconds: float = 300.0) -> None:
    """Initialises the default process group from torchrun's environment if it is not up yet: NCCL when
    CUDA is available, gloo otherwise. A peer that dies makes collectives fail after `timeout_seconds`."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    # A group left up at exit tears down its worker threads mid-flight (an abort in gloo); close it cleanly.
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


class _Collective:
    """The collectives the Rust trainer calls (it passes flat float32 buffers)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_reduce_mean(self, t: torch.Tensor) -> None:
        if t.device == self.device:
            dist.all_reduce(t)
            t.div_(self.world_size)
            return
        moved = t.to(self.device)
        dist.all_reduce(moved)
        t.copy_(moved.div_(self.world_size))

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_equal(self, value: float) -> bool:
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() == value and -t[1].item() == value)


def collective() -> _Collective | None:
    """The trainer's collectives when running data-parallel (initialising the group from torchrun's
    environment if needed), else None."""
    if not is_distributed():
        return None
    init_process_group()
    return _Collective() if dist.get_world_size() > 1 else None


def all_reduce_gradients(model: Any) -> None:
    """Averages the gradients of `model`'s trainable parameters over all processes, as one flat bucket.

    For a manual training loop under torchrun: call it after `loss.backward()` (on the micro-batch that
    completes a gradient-accumulation window) and before the optimizer step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    _Collective().all_reduce_mean(flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
