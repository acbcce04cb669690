"""`retrieval index`: embed a dataset's gallery into a FAISS index folder, or `--add` images to one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import embedder_options as opts
from retrieval.index.types import INDEX_TYPES


def register(app: typer.Typer) -> None:
    @app.command("index")
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
            None, "--remove-path", help="Remove this gallery image (path, or relative to the dataset folder) (repeatable)."
        ),
        rerank_neighbours: int = typer.Option(
            0, "--rerank-neighbours", min=0,
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
        nlist: int = typer.Option(0, "--nlist", min=0, help="IVF lists (0 = about 4 sqrt(N))."),
        nprobe: Optional[int] = typer.Option(
            None, "--nprobe", min=1, help="IVF lists scanned per query (default: calibrated to --target-recall)."),
        pq_m: int = typer.Option(64, "--pq-m", min=1, help="IVF-PQ sub-quantizers (bytes per vector at 8 bits)."),
        pq_nbits: int = typer.Option(8, "--pq-nbits", min=1, max=16, help="IVF-PQ bits per sub-code."),
        hnsw_m: int = typer.Option(32, "--hnsw-m", min=2, help="HNSW neighbours per node."),
        ef_construction: int = typer.Option(80, "--ef-construction", min=1, help="HNSW build beam width."),
        ef_search: Optional[int] = typer.Option(
            None, "--ef-search", min=1, help="HNSW search beam width (default: calibrated to --target-recall)."),
        refine_factor: int = typer.Option(0, "--refine-factor", min=0,
                                          help="Re-rank k x this many approximate candidates exactly (0 = off)."),
        memory_budget_gb: float = typer.Option(4.0, "--memory-budget-gb", help="For --index-type auto."),
        gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="Build IVF indexes on a GPU when FAISS sees one."),
        device: str = typer.Option("auto", "--device", help="Embedding device: auto | cpu | cuda[:N]."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per embedding batch."),
        target_recall: float = typer.Option(
            0.95, "--target-recall", min=0.0, max=1.0,
            help="Approximate types: the cheapest search setting whose Recall@10 against exact search on held-out "
                 "gallery vectors reaches this is kept (0 = no calibration; --nprobe/--ef-search fix the setting)."),
        calibration_queries: int = typer.Option(1000, "--calibration-queries", min=1,
                                                help="Gallery vectors searched to measure recall at build time."),
        from_embeddings: Optional[Path] = typer.Option(
            None, "--from-embeddings", help="Index vectors embedded elsewhere: an embeddings folder written by "
                                            "`retrieval embed` (no re-embedding), or an (N, D) float32 FILE.npy."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="With --from-embeddings: (N,) integer labels .npy."),
        ids: Optional[Path] = typer.Option(
            None, "--ids", help="With --from-embeddings: item ids, a (N,) .npy or a text file with one id per line."),
        normalize: bool = typer.Option(False, "--normalize",
                                       help="With --from-embeddings: rescale rows to unit norm instead of refusing them."),
        max_bad_fraction: float = typer.Option(
            0.01, "--max-bad-fraction", min=0.0, max=1.0,
            help="Skip images that cannot be used (listed in meta.json) unless more than this fraction of them are.",
        ),
        strict: bool = typer.Option(False, "--strict", help="Stop at the first image that cannot be used."),
        engine: str = typer.Option("local", "--engine", help="With --from-embeddings DIR --shards: local | ray (shard builds as Ray tasks)."),
        shards: int = typer.Option(0, "--shards", min=0, help="With --from-embeddings DIR: N shard indexes (0 = one index)."),
        merge: bool = typer.Option(False, "--merge", help="With --shards: merge the shards into one index."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray: auto | HOST:PORT (default: Ray starts here)."),
        workers: int = typer.Option(2, "--workers", min=1, help="Ray: shard builds running at once."),
    ) -> None:
        """Embed a gallery and write an index folder (index.faiss, items.json, meta.json, queries.npy).

        In-Shop/demo index the gallery split and store the query embeddings for `retrieval evaluate`;
        CUB/Cars/SOP/folder index their test split. The previous index stays usable until the new
        one is complete. With --add, new images are embedded with the same embedder and appended.
        """
        from rich.console import Console
        from rich.markup import escape

        from retrieval.config import CalibrationConfig, IndexConfig
        from retrieval.errors import UsageError

        console = Console()

        def fail(message: str) -> None:
            raise UsageError(message)

        if remove or remove_path or (rerank_neighbours and dataset is None and not add and from_embeddings is None):
            if out is None:
                fail("--remove/--remove-path/--rerank-neighbours on an existing index need --out DIR")
            assert out is not None
            _edit(console, out, remove or [], remove_path or [], rerank_neighbours, fail)
            return
        if add:
            if out is None:
                fail("--add needs --out DIR (the index to add to)")
            assert out is not None
            _add(console, out, add, opts.embedder_spec(backend, checkpoint, model, required=False), device, batch_size,
                 strict, max_bad_fraction)
            return
        cfg = IndexConfig(index_type=index_type, nlist=nlist, pq_m=pq_m, pq_nbits=pq_nbits, hnsw_m=hnsw_m,
                          ef_construction=ef_construction, refine_factor=refine_factor,
                          memory_budget_gb=memory_budget_gb, use_gpu=gpu,
                          **({"nprobe": nprobe} if nprobe is not None else {}),
                          **({"ef_search": ef_search} if ef_search is not None else {}))
        calib = CalibrationConfig(target_recall=target_recall, queries=calibration_queries, seed=seed,
                                  sweep=nprobe is None and ef_search is None)
        if from_embeddings is not None:
            if dataset is not None or checkpoint is not None or model is not None or untrained:
                fail("--from-embeddings builds from vectors alone; drop --dataset/--checkpoint/--model/--untrained")
            if from_embeddings.is_dir():  # a folder of parts written by `retrieval embed`
                from retrieval.cli.index_parts import index_from_parts

                index_from_parts(from_embeddings, out, cfg, calib, engine, shards, merge, address, workers, seed)
                return
            _from_embeddings(console, from_embeddings, out, labels, ids, normalize, cfg, calib, seed, fail)
            return
        if dataset is None or data_root is None:
            fail("pass --dataset and --data-root (or --add IMAGES --out DIR to extend an index)")
        assert dataset is not None and data_root is not None
        spec = opts.embedder_spec(backend, checkpoint, model, untrained=untrained, arch=arch,
                             embedding_size=embedding_size, image_size=image_size, seed=seed)
        assert spec is not None
        out = out or Path("indexes") / dataset
        from retrieval.data import load_dataset
        from retrieval.embed.spec import open_embedder
        from retrieval.index.build import build_index

        ds = load_dataset(dataset, data_root)
        emb_backend = open_embedder(spec, device)
        if untrained:
            console.print("[yellow]note:[/yellow] untrained (random) embedder: results are a baseline only")
        gallery = ds.gallery_split()
        console.print(f"Indexing {ds.name} {gallery.name} split ({len(gallery):,} images) with the "
                      f"{emb_backend.name} embedder {emb_backend.fingerprint} on {escape(emb_backend.device)} "
                      f"({emb_backend.preprocessing.describe()})")
        built = build_index(ds, emb_backend, out, cfg, batch_size=batch_size, seed=seed, calib=calib,
                            rerank_neighbours=rerank_neighbours, strict=strict, max_bad_fraction=max_bad_fraction)
        _summary(console, built, out)
        _report_bad(console, built.meta.bad_images or [], out)


def _add(console, out, add, spec, device, batch_size, strict, max_bad_fraction) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    from retrieval.embed.spec import open_embedder, open_recorded
    from retrieval.image_files import list_images
    from retrieval.index.build import add_images
    from retrieval.index.folder import GalleryIndex

    n_listed = len(list_images(add))  # refuse missing files before any work
    if spec is not None:
        emb_backend = open_embedder(spec, device)
    else:
        emb_backend = open_recorded(GalleryIndex.load(out, verify_checksums=False).meta.embedder_source, device)
    console.print(f"Adding to {escape(str(out))} with the {emb_backend.name} embedder "
                  f"{emb_backend.fingerprint} on {escape(emb_backend.device)}")
    updated, n_added = add_images(out, add, emb_backend, batch_size=batch_size, strict=strict,
                                  max_bad_fraction=max_bad_fraction)
    console.print(f"[green]added {n_added:,} images[/green]; the index now holds {len(updated):,} items")
    skipped = n_listed - n_added  # the newest entries of the index's bad-image list
    _report_bad(console, list(updated.meta.bad_images or [])[-skipped:] if skipped else [], out)


def _report_bad(console, bad: list, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Count and name the skipped images (all of them are listed in meta.json)."""
    if not bad:
        return
    import sys

    from retrieval.errors import one_line

    sys.stderr.write(f"skipped {len(bad)} image(s) that cannot be used (listed under bad_images in "
                     f"{out / 'meta.json'}):\n")
    for item in bad[:20]:
        sys.stderr.write(f"  {one_line(item['reason'])}\n")
    if len(bad) > 20:
        sys.stderr.write(f"  ... and {len(bad) - 20} more\n")


