"""Embed a dataset's gallery (and its queries) and publish an index folder; add new images to one.

Also knows which embedder made an index (`EmbedderSource`, recorded in meta.json) so search can
re-open the same embedder without being told, and refuse any other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.config import CalibrationConfig, IndexConfig
from retrieval.embed import EmbeddingBackend
from retrieval.index import library_versions, resolve_params
from retrieval.index_folder import GalleryIndex, ItemTable, StoredQueries, items_from_paths, now_iso

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# -- which embedder --------------------------------------------------------------------------------


def untrained_backend(
    arch: str = "resnet18",
    embedding_size: int = 128,
    image_size: int = 224,
    resize_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
) -> tuple[EmbeddingBackend, dict[str, Any]]:
    """A randomly initialised embedder (seeded, so it can be re-created for search) and its source record.

    For baselines and tests: its retrieval quality is that of random features.
    """
    import torch

    from retrieval.config import ModelConfig
    from retrieval.embed_torch import TorchBackend
    from retrieval.model import Embedder
    from retrieval.preprocess import Preprocessing

    resize_size = resize_size or int(round(image_size * 8 / 7))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Embedder(ModelConfig(arch=arch, embedding_size=embedding_size, pretrained="none"))
    prep = Preprocessing(image_size=image_size, resize_size=resize_size)
    backend = TorchBackend(model, prep, device=device)
    source = {"kind": "untrained", "arch": arch, "embedding_size": embedding_size, "image_size": image_size,
              "resize_size": resize_size, "seed": seed}
    return backend, source


def open_backend(
    kind: str = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> tuple[EmbeddingBackend, dict[str, Any]]:
    """A torch (checkpoint) or ONNX (model) backend and the source record an index stores for it."""
    from retrieval.embed import load_backend

    backend = load_backend(kind, checkpoint, model, device)
    if backend.name == "onnx":
        source = {"kind": "onnx", "path": str(Path(model).resolve())}  # type: ignore[arg-type]
    else:
        source = {"kind": "checkpoint", "path": str(Path(checkpoint).resolve())}  # type: ignore[arg-type]
    return backend, source


def backend_from_source(source: dict[str, Any], device: str = "auto") -> EmbeddingBackend:
    """Re-open the embedder an index records in meta.json, or say how to supply one."""
    kind = source.get("kind")
    if kind == "untrained":
        backend, _ = untrained_backend(source["arch"], int(source["embedding_size"]), int(source["image_size"]),
                                       int(source["resize_size"]), int(source["seed"]), device)
        return backend
    if kind in ("checkpoint", "onnx"):
        path = Path(source["path"])
        if not path.is_file():
            flag = "--checkpoint CKPT" if kind == "checkpoint" else "--backend onnx --model MODEL.onnx"
            raise FileNotFoundError(
                f"the index was built with {path}, which no longer exists; pass the embedder with {flag}"
            )
        if kind == "checkpoint":
            return open_backend("torch", checkpoint=path, device=device)[0]
        return open_backend("onnx", model=path, device=device)[0]
    if kind == "vectors":
        raise ValueError(
            f"the index was built from vectors ({source.get('path')}) and records no embedder to embed images with; "
            "search it with --embeddings QUERIES.npy (vectors from the same model)"
        )
    raise ValueError(f"the index records no usable embedder ({source!r}); pass --checkpoint or --model")


# -- images ----------------------------------------------------------------------------------------


def list_images(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders; refuses missing paths."""
    found: list[Path] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    return found


def _versions(backend: EmbeddingBackend) -> dict[str, str]:
    versions = library_versions()
    if backend.name == "torch":
        import torch

        versions["torch"] = torch.__version__
    elif backend.name == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions


# -- build / add -----------------------------------------------------------------------------------


def build_index(
    dataset: Any,
    backend: EmbeddingBackend,
    source: dict[str, Any],
    out_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    calib: CalibrationConfig | None = None,
) -> GalleryIndex:
    """Embed `dataset.gallery_split()` (and the query split of query/gallery datasets), index it, publish `out_dir`.

    `dataset` is a retrieval.data RetrievalDataset. The previous folder at `out_dir` stays in place
    until the new one is complete.
    """
    cfg = cfg or IndexConfig()
    t_start = time.perf_counter()
    gallery = dataset.gallery_split()
    if len(gallery) == 0:
        raise ValueError(f"{dataset.name}: the {gallery.name} split is empty; nothing to index")
    d = int(backend.embedding_size)
    params = resolve_params(cfg, len(gallery), d)  # fail on impossible parameters before embedding

    t0 = time.perf_counter()
    gallery_emb = backend.embed_paths(list(gallery.paths), batch_size=batch_size, progress=progress)
    queries = None
    if dataset.protocol == "query-gallery":
        q_split, _ = dataset.eval_splits()
        q_emb = backend.embed_paths(list(q_split.paths), batch_size=batch_size, progress=progress)
        queries = StoredQueries(q_emb, ItemTable.from_split(q_split))
    embed_seconds = time.perf_counter() - t0

    from retrieval.calibrate import build_calibrated

    result = build_calibrated(gallery_emb, cfg, calib, seed=seed, progress=progress)
    built = result.built
    lossy = built.params.index_type == "ivf-pq" and built.params.refine_factor == 0
    meta: dict[str, Any] = {
        "dataset": dataset.name,
        "data_root": str(Path(dataset.root).resolve()),
        "split": gallery.name,
        "protocol": dataset.protocol,
        "recall_ks": [int(k) for k in dataset.recall_ks],
        "fingerprint": backend.fingerprint,
        "embedding_size": d,
        "normalisation": "l2",
        "preprocessing": backend.preprocessing.to_dict(),
        "backend": backend.name,
        "embed_device": backend.device,
        "embedder_source": source,
        "index_device": built.device,
        "index_note": built.note,
        "index_config": {"memory_budget_gb": cfg.memory_budget_gb, "requested_type": cfg.index_type},
        "embed_seconds": round(embed_seconds, 3),
        "train_seconds": round(built.train_seconds, 3),
        "add_seconds": round(built.add_seconds, 3),
        "build_seconds": round(time.perf_counter() - t_start, 3),
        "created_at": now_iso(),
        "versions": _versions(backend),
        "history": [{"action": "build", "items": len(gallery), "at": now_iso()}],
        **result.meta(),
    }
    index = GalleryIndex(built.index, built.params, ItemTable.from_split(gallery), meta, queries,
                         gallery_emb if lossy else None, use_gpu=cfg.use_gpu)
    index.save(out_dir)
    return index


def add_images(
    index_dir: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    backend: EmbeddingBackend,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[GalleryIndex, int]:
    """Embed images (files or folders) and add them to the index at `index_dir`; returns (index, added).

    Refuses a backend whose embedder differs from the index's. Added items are unlabelled (label -1,
    item id = parent folder name). The folder is republished atomically.
    """
    index = GalleryIndex.load(index_dir)
    index.check_embedder(backend.fingerprint, backend.embedding_size, getattr(backend, "normalisation", "l2"))
    paths = list_images(sources)
    emb = backend.embed_paths(paths, batch_size=batch_size, progress=progress)
    index.add(emb, items_from_paths(paths))
    index.meta["updated_at"] = now_iso()
    index.save(index_dir)
    return index, len(paths)

