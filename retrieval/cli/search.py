"""`retrieval search`: the nearest gallery items of one or more photos, as tables or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from retrieval.cli import embedder_options as opts

QUERY_CHUNK = 8  # query images decoded (at full size) and embedded together


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search(
        images: Optional[list[Path]] = typer.Argument(None, help="Query image files."),
        index: Path = typer.Option(..., "--index", help="Index folder written by `retrieval index`."),
        k: int = typer.Option(10, "-k", "--k", min=1, help="Results per query."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        checkpoint: Optional[Path] = opts.checkpoint_option(recorded=True),
        backend: str = opts.backend_option(),
        model: Optional[Path] = opts.model_option(),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N] (embedding and FAISS)."),
        data_root: Optional[Path] = typer.Option(
            None, "--data-root", help="Where the dataset is now, if it moved since the index was built."
        ),
        where: Optional[list[str]] = typer.Option(
            None,
            "--where",
            help="Only items with this attribute, e.g. category=Dresses (repeatable: keys AND, repeated key OR).",
        ),
        rerank: str = typer.Option("none", "--rerank", help="Re-ranking: none | qe | dba | kreciprocal."),
        embeddings: Optional[Path] = typer.Option(
            None, "--embeddings", help="Query vectors instead of images: an (Q, D) unit-norm .npy from the same model."
        ),
        nprobe: Optional[int] = typer.Option(
            None, "--nprobe", min=1, help="IVF lists scanned per query (default: the calibrated setting)."
        ),
        ef_search: Optional[int] = typer.Option(
            None, "--ef-search", min=1, help="HNSW search beam width (default: the calibrated setting)."
        ),
    ) -> None:
        """Search an index by photo: rank, cosine score, label / item id and path of the k nearest items.

        The embedder must be the one that built the index (same fingerprint); another is refused. Query
        images are checked like the server's uploads (size, pixels, aspect ratio) before decoding.
        `--json` prints each hit as the search API does, its path relative to the dataset root.
        """
        import json

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from retrieval.search.hits import hits_as_json
        from retrieval.search.searcher import Searcher

        console = Console()
        spec = opts.embedder_spec(backend, checkpoint, model, required=False)
        searcher = Searcher.open(index, spec, device=device, data_root=data_root)
        from retrieval.errors import UsageError
        from retrieval.index.calibrate import override_search_params

        searcher.index.set_search_params(override_search_params(searcher.index.params, nprobe, ef_search))
        if embeddings is not None and images:
            raise UsageError("pass query images or --embeddings QUERIES.npy, not both")
        if embeddings is not None:
            from retrieval.index.vectors import checked_vectors, load_vector_file

            q = checked_vectors(load_vector_file(embeddings), source=str(embeddings))
            results = searcher.search_embeddings(q, k=k, where=where, rerank=rerank)
            images = [Path(f"{embeddings}#{i}") for i in range(len(q))]
        elif images:
            results = search_files(searcher, images, k=k, where=where, rerank=rerank)
        else:
            raise UsageError("pass query images, or --embeddings QUERIES.npy")

        devices = searcher.devices
        if as_json:
            payload = {"index": str(index), "devices": devices, "results": hits_as_json(images, results)}
            typer.echo(json.dumps(payload, indent=2))
            return
        meta = searcher.index.meta
        queries = (  # vectors given: no embedder was opened (a folder built from vectors records none)
            f"queries: vectors from {escape(str(embeddings))}"
            if embeddings is not None
            else f"embedding on {escape(devices['embedding'])} ({searcher.backend.preprocessing.describe()})"
        )
        console.print(
            f"index {escape(str(index))}: {meta.dataset} {meta.split}, {len(searcher.gallery_paths):,} "
            f"items, {meta.index_type}; {queries}, search on {escape(devices['index'])}"
        )
        for path, hits in zip(images, results):
            table = Table(title=f"{escape(str(path))}", title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("label", justify="right")
            table.add_column("item id")
            table.add_column("path", overflow="fold")
            for h in hits:
                # the full path, for a human to open; --json has the record's dataset-relative one
                full = searcher.gallery_paths[h.gallery_index]
                table.add_row(str(h.rank), f"{h.score:.4f}", str(h.label), escape(h.item_id), escape(full))
            console.print(table)


def search_files(searcher: Any, paths: list[Path], k: int, where: Any, rerank: str) -> list[list[Any]]:
    """Query files -> hits per file, each file read and decoded by the query intake (as the server's
    uploads are), a few at a time so that full-size decoded photos never pile up in memory.

    An index that cannot embed images says so before any image is read; the embedder itself (torch) opens
    with the first search, so an unreadable first image is reported at once."""
    from retrieval.query_intake import QueryIntake

    searcher.check_embeds_images()
    intake = QueryIntake()
    results: list[list[Any]] = []
    for start in range(0, len(paths), QUERY_CHUNK):
        images = [intake.open_file(p) for p in paths[start : start + QUERY_CHUNK]]
        results += searcher.search_images(images, k=k, where=where, rerank=rerank)
    return results
