"""`--deterministic`: make a training run a pure function of its seed, so that reruns and resumed runs
are bit-identical to an uninterrupted one.

Without it, resuming restores every RNG state and draws the same batches, but some kernels (multi-
threaded reductions on CPU, atomics and autotuned algorithms in cuDNN/cuBLAS on GPU) may sum in a
different order from run to run; results then agree to rounding, not to the bit. With it:
`torch.use_deterministic_algorithms(True)` (an operation without a deterministic implementation
raises instead of running), cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG), cuDNN's deterministic
algorithms with autotuning off, and loader workers that seed every RNG they could use. Slower on GPU.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Turn the settings above on for the duration of a run and restore the previous ones after it."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]
        if previous[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and random follow the worker's torch seed (itself a function of
    the loader's seeded generator), so any augmentation that draws from them is reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
