"""`retrieval index`: the options. Which job they ask for (build, add, edit, from embeddings) and the jobs
themselves are in retrieval.cli.index_jobs; the per-type knob flags come from retrieval.index.knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from retrieval.cli import embedder_options as opts
from retrieval.cli.index_jobs import IndexArgs, run_job
from retrieval.cli.index_options import with_knob_options
from retrieval.index.types import INDEX_TYPES


def register(app: typer.Typer) -> None:
    @app.command("index")
    @with_knob_options(after="index_type")
    def index(
        dataset: Optional[str] = typer.Option(None, "--dataset", help="cub | cars | sop | inshop | folder | demo."),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="The dataset's folder (official layout)."),
        out: Optional[Path] = typer.Option(None, "--out", "--index", help="Index folder (default indexes/<dataset>)."),
        add: Optional[list[Path]] = typer.Option(
            None, "--add", help="Add these images or folders to the existing index at --out (repeatable)."
        ),
        remove: Optional[list[str]] = typer.Option(
            None, "--remove", help="Remove every gallery image of this item id from the index at --out (repeatable)."
        ),
        remove_path: Optional[list[str]] = typer.Option(
            None,
            "--remove-path",
            help="Remove this gallery image (path, or relative to the dataset folder) (repeatable).",
        ),
        rerank_neighbours: int = typer.Option(
            0,
            "--rerank-neighbours",
            min=0,
            help="Also store each gallery item's N nearest neighbours (needed by --rerank dba); with only --out, "
            "add them to an existing index.",
        ),
        checkpoint: Optional[Path] = opts.checkpoint_option(),
        backend: str = opts.backend_option(),
        model: Optional[Path] = opts.model_option(),
        untrained: bool = opts.untrained_option(),
        arch: str = opts.arch_option(),
        embedding_size: int = opts.embedding_size_option(),
        image_size: int = opts.image_size_option(),
        seed: int = typer.Option(0, "--seed", help="With --untrained: initialisation seed; also IVF training sample."),
        index_type: str = typer.Option("auto", "--index-type", help=f"auto | {' | '.join(INDEX_TYPES)}."),
        # here: one option per index knob (--nlist, --nprobe, --pq-m, ...), from retrieval.index.knobs
        memory_budget_gb: float = typer.Option(4.0, "--memory-budget-gb", help="For --index-type auto."),
        gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="Build IVF indexes on a GPU when FAISS sees one."),
        device: str = typer.Option("auto", "--device", help="Embedding device: auto | cpu | cuda[:N]."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per embedding batch."),
        target_recall: float = typer.Option(
            0.95,
            "--target-recall",
            min=0.0,
            max=1.0,
            help="Approximate types: the cheapest search setting whose Recall@10 against exact search on held-out "
            "gallery vectors reaches this is kept (0 = no calibration; --nprobe/--ef-search fix the setting).",
        ),
        calibration_queries: int = typer.Option(
            1000, "--calibration-queries", min=1, help="Gallery vectors searched to measure recall at build time."
        ),
        from_embeddings: Optional[Path] = typer.Option(
            None,
            "--from-embeddings",
            help="Index vectors embedded elsewhere: an embeddings folder written by "
            "`retrieval embed` (no re-embedding), or an (N, D) float32 FILE.npy.",
        ),
        labels: Optional[Path] = typer.Option(
            None, "--labels", help="With --from-embeddings: (N,) integer labels .npy."
        ),
        ids: Optional[Path] = typer.Option(
            None, "--ids", help="With --from-embeddings: item ids, a (N,) .npy or a text file with one id per line."
        ),
        normalize: bool = typer.Option(
            False, "--normalize", help="With --from-embeddings: rescale rows to unit norm instead of refusing them."
        ),
        max_bad_fraction: float = typer.Option(
            0.01,
            "--max-bad-fraction",
            min=0.0,
            max=1.0,
            help="Skip images that cannot be used (listed in meta.json) unless more than this fraction of them are.",
        ),
        strict: bool = typer.Option(False, "--strict", help="Stop at the first image that cannot be used."),
        engine: str = typer.Option(
            "local", "--engine", help="With --from-embeddings DIR --shards: local | ray (shard builds as Ray tasks)."
        ),
        shards: int = typer.Option(
            0, "--shards", min=0, help="With --from-embeddings DIR: N shard indexes (0 = one index)."
        ),
        merge: bool = typer.Option(False, "--merge", help="With --shards: merge the shards into one index."),
        address: Optional[str] = typer.Option(
            None, "--address", help="Ray: auto | HOST:PORT (default: Ray starts here)."
        ),
        workers: int = typer.Option(2, "--workers", min=1, help="Ray: shard builds running at once."),
        store: str = typer.Option(
            "faiss",
            "--store",
            help="Where the vectors live: faiss (files in the folder) | milvus (a collection on --milvus-uri; see "
            "docs/scaling.md).",
        ),
        milvus_uri: Optional[str] = typer.Option(
            None, "--milvus-uri", help="With --store milvus: the server, e.g. http://localhost:19530."
        ),
        collection: Optional[str] = typer.Option(
            None, "--collection", help="With --store milvus: the collection (default metrix_<folder name>)."
        ),
        milvus_token_env: str = typer.Option(
            "",
            "--milvus-token-env",
            help="With --store milvus: the environment "
            "variable holding the server's token (the token is never written).",
        ),
        upload_batch: int = typer.Option(1000, "--upload-batch", min=1, help="With --store milvus: rows per upsert."),
        knobs: Optional[dict[str, Any]] = None,
    ) -> None:
        """Embed a gallery and write an index folder (index.faiss, items.json, meta.json, queries.npy).

        In-Shop/demo index the gallery split and store the query embeddings for `retrieval evaluate`;
        CUB/Cars/SOP/folder index their test split. The previous index stays usable until the new
        one is complete. With --add, new images are embedded with the same embedder and appended.
        """
        run_job(IndexArgs(**locals()))  # every parameter above, by name
