"""The jobs of `retrieval index`, one function each, and the rule that picks one from the flags.

    build           --dataset NAME --data-root DIR          embed a dataset's gallery (and queries), index it
    add             --add IMAGES --out DIR                   embed images and append them to an index
    edit            --out DIR --remove ID / --remove-path P / --rerank-neighbours N
                                                             remove items, store neighbour lists (or both)
    vector file     --from-embeddings FILE.npy --out DIR     index vectors embedded elsewhere
    embedding parts --from-embeddings DIR [--shards N [--merge]] [--engine ray]
                                                             index the parts `retrieval embed` wrote

Each job reads the parsed options (IndexArgs), calls the library and prints what it did; a mistake is a
UsageError naming the flags. Heavy libraries are imported inside the jobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.cli import embedder_options as opts
from retrieval.config import CalibrationConfig
from retrieval.errors import UsageError
from retrieval.index.config import IndexConfig
from retrieval.index.knobs import INDEX_KNOBS


@dataclass(frozen=True)
class IndexArgs:
    """The parsed `retrieval index` options, one attribute per flag (see `retrieval index --help`);
    `knobs` holds the index knobs' values (retrieval.index.knobs; None = a calibrated knob not given)."""

    dataset: str | None
    data_root: Path | None
    out: Path | None
    add: list[Path] | None
    remove: list[str] | None
    remove_path: list[str] | None
    rerank_neighbours: int
    checkpoint: Path | None
    backend: str
    model: Path | None
    untrained: bool
    arch: str
    embedding_size: int
    image_size: int
    seed: int
    index_type: str
    knobs: dict[str, int | None]
    memory_budget_gb: float
    gpu: bool
    device: str
    batch_size: int
    target_recall: float
    calibration_queries: int
    from_embeddings: Path | None
    labels: Path | None
    ids: Path | None
    normalize: bool
    max_bad_fraction: float
    strict: bool
    engine: str
    shards: int
    merge: bool
    address: str | None
    workers: int
    store: str
    milvus_uri: str | None
    collection: str | None
    milvus_token_env: str
    upload_batch: int

    def index_settings(self) -> tuple[IndexConfig, CalibrationConfig]:
        """(IndexConfig, CalibrationConfig) of a build; an unknown --index-type is refused here.

        A calibrated knob given on the command line (--nprobe, --ef-search) fixes the search setting:
        calibration then measures it instead of sweeping."""
        given = {name: value for name, value in self.knobs.items() if value is not None}
        cfg = IndexConfig(index_type=self.index_type, memory_budget_gb=self.memory_budget_gb, use_gpu=self.gpu, **given)
        fixed = any(name in given for name, knob in INDEX_KNOBS.items() if knob.calibrated)
        calib = CalibrationConfig(
            target_recall=self.target_recall, queries=self.calibration_queries, seed=self.seed, sweep=not fixed
        )
        return cfg, calib

    def store_record(self, out: Path) -> Any:
        """The Milvus store a build writes into (None for FAISS files); UsageError for a bad store choice."""
        from retrieval.index.stores import STORES

        if self.store not in STORES:
            raise UsageError(f"--store {self.store}: choose {' or '.join(STORES)}")
        if self.store == "faiss":
            if self.milvus_uri or self.collection or self.milvus_token_env:
                raise UsageError("--milvus-uri/--collection/--milvus-token-env need --store milvus")
            return None
        from retrieval.index.milvus_store import MilvusStoreRecord, default_collection_name

        return MilvusStoreRecord(
            self.milvus_uri or "", self.collection or default_collection_name(out), self.milvus_token_env
        )


Job = Callable[[IndexArgs], None]


def pick_job(args: IndexArgs) -> Job:
    """The job the flags ask for; the order of the checks is the order of precedence."""
    edits_existing = (
        args.remove
        or args.remove_path
        or (args.rerank_neighbours and args.dataset is None and not args.add and args.from_embeddings is None)
    )
    if edits_existing:
        return edit
    if args.add:
        return add
    if args.from_embeddings is not None:
        return from_embedding_parts if args.from_embeddings.is_dir() else from_vector_file
    return build


