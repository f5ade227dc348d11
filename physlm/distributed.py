"""Data-parallel training across processes, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 -m physlm train --params ... --run-dir ...

Every process holds the whole model and takes a contiguous slice of each global
batch. Its loss is weighted by its share of the batch, so that averaging the
gradients over processes gives exactly the gradient of the global-batch mean:

    grad = (1/W) sum_r grad(loss_r * n_r * W / N) = sum_r (n_r / N) grad(loss_r)

Statistics (loss, energy MSE, drift) are averaged the same way before they are
logged or fed to the multiplier controller, so every process applies the same
multiplier update. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from physlm.errors import DeviceError


def init_from_environment() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(name: str) -> str:
    """Map device 'auto'/'cuda' to this process's GPU under torchrun (LOCAL_RANK)."""
    if "LOCAL_RANK" in os.environ and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    return batch.tensor_split(world)[rank] if world > 1 else batch


def sum_across(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Element-wise sums over all processes of a list of tensors, with one all-reduce."""
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [part.view_as(t) for part, t in
            zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def global_mean(stats: dict[str, torch.Tensor], share: float,
                world: int) -> dict[str, torch.Tensor]:
    """Batch-weighted means over processes of per-process statistics (`share`: this
    process's fraction of the global batch)."""
    if world == 1:
        return stats
    totals = sum_across([t.float() * share for t in stats.values()], world)
    return dict(zip(stats, totals, strict=True))


def average_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    """Average .grad over processes.

    A parameter without a gradient keeps None (the energy heads in warmup): a zero
    gradient would let AdamW's weight decay and step count move it. Every process runs
    the same code path, so all agree on which parameters have gradients.
    """
    if world == 1:
        return
    with_grad = [p for p in parameters if p.grad is not None]
    for p, total in zip(with_grad, sum_across([p.grad for p in with_grad], world), strict=True):
        p.grad = total / world


def gather_across(tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped tensor, in rank order."""
    if world == 1:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return gathered


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    """This process's device for `name` ("auto": CUDA when available)."""
    name = local_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available here; "
                          "use device: auto or cpu")
    return device