def _edit(console, out, remove, remove_path, neighbours, fail) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    from retrieval.index.build import add_neighbour_lists, remove_items

    if remove or remove_path:
        updated, n_removed = remove_items(out, remove, remove_path)
        console.print(f"[green]removed {n_removed:,} images[/green] from {escape(str(out))}; "
                      f"the index now holds {len(updated):,} items")
    if neighbours:
        updated = add_neighbour_lists(out, neighbours)
        console.print(f"[green]stored {neighbours}-neighbour lists[/green] of {len(updated):,} items in "
                      f"{escape(str(out))} (for --rerank dba)")


def _from_embeddings(console, path, out, labels, ids, normalize, cfg, calib, seed, fail) -> None:  # type: ignore[no-untyped-def]
    """`--from-embeddings FILE.npy`: a single vector file (a folder of parts is a different input)."""
    from rich.markup import escape

    from retrieval.index.vectors import build_from_vector_file

    if path.suffix.lower() != ".npy":
        fail(f"--from-embeddings {path}: expected an (N, D) float32 .npy file")
    if out is None:
        fail("--from-embeddings needs --out DIR (the index folder to write)")
    console.print(f"Indexing vectors from {escape(str(path))}")
    built, _ = build_from_vector_file(path, out, cfg, calib, labels_path=labels, ids_path=ids,
                                      normalize=normalize, seed=seed, progress=True)
    _summary(console, built, out)


def _summary(console, built, out: Path) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    from retrieval.index.calibrate import search_setting_text

    meta = built.meta
    note = f" ({meta.index_note})" if meta.index_note else ""
    console.print(
        f"[green]wrote {escape(str(out))}[/green]: {len(built):,} items, {meta.index_factory} "
        f"({meta.index_type}) built on {escape(meta.index_device + note)}, {meta.embedding_size}-d, "
        f"{meta.n_queries:,} stored queries; embedding {meta.embed_seconds:.1f}s, "
        f"total {meta.build_seconds:.1f}s"
    )
    if not built.params.exact or meta.index_decision:
        console.print(f"search setting: {escape(search_setting_text(meta, built.params))}")