def run_job(args: IndexArgs) -> None:
    """Run the job the flags ask for."""
    pick_job(args)(args)


# -- jobs ------------------------------------------------------------------------------------------


def build(args: IndexArgs) -> None:
    """--dataset NAME --data-root DIR: embed the gallery split (and the queries) and publish an index folder."""
    from rich.markup import escape

    cfg, calib = args.index_settings()
    if args.dataset is None or args.data_root is None:
        raise UsageError("pass --dataset and --data-root (or --add IMAGES --out DIR to extend an index)")
    spec = opts.embedder_spec(
        args.backend,
        args.checkpoint,
        args.model,
        untrained=args.untrained,
        arch=args.arch,
        embedding_size=args.embedding_size,
        image_size=args.image_size,
        seed=args.seed,
    )
    assert spec is not None
    out = args.out or Path("indexes") / args.dataset
    from retrieval.data import load_dataset
    from retrieval.embed.spec import open_embedder
    from retrieval.index.build import build_index

    ds = load_dataset(args.dataset, args.data_root)
    emb_backend = open_embedder(spec, args.device)
    console = _console()
    if args.untrained:
        console.print("[yellow]note:[/yellow] untrained (random) embedder: results are a baseline only")
    gallery = ds.gallery_split()
    console.print(
        f"Indexing {ds.name} {gallery.name} split ({len(gallery):,} images) with the "
        f"{emb_backend.name} embedder {emb_backend.fingerprint} on {escape(emb_backend.device)} "
        f"({emb_backend.preprocessing.describe()})"
    )
    built = build_index(
        ds,
        emb_backend,
        out,
        cfg,
        batch_size=args.batch_size,
        seed=args.seed,
        calib=calib,
        rerank_neighbours=args.rerank_neighbours,
        strict=args.strict,
        max_bad_fraction=args.max_bad_fraction,
        store=args.store_record(out),
        upload_batch=args.upload_batch,
    )
    _summary(console, built, out)
    _report_bad(built.meta.bad_images or [], out)


def add(args: IndexArgs) -> None:
    """--add IMAGES --out DIR: embed the images with the index's embedder (or the one named) and append them."""
    from rich.markup import escape

    from retrieval.embed.spec import open_embedder, open_recorded
    from retrieval.image_files import list_images
    from retrieval.index.build import add_images
    from retrieval.index.stores import open_index

    out = _existing_index(args, "--add needs --out DIR (the index to add to)")
    assert args.add
    spec = opts.embedder_spec(args.backend, args.checkpoint, args.model, required=False)
    n_listed = len(list_images(args.add))  # refuse missing files before any work
    if spec is not None:
        emb_backend = open_embedder(spec, args.device)
    else:
        emb_backend = open_recorded(open_index(out, verify_checksums=False).meta.embedder_source, args.device)
    console = _console()
    console.print(
        f"Adding to {escape(str(out))} with the {emb_backend.name} embedder "
        f"{emb_backend.fingerprint} on {escape(emb_backend.device)}"
    )
    updated, n_added = add_images(
        out,
        args.add,
        emb_backend,
        batch_size=args.batch_size,
        strict=args.strict,
        max_bad_fraction=args.max_bad_fraction,
    )
    console.print(f"[green]added {n_added:,} images[/green]; the index now holds {len(updated):,} items")
    skipped = n_listed - n_added  # the newest entries of the index's bad-image list
    _report_bad(list(updated.meta.bad_images or [])[-skipped:] if skipped else [], out)


def edit(args: IndexArgs) -> None:
    """--out DIR with --remove / --remove-path and/or --rerank-neighbours: change an existing index in place."""
    out = _existing_index(args, "--remove/--remove-path/--rerank-neighbours on an existing index need --out DIR")
    if args.remove or args.remove_path:
        _remove(out, args.remove or [], args.remove_path or [])
    if args.rerank_neighbours:
        _store_neighbour_lists(out, args.rerank_neighbours)


