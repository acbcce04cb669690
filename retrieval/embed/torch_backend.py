"""The torch embedding backend: a checkpointed (or in-memory) Embedder, batched through a DataLoader."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retrieval.devices import resolve_amp, torch_device
from retrieval.images import open_image
from retrieval.model import Embedder, model_fingerprint
from retrieval.preprocess import Preprocessing, preprocess_batch, preprocess_eval


class _EvalImages(Dataset):
    def __init__(self, paths: Sequence[str | os.PathLike[str]], prep: Preprocessing) -> None:
        self.paths, self.prep = list(paths), prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(preprocess_eval(open_image(self.paths[i]), self.prep))


class TorchBackend:
    """EmbeddingBackend over an Embedder: the one torch path for search, indexing and training evaluation.

    Mixed precision: `amp_dtype` is a dtype, None (fp32) or an amp setting resolved as training resolves it
    (`retrieval.devices.resolve_amp`): "auto" is bf16 autocast on a CUDA GPU that supports it, fp16 on one
    that does not, fp32 on CPU; training evaluation passes its own run's dtype. The fingerprint is computed
    on first use, so wrapping the model being trained costs nothing per evaluation.
    """

    name = "torch"
    spec = None  # set by retrieval.embed.spec.open_embedder

    def __init__(
        self,
        model: Embedder,
        preprocessing: Preprocessing,
        device: str | torch.device = "auto",
        fingerprint: str | None = None,
        workers: int = 0,
        amp_dtype: torch.dtype | str | None = "auto",
        channels_last: bool = False,
    ) -> None:
        self.torch_device = torch_device(device)
        self.model = model.to(self.torch_device).eval()
        self.preprocessing = preprocessing
        self._fingerprint = fingerprint
        self.embedding_size = model.embedding_size
        self.workers = workers
        if isinstance(amp_dtype, str):
            amp_dtype = resolve_amp(amp_dtype, self.torch_device)
        self.amp_dtype: torch.dtype | None = amp_dtype
        self.channels_last = channels_last
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype)) if amp_dtype else ""
        self.device = f"{self.torch_device} ({precision} autocast)" if self.amp_dtype else str(self.torch_device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str = "auto", workers: int = 0) -> TorchBackend:
        from retrieval.checkpoint import embedder_from_checkpoint

        model, _cfg, prep, fp = embedder_from_checkpoint(path)
        return cls(model, prep, device=device, fingerprint=fp, workers=workers)

    def runtime_versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    @torch.inference_mode()
    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """batch (B, 3, S, S) normalised -> (B, D) float32, L2-normalised."""
        batch = batch.to(self.torch_device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.torch_device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            emb = self.model(batch)
        emb = torch.nn.functional.normalize(emb.float(), dim=1)
        return emb.cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.embedding_size), np.float32)
        batch = torch.from_numpy(preprocess_batch(images, self.preprocessing))
        return self.embed_tensor(batch)

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        batch_size: int = 64,
        progress: bool = True,
        desc: str = "embedding",
    ) -> np.ndarray:
        if len(paths) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        loader = DataLoader(
            _EvalImages(paths, self.preprocessing),
            batch_size=batch_size,
            num_workers=self.workers,
            pin_memory=self.torch_device.type == "cuda",
            generator=torch.Generator().manual_seed(0),  # never draws from the global RNG (exact training resume)
        )
        out = [self.embed_tensor(b) for b in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False)]
        return np.concatenate(out, axis=0)
