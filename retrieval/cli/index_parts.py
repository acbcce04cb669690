"""`retrieval index --from-embeddings DIR`: publish an index folder (one index or shards) from an embeddings folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def index_from_parts(
    parts_dir: Path,
    out: Path | None,
    cfg: Any,
    calib: Any,
    engine: str,
    shards: int,
    merge: bool,
    address: str | None,
    workers: int,
    seed: int,
    store: Any = None,
    upload_batch: int = 1000,
) -> None:
    """Build from the parts in `parts_dir` (a folder; see retrieval.index.sharded_build) and print a summary."""
    from rich.console import Console
    from rich.markup import escape

    from retrieval.errors import InputError

    console = Console(soft_wrap=True)
    if not parts_dir.is_dir():
        raise InputError(f"--from-embeddings {parts_dir}: expected an embeddings folder written by `retrieval embed`")
    from retrieval.embed.parts import EmbeddingsFolder
    from retrieval.embed.ray_engine import RayOptions
    from retrieval.index.sharded_build import ShardOptions, build_from_parts

    opts = ShardOptions(shards=shards, merge=merge, engine=engine)
    manifest = EmbeddingsFolder.open(parts_dir).manifest
    out = out or Path("indexes") / str(manifest.get("source", {}).get("dataset", parts_dir.name))
    layout = f"{shards} shards" + (" merged" if merge else "") if shards > 1 else "one index"
    console.print(
        f"Indexing {escape(str(parts_dir))} (embedder {manifest['fingerprint']}, "
        f"{manifest['embedding_size']}-d {manifest['dtype']}) into {escape(str(out))}: {layout}, "
        f"engine {engine}"
    )
    built, report = build_from_parts(
        parts_dir,
        out,
        cfg,
        opts,
        ray_options=RayOptions(address=address, workers=workers),
        seed=seed,
        calib=calib,
        store=store,
        upload_batch=upload_batch,
    )
    meta = built.meta
    console.print(
        f"[green]wrote {escape(str(out))}[/green]: {len(built):,} items, {meta.index_factory} ({meta.index_type}), "
        f"{layout}, {meta.embedding_size}-d, {meta.n_queries:,} stored queries; train {report.train_seconds:.1f}s, "
        f"add {report.shard_seconds:.1f}s, total {report.total_seconds:.1f}s"
    )
    if not built.params.exact:
        from retrieval.index.calibrate import search_setting_text

        console.print(f"search setting: {escape(search_setting_text(meta, built.params))}")
