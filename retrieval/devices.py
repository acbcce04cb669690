"""Where work runs: the torch device a `--device` value means, its autocast precision, and whether FAISS
sees a GPU.

One place for these, so that search, indexing, training and analysis agree on what "auto" means and
fail the same way when a GPU is asked for and absent. Neither torch nor FAISS is imported until asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import UsageError

if TYPE_CHECKING:
    import torch

# Autocast precision settings, of training and of the torch embedding backend alike (resolve_amp).
AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")


def torch_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> this process's GPU when CUDA is available, else the CPU; "cuda" without an index -> GPU
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


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for an amp setting (AMP_MODES) on `device`, or None for float32.

    "auto" is bf16 on a GPU that supports it and fp16 on one that does not (pre-Ampere); the CPU always
    runs in float32. Training and the torch embedding backend both ask here, so they agree.
    """
    import torch

    if amp not in AMP_MODES:
        raise UsageError(f"unknown amp setting {amp!r}; choose {', '.join(AMP_MODES[:-1])} or {AMP_MODES[-1]}")
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one: cuda:1 is not cuda:0, and a bare "cuda" means the current GPU."""
    return _normalised(a) == _normalised(b)


def _normalised(device: torch.device | str) -> torch.device:
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
        return torch.device(device.type, index)
    return device


def faiss_gpu_available() -> bool:
    """Whether this FAISS build sees a GPU (a CPU-only build, or one without the GPU symbols, does not)."""
    try:
        import faiss

        return faiss.get_num_gpus() > 0
    except Exception:
        return False
