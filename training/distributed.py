"""Multi-process training helpers (torchrun + DistributedDataParallel).

A run started by `torchrun --nproc_per_node N` finds RANK / WORLD_SIZE / LOCAL_RANK in its environment;
a plain `retrieval train` finds nothing and runs as a single process with no process group.

The loss must see the global batch (pair losses get their negatives from the whole batch), so each rank gathers the
embeddings of every rank *with gradient* (and, for feature-level Metrix, the layer4 maps it mixes;
`GatheredEmbedder`), and the objective runs on the global batch, identically on every rank. Gradients of the gathered
maps are summed across ranks on the way back and DDP then averages parameter gradients, which together equal the
single-process gradient of the same global batch (tests/test_ddp.py checks it).

Input-level Metrix mixes images, and an image can only be embedded by the rank that holds it, so at that
level nothing is gathered: every rank computes the clean and mixed loss of its own share and DDP averages
the gradients (documented in REPRODUCE.md). Each level says which it is (`global_batch` in
training/levels.py); the objective exposes it as `gathers_global_batch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from retrieval.devices import torch_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run; `world_size == 1` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs and checkpoints and prints."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch_device(device, local_rank)  # a plain 'cuda' is this rank's GPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # the "current" GPU that default-device calls (RNG state, caches) refer to
    if world_size <= 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=60))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the incoming gradients over ranks and
    returns this rank's slice (each rank's loss depends on every rank's rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (b, ...) on every rank (same b) -> (world * b, ...) in rank order, differentiable."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Labels and other non-differentiable per-sample tensors: (b, ...) -> (world * b, ...)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a (small) tensor over ranks, e.g. epoch loss sums; a copy, the input is left alone."""
    if not info.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (e.g. its RNG states) on every rank, in rank order."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. evaluation metrics computed on rank 0 only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GatheredEmbedder(nn.Module):
    """The module DDP wraps: the embedder's forward on this rank's images, outputs gathered over ranks.

    forward(images (b, 3, H, W)) -> emb (world * b, D); with return_maps=True -> (maps (world * b, C, h, w),
    emb (world * b, D)), rows in rank order and differentiable, so the objective sees the global batch.
    Feature-level Metrix needs the maps of every rank to mix them; the other levels gather only the
    (much smaller) embeddings. The objective is a submodule too, so that DDP also averages the
    gradients of loss parameters (proxies), which are used outside this forward.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        forward_fn: Callable[..., Any] | None = None,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.objective = model, objective
        # A tuple keeps a torch.compile'd wrapper from registering the same parameters a second time.
        self._compiled = (forward_fn,)
        self.gather = gather

    def forward(self, images: torch.Tensor, return_maps: bool = False, follow_up: Any = None) -> Any:
        forward_fn = self._compiled[0] or self.model
        if follow_up is not None:  # input-level Metrix: never gathered (see module docstring)
            return forward_fn(images, follow_up=follow_up)
        out = forward_fn(images, return_maps=return_maps)
        if not self.gather:
            return out
        if return_maps:
            fmap, emb = out
            return all_gather_with_grad(fmap), all_gather_with_grad(emb)
        return all_gather_with_grad(out)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The embedding layer alone (feature-level Metrix projects pooled mixes with it)."""
        return self.model.project(pooled)  # type: ignore[operator]


def wrap_for_step(
    model: nn.Module,
    objective: nn.Module,
    info: DistInfo,
    *,
    gather: bool,
    compile_model: bool = False,
) -> nn.Module:
    """The model as the objective should call it: the embedder, torch.compile'd and/or inside DDP.

    Call again whenever the set of trainable parameters changes (end of warm-up): DDP records which
    parameters need gradients when it is built.
    """
    # torch.compile of a module returns a module (OptimizedModule); its annotation says only "callable"
    compiled = cast(nn.Module, torch.compile(model)) if compile_model else None
    if not info.enabled:
        return compiled if compiled is not None else model
    from torch.nn.parallel import DistributedDataParallel

    gathered = GatheredEmbedder(model, objective, compiled, gather=gather)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(gathered, device_ids=device_ids)  # buffers (BN statistics) follow rank 0
