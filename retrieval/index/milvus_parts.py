"""Embedding parts uploaded into a Milvus collection by parallel Ray tasks (`retrieval index --from-embeddings DIR
--store milvus --engine ray`).

Each task reads its own consecutive run of gallery parts (verified against their markers), one part in memory at a
time, and upserts them under their global row numbers as keys, so a task retried by Ray, or a whole job run again,
writes the same rows. The driver then builds and calibrates the Milvus index as a one-process build does
(retrieval.index.sharded_build.build_from_parts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.embed.parts import EmbeddingsFolder, absolute_paths
from retrieval.index.folder import ItemTable
from retrieval.index.milvus_store import (
    DEFAULT_BATCH,
    MilvusCollection,
    MilvusStoreRecord,
    connect,
)


def upload_parts(
    parts_dir: str,
    names: Sequence[str],
    first_key: int,
    record: dict[str, str],
    batch_size: int = DEFAULT_BATCH,
    verify: bool = True,
) -> int:
    """Upsert gallery parts `names` (rows first_key..) into the record's collection; returns the rows written."""
    folder = EmbeddingsFolder.open(parts_dir)
    store = MilvusStoreRecord(record["uri"], record["collection"], record.get("token_env", ""))
    collection = MilvusCollection(connect(store), store, folder.embedding_size, np.zeros(0, np.int64))
    key = int(first_key)
    for _, emb, items in folder.iter_parts("gallery", names, verify=verify):
        table = ItemTable(
            absolute_paths(items.paths, folder.data_root),
            list(items.labels),
            list(items.item_ids),
            items.attribute_rows(),
        )
        collection.upsert(
            np.arange(key, key + len(emb), dtype=np.int64),
            np.asarray(emb, np.float32),
            table,
            folder.data_root,
            batch_size,
        )
        key += len(emb)
    return key - int(first_key)


def upload_parts_on_ray(
    parts_dir: str,
    groups: list[list[str]],
    first_keys: list[int],
    record: MilvusStoreRecord,
    batch_size: int,
    ray_options: Any,
    verify: bool = True,
    progress: bool = True,
) -> int:
    """One Ray task per group of parts (at most `workers` at once); returns the rows uploaded."""
    from tqdm.auto import tqdm

    from retrieval.embed.ray_engine import RayOptions
    from retrieval.embed.ray_engine import connect as connect_ray

    ray_options = ray_options or RayOptions()
    ray = connect_ray(ray_options)
    task = ray.remote(num_cpus=ray_options.cpus_per_worker, max_retries=ray_options.retries)(upload_parts)
    pending = list(zip(groups, first_keys))
    running: dict[Any, int] = {}
    uploaded = 0
    bar = tqdm(total=len(pending), desc="uploading parts to Milvus", unit="group", disable=not progress)
    try:
        next_j = 0
        while next_j < len(pending) or running:
            while next_j < len(pending) and len(running) < ray_options.workers:
                names, first = pending[next_j]
                running[task.remote(parts_dir, names, first, record.to_dict(), batch_size, verify)] = next_j
                next_j += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                j = running.pop(ref)
                try:
                    uploaded += int(ray.get(ref))
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    if isinstance(cause, (ValueError, OSError)):
                        raise cause from exc  # a corrupt part, an unreachable server: the task's own message
                    raise RuntimeError(
                        f"part upload {j} failed on Ray ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0]})"
                    ) from exc
                bar.update(1)
    finally:
        bar.close()
    return uploaded
