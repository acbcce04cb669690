"""`retrieval index --from-embeddings DIR`: an index folder from embedding parts, without re-embedding.

    one index (default)   all gallery parts read, the index built and calibrated exactly as `retrieval index`
                          does (same training sample for the same seed), so it searches and evaluates the same
    --shards N            the driver trains the coarse quantizer (and PQ) once on a seeded sample read from
                          the parts and hands the trained empty index to N shard builds; each reads only
                          its own parts, one at a time, adds them and writes its shard file. Engine "local"
                          runs the shard builds one after another here, "ray" runs them as parallel Ray tasks
                          (one fresh process each, so memory is returned after every shard)
    --shards N --merge    the shards' inverted lists (or flat rows) merged into one index.faiss

Every part is verified against its completion marker (size, SHA-256, embedder fingerprint) by the
process that reads it; the folder is published atomically like any index folder.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.atomic import atomic_write_with, read_json
from retrieval.config import CalibrationConfig
from retrieval.embed.parts import EmbeddingsFolder, PartItems, absolute_paths, part_paths
from retrieval.errors import UsageError
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError
from retrieval.index.faiss_index import (
    add_to_index,
    configure_search,
    library_versions,
    new_cpu_index,
    resolve_params,
    train_index,
    training_rows,
    write_index,
)
from retrieval.index.folder import GalleryIndex, ItemTable, StoredQueries
from retrieval.index.meta import IndexMeta
from retrieval.index.types import IndexParams
from retrieval.versions import now_iso


@dataclass(frozen=True)
class ShardOptions:
    """How an index is split across shards and where the shard builds run."""

    shards: int = 0  # 0 or 1: one index; N > 1: N shards
    merge: bool = False  # with shards: merge them into one index.faiss instead of keeping N files
    engine: str = "local"  # local | ray

    def __post_init__(self) -> None:
        from retrieval.embed import ENGINES

        if self.shards < 0:
            raise UsageError(f"--shards must be >= 0, got {self.shards}")
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.merge and self.shards <= 1:
            raise UsageError("--merge needs --shards N with N > 1")


@dataclass
class ShardResult:
    """One shard build: its file, item count, time and the peak resident memory of the process that built it."""

    file: str
    n_items: int
    seconds: float
    max_rss_bytes: int
    worker: str


@dataclass
class BuildReport:
    """Timings of a build from parts (train on the driver, shard builds, merge, publish)."""

    train_seconds: float = 0.0
    shard_seconds: float = 0.0
    merge_seconds: float = 0.0
    total_seconds: float = 0.0
    shards: list[ShardResult] = field(default_factory=list)


def _items_of(folder: EmbeddingsFolder, role: str) -> PartItems:
    """The item columns of every part of `role` (JSON only; no embeddings read)."""
    parts = []
    for name in folder.part_names(role):
        folder.marker(name)
        parts.append(PartItems.from_dict(read_json(part_paths(folder.folder, name)[1], "part items")))
    return PartItems.concat(parts)


def _item_table(items: PartItems, data_root: str | None) -> ItemTable:
    return ItemTable(
        absolute_paths(items.paths, data_root), list(items.labels), list(items.item_ids), items.attribute_rows()
    )


def split_parts(names: Sequence[str], counts: Sequence[int], shards: int) -> list[list[str]]:
    """Consecutive runs of parts, one per shard, with item counts as even as part boundaries allow."""
    total = sum(counts)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name, count in zip(names, counts):
        j = min(shards - 1, int(done * shards // max(total, 1)))
        groups[j].append(name)
        done += count
    return groups


def train_on_sample(folder: EmbeddingsFolder, params: IndexParams, n: int, seed: int, verify: bool = True) -> bytes:
    """The trained, empty index (serialised), trained on the same seeded sample `build_faiss_index` would draw."""
    index = new_cpu_index(params, folder.embedding_size)
    if not index.is_trained:
        rows = training_rows(n, params, seed)
        sample = np.empty((len(rows), folder.embedding_size), np.float32)
        start = filled = 0
        for _, emb, _items in folder.iter_parts("gallery", verify=verify):
            stop = start + len(emb)
            lo, hi = np.searchsorted(rows, [start, stop])
            sample[filled : filled + hi - lo] = emb[rows[lo:hi] - start]
            filled += hi - lo
            start = stop
        train_index(index, sample, params)
    return bytes(faiss.serialize_index(index))


def build_shard(
    parts_dir: str,
    names: Sequence[str],
    trained: bytes,
    params: dict[str, Any],
    out_file: str,
    verify: bool = True,
    threads: int = 0,
) -> ShardResult:
    """Add the vectors of parts `names` (one part in memory at a time) to a copy of the trained index and write
    it to `out_file`. Runs in the driver (engine local) or as a Ray task."""
    t0 = time.perf_counter()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    folder = EmbeddingsFolder.open(parts_dir)
    p = IndexParams.from_dict(params)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    for _, emb, _items in folder.iter_parts("gallery", names, verify=verify):
        if len(emb):
            add_to_index(index, emb)
        del emb
    configure_search(index, p)
    atomic_write_with(out_file, lambda path: write_index(index, path))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return ShardResult(
        os.path.basename(out_file),
        int(index.ntotal),
        time.perf_counter() - t0,
        int(rss),
        f"{socket.gethostname()}:{os.getpid()}",
    )


def _run_shards_local(
    parts_dir: str,
    groups: list[list[str]],
    trained: bytes,
    params: dict[str, Any],
    files: list[str],
    verify: bool,
    progress: bool,
) -> list[ShardResult]:
    from tqdm.auto import tqdm

    return [
        build_shard(parts_dir, names, trained, params, f, verify)
        for names, f in tqdm(list(zip(groups, files)), desc="shards", unit="shard", disable=not progress)
    ]


def _run_shards_ray(
    parts_dir: str,
    groups: list[list[str]],
    trained: bytes,
    params: dict[str, Any],
    files: list[str],
    verify: bool,
    progress: bool,
    ray_options: Any,
) -> list[ShardResult]:
    """Shard builds as Ray tasks, at most `workers` at once; the trained index is put in the object store once."""
    from tqdm.auto import tqdm

    from retrieval.embed.ray_engine import RayOptions, connect

    ray_options = ray_options or RayOptions()
    ray = connect(ray_options)
    threads = max(1, int(ray_options.cpus_per_worker))
    task = ray.remote(num_cpus=ray_options.cpus_per_worker, max_calls=1, max_retries=ray_options.retries)(build_shard)
    trained_ref = ray.put(trained)
    pending = list(zip(groups, files))
    running: dict[Any, int] = {}
    results: dict[int, ShardResult] = {}
    bar = tqdm(total=len(pending), desc="shards", unit="shard", disable=not progress)
    try:
        next_j = 0
        while next_j < len(pending) or running:
            while next_j < len(pending) and len(running) < ray_options.workers:
                names, f = pending[next_j]
                running[task.remote(parts_dir, names, trained_ref, params, f, verify, threads)] = next_j
                next_j += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                j = running.pop(ref)
                try:
                    results[j] = ray.get(ref)
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    if isinstance(cause, (ValueError, OSError)):
                        raise cause from exc  # a corrupt part, a mismatch: the worker's own message names the file
                    raise RuntimeError(
                        f"shard build {j} failed on Ray ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0]})"
                    ) from exc
                bar.update(1)
    finally:
        bar.close()
    return [results[j] for j in range(len(pending))]


def build_from_parts(
    parts_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    shard_options: ShardOptions | None = None,
    *,
    ray_options: Any = None,
    seed: int = 0,
    verify: bool = True,
    progress: bool = True,
    calib: CalibrationConfig | None = None,
    store: Any = None,
    upload_batch: int = 1000,
) -> tuple[GalleryIndex, BuildReport]:
    """Publish an index folder at `out_dir` from the embeddings folder `parts_dir` (see module docstring).

    One index is built and calibrated exactly as `retrieval index` does (`calib`); shards search with
    the given nprobe / efSearch (calibration measures one index, not a shard set). `store`
    (a retrieval.index.milvus_store.MilvusStoreRecord): one index, built into that Milvus collection.
    """
    cfg = cfg or IndexConfig()
    opts = shard_options or ShardOptions()
    report = BuildReport()
    t_start = time.perf_counter()
    folder = EmbeddingsFolder.open(parts_dir)
    folder.require_complete()
    manifest = folder.manifest
    if "gallery" not in folder.roles():
        raise IndexBuildError(f"{folder.folder} holds no gallery parts; nothing to index")
    n, d = folder.count("gallery"), folder.embedding_size
    if n == 0:
        raise IndexBuildError(
            f"{folder.folder}: no gallery image could be embedded ({manifest.get('n_bad', 0)} "
            "unreadable); nothing to index"
        )
    params = resolve_params(cfg, n, d)
    if store is not None and opts.shards > 1:
        raise UsageError(
            "--store milvus builds one collection (Milvus spreads it over its own segments and nodes); drop --shards"
        )
    if opts.shards > 1:
        _check_sharding(params, opts, len(folder.part_names("gallery")))
    g_items = _items_of(folder, "gallery")
    items = _item_table(g_items, folder.data_root)
    queries = None
    if "query" in folder.roles():
        q_emb, q_items = folder.load_role("query", verify=verify)
        queries = StoredQueries(q_emb, _item_table(q_items, folder.data_root))

    def publish(index: GalleryIndex, device: str, note: str, **calibration: Any) -> GalleryIndex:
        index.meta = _meta(manifest, folder, cfg, opts, report, device, note, g_items, t_start, **calibration)
        index.save(out_dir)
        return index

    if opts.shards > 1:
        index = _build_shards(
            folder,
            params,
            opts,
            report,
            items,
            queries,
            Path(out_dir),
            publish,
            use_gpu=cfg.use_gpu,
            seed=seed,
            verify=verify,
            progress=progress,
            ray_options=ray_options,
        )
        report.total_seconds = time.perf_counter() - t_start
        index.meta.build_seconds = round(report.total_seconds, 3)
        return index, report
    # one index, built and calibrated as `retrieval index` does (the same training sample for the same seed)
    from retrieval.index.calibrate import build_calibrated
    from retrieval.index.stores import gallery_index, store_builder

    gallery_emb, _ = folder.load_role("gallery", verify=verify)
    builder = store_builder(store, items, str(manifest["fingerprint"]), folder.data_root, upload_batch, progress)
    if builder is not None and opts.engine == "ray":
        _upload_parts_on_ray(folder, builder, params, calib, d, upload_batch, ray_options, verify, progress)
    result = build_calibrated(gallery_emb, cfg, calib, seed=seed, progress=progress, builder=builder)
    built = result.built
    report.train_seconds, report.shard_seconds = built.train_seconds, built.add_seconds
    note = "one index: built in this process (pass --shards N to build shards on Ray)" if opts.engine == "ray" else ""
    index = gallery_index(
        built.index,
        built.params,
        items,
        IndexMeta(),
        queries,
        None if built.params.stores_exact_vectors else gallery_emb,
        use_gpu=cfg.use_gpu,
    )
    publish(index, built.device, built.note or note, **result.meta())
    report.total_seconds = time.perf_counter() - t_start
    return index, report


def _upload_parts_on_ray(
    folder: EmbeddingsFolder,
    builder: Any,
    params: IndexParams,
    calib: CalibrationConfig | None,
    d: int,
    batch_size: int,
    ray_options: Any,
    verify: bool,
    progress: bool,
) -> None:
    """Upload the gallery parts into the builder's Milvus collection from parallel Ray tasks (`--workers` groups of
    consecutive parts); the rows a graph holds out for calibration are left to the build, which adds them later."""
    from retrieval.embed.ray_engine import RayOptions
    from retrieval.index.calibrate import held_out_count
    from retrieval.index.milvus_parts import upload_parts_on_ray

    ray_options = ray_options or RayOptions()
    n = folder.count("gallery")
    limit = n - held_out_count(params, calib or CalibrationConfig(), n)
    names, counts, total = [], [], 0
    for name in folder.part_names("gallery"):
        count = int(folder.marker(name)["n"])
        if total + count > limit:
            break
        names.append(name)
        counts.append(count)
        total += count
    groups = [g for g in split_parts(names, counts, ray_options.workers) if g]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    first_keys = [int(offsets[names.index(g[0])]) for g in groups]
    builder.uploaded_elsewhere(d, 0)  # the collection exists (or is refused) before any task writes
    upload_parts_on_ray(
        str(folder.folder), groups, first_keys, builder.record, batch_size, ray_options, verify, progress
    )
    builder.uploaded_elsewhere(d, total)


def _check_sharding(params: IndexParams, opts: ShardOptions, n_parts: int) -> None:
    if params.refine_factor > 0:
        raise IndexBuildError(
            f"refined indexes ({params.factory_string()}) cannot be built as --shards: build one "
            "index instead, or shards of ivf-flat / ivf-pq without --refine-factor"
        )
    if opts.merge and not params.kind.mergeable:
        raise IndexBuildError(
            f"{params.index_type} shards cannot be merged into one index; drop --merge to keep them as shards"
        )
    if opts.shards > n_parts:
        raise IndexBuildError(
            f"--shards {opts.shards} exceeds the {n_parts} gallery parts; use fewer shards or "
            "re-embed with a smaller --part-size"
        )


def _build_shards(
    folder: EmbeddingsFolder,
    params: IndexParams,
    opts: ShardOptions,
    report: BuildReport,
    items: ItemTable,
    queries: StoredQueries | None,
    out_dir: Path,
    publish: Callable[[GalleryIndex, str, str], GalleryIndex],
    *,
    use_gpu: bool,
    seed: int,
    verify: bool,
    progress: bool,
    ray_options: Any,
) -> GalleryIndex:
    """Train once here, build the shard files (locally or on Ray) into a staging folder beside `out_dir`, and
    publish them as shards or merged into one index."""
    from retrieval.index.folder import ShardedGalleryIndex
    from retrieval.index.shards import ShardSet, shard_file_name

    t0 = time.perf_counter()
    # the sample is read unverified: every part is verified by the shard build that adds it, and a bad part
    # fails that build before anything is published
    trained = train_on_sample(folder, params, folder.count("gallery"), seed, verify=False)
    report.train_seconds = time.perf_counter() - t0
    names = folder.part_names("gallery")
    groups = split_parts(names, [int(folder.marker(p)["n"]) for p in names], opts.shards)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.shards-", dir=out_dir.parent))
    try:
        files = [str(staging / shard_file_name(j)) for j in range(opts.shards)]
        t0 = time.perf_counter()
        run = _run_shards_ray if opts.engine == "ray" else _run_shards_local
        extra = (ray_options,) if opts.engine == "ray" else ()
        report.shards = run(
            str(folder.folder.resolve()), groups, trained, params.to_dict(), files, verify, progress, *extra
        )
        report.shard_seconds = time.perf_counter() - t0
        shard_set = ShardSet.from_files(
            [Path(f) for f in files], [r.n_items for r in report.shards], folder.embedding_size
        )
        gallery_vectors = None if params.stores_exact_vectors else folder.load_role("gallery", verify=False)[0]
        index: GalleryIndex
        if opts.merge:
            t0 = time.perf_counter()
            merged = shard_set.merged(params)
            report.merge_seconds = time.perf_counter() - t0
            index = GalleryIndex(merged, params, items, IndexMeta(), queries, gallery_vectors, use_gpu=use_gpu)
        else:
            index = ShardedGalleryIndex(
                shard_set, params, items, IndexMeta(), queries, gallery_vectors, use_gpu=use_gpu
            )
        return publish(index, "cpu", "")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _meta(
    manifest: dict[str, Any],
    folder: EmbeddingsFolder,
    cfg: IndexConfig,
    opts: ShardOptions,
    report: BuildReport,
    device: str,
    note: str,
    g_items: PartItems,
    t_start: float,
    **calibration: Any,
) -> IndexMeta:
    """The same metadata `retrieval index` records, plus where the embeddings came from and how it was built."""
    src = manifest.get("source", {})
    versions = dict(manifest.get("versions") or {})
    versions.update(library_versions())
    return IndexMeta(
        dataset=src.get("dataset", "images"),
        data_root=manifest.get("data_root"),
        split=manifest["splits"]["gallery"]["split"],
        protocol=src.get("protocol", "all-vs-all"),
        recall_ks=[int(k) for k in src.get("recall_ks") or []],
        fingerprint=manifest["fingerprint"],
        embedding_size=int(manifest["embedding_size"]),
        normalisation=manifest.get("normalisation", "l2"),
        preprocessing=manifest["preprocessing"],
        backend=manifest.get("backend"),
        embed_device="parts",
        embedder_source=manifest.get("embedder_source", {}),
        index_device=device,
        index_note=note,
        index_config={"memory_budget_gb": cfg.memory_budget_gb, "requested_type": cfg.index_type},
        train_seconds=round(report.train_seconds, 3),
        add_seconds=round(report.shard_seconds, 3),
        build_seconds=round(time.perf_counter() - t_start, 3),
        built_from={
            "embeddings": str(folder.folder.resolve()),
            "dtype": manifest.get("dtype"),
            "engine": opts.engine,
            "shards": max(1, opts.shards),
            "merged": opts.merge,
            "unreadable_images": len(g_items.bad),
            "shard_builds": [r.__dict__ for r in report.shards],
        },
        created_at=now_iso(),
        versions=versions,
        history=[{"action": "build", "items": len(g_items.rows), "at": now_iso(), "from": "embeddings"}],
        **calibration,
    )