def _remove(out: Path, item_ids: list[str], paths: list[str]) -> None:
    """Remove every gallery image of `item_ids` and the images `paths` from the index at `out`."""
    from rich.markup import escape

    from retrieval.index.build import remove_items

    updated, n_removed = remove_items(out, item_ids, paths)
    _console().print(
        f"[green]removed {n_removed:,} images[/green] from {escape(str(out))}; "
        f"the index now holds {len(updated):,} items"
    )


def _store_neighbour_lists(out: Path, width: int) -> None:
    """Store each gallery item's `width` nearest neighbours in the index at `out` (for --rerank dba)."""
    from rich.markup import escape

    from retrieval.index.build import add_neighbour_lists

    updated = add_neighbour_lists(out, width)
    _console().print(
        f"[green]stored {width}-neighbour lists[/green] of {len(updated):,} items in "
        f"{escape(str(out))} (for --rerank dba)"
    )


def from_vector_file(args: IndexArgs) -> None:
    """--from-embeddings FILE.npy --out DIR: index an (N, D) vector file, with optional labels and ids."""
    from rich.markup import escape

    from retrieval.index.vectors import build_from_vector_file

    cfg, calib = args.index_settings()
    path = _vectors_alone(args)
    if path.suffix.lower() != ".npy":
        raise UsageError(f"--from-embeddings {path}: expected an (N, D) float32 .npy file")
    if args.out is None:
        raise UsageError("--from-embeddings needs --out DIR (the index folder to write)")
    store = args.store_record(args.out)
    console = _console()
    console.print(f"Indexing vectors from {escape(str(path))}")
    built, _ = build_from_vector_file(
        path,
        args.out,
        cfg,
        calib,
        labels_path=args.labels,
        ids_path=args.ids,
        normalize=args.normalize,
        seed=args.seed,
        progress=True,
        store=store,
        upload_batch=args.upload_batch,
    )
    _summary(console, built, args.out)


def from_embedding_parts(args: IndexArgs) -> None:
    """--from-embeddings DIR: one index, N shards or N shards merged from the parts of `retrieval embed`."""
    from retrieval.cli.index_parts import index_from_parts

    cfg, calib = args.index_settings()
    parts_dir = _vectors_alone(args)
    store = args.store_record(args.out or parts_dir)
    index_from_parts(
        parts_dir,
        args.out,
        cfg,
        calib,
        args.engine,
        args.shards,
        args.merge,
        args.address,
        args.workers,
        args.seed,
        store=store,
        upload_batch=args.upload_batch,
    )


# -- shared checks and output ----------------------------------------------------------------------


def _existing_index(args: IndexArgs, message: str) -> Path:
    """The --out folder a job changes, which must be named."""
    if args.out is None:
        raise UsageError(message)
    return args.out


def _vectors_alone(args: IndexArgs) -> Path:
    """The --from-embeddings path, refusing the options that name images or an embedder."""
    assert args.from_embeddings is not None
    if args.dataset is not None or args.checkpoint is not None or args.model is not None or args.untrained:
        raise UsageError("--from-embeddings builds from vectors alone; drop --dataset/--checkpoint/--model/--untrained")
    return args.from_embeddings


def _console() -> Any:
    from rich.console import Console

    return Console()


def _report_bad(bad: list, out: Path) -> None:
    """Count and name the skipped images (all of them are listed in meta.json)."""
    if not bad:
        return
    import sys

    from retrieval.errors import one_line

    sys.stderr.write(
        f"skipped {len(bad)} image(s) that cannot be used (listed under bad_images in {out / 'meta.json'}):\n"
    )
    for item in bad[:20]:
        sys.stderr.write(f"  {one_line(item['reason'])}\n")
    if len(bad) > 20:
        sys.stderr.write(f"  ... and {len(bad) - 20} more\n")


def _summary(console: Any, built: Any, out: Path) -> None:
    """What was written: items, index type and device, sizes, times, and the search setting."""
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
