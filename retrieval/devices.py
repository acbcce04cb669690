"""Where work runs: the torch device a `--device` value means, and whether FAISS sees a GPU.

One place for both, so that search, indexing, training and analysis agree on what "auto" means and
fail the same way when a GPU is asked for and absent. Neither torch nor FAISS is imported until asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import UsageError

if TYPE_CHECKING:
    import torch


def torch_device(device: "str | torch.device" = "auto", local_rank: int = 0) -> "torch.device":
    """"auto" -> this process's GPU when CUDA is available, else the CPU; "cuda" without an index -> GPU
    `local_rank` (one per process under torchrun). Asking for CUDA where there is none is a usage error."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; pass --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def faiss_gpu_available() -> bool:
    """Whether this FAISS build sees a GPU (a CPU-only build, or one without the GPU symbols, does not)."""
    try:
        import faiss

        return faiss.get_num_gpus() > 0
    except Exception:
        return False
