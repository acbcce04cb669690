"""`retrieval embed`: embed a dataset (what `retrieval index` embeds) or images into a resumable parts folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import embedder_options as opts
from retrieval.embed import ENGINES


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed(
        images: Optional[list[Path]] = typer.Argument(None, help="Image files or folders (instead of --dataset)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="cub | cars | sop | inshop | folder | demo."),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="The dataset's folder (official layout)."),
        out: Path = typer.Option(..., "--out", help="Embeddings folder (created, or resumed when it exists)."),
        checkpoint: Optional[Path] = opts.checkpoint_option(),
        backend: str = opts.backend_option(),
        model: Optional[Path] = opts.model_option(),
        untrained: bool = opts.untrained_option(),
        arch: str = opts.arch_option(),
        embedding_size: int = opts.embedding_size_option(),
        image_size: int = opts.image_size_option(),
        seed: int = typer.Option(0, "--seed", help="With --untrained: initialisation seed."),
        device: str = typer.Option("auto", "--device", help="Local engine: auto | cpu | cuda[:N]."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
        part_size: int = typer.Option(4096, "--part-size", min=1, help="Images per part (the unit of resumption)."),
        dtype: str = typer.Option("float32", "--dtype", help="Stored embeddings: float32 | float16."),
        engine: str = typer.Option(
            "local", "--engine", help=f"{' | '.join(ENGINES)}: this process, or a Ray actor pool."
        ),
        address: Optional[str] = typer.Option(
            None, "--address", help="Ray: auto (running cluster) | HOST:PORT; default starts Ray here."
        ),
        workers: int = typer.Option(2, "--workers", min=1, help="Ray: actors, each loading the embedder once."),
        cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="Ray: CPUs per actor."),
        gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="Ray: GPUs per actor (0 = CPU)."),
        retries: int = typer.Option(2, "--retries", min=0, help="Ray: restarts of a dead actor before stopping."),
    ) -> None:
        """Embed the gallery (and stored queries) of a dataset, or images, into parts: resumable, any engine.

        Each part is written atomically with a completion marker; rerunning the same command after a
        crash embeds only the missing parts. Unreadable images are skipped and listed in the manifest.
        Build an index from the folder with `retrieval index --from-embeddings DIR`.
        """
        from rich.console import Console
        from rich.markup import escape

        from retrieval.errors import UsageError

        console = Console(soft_wrap=True)

        def fail(message: str) -> None:
            raise UsageError(message)

        if (dataset is None) == (not images):
            fail("pass either --dataset NAME --data-root PATH or image files/folders, not both")
        if dataset is not None and data_root is None:
            fail("--dataset needs --data-root PATH")
        spec = opts.embedder_spec(
            backend,
            checkpoint,
            model,
            untrained=untrained,
            arch=arch,
            embedding_size=embedding_size,
            image_size=image_size,
            seed=seed,
        )
        assert spec is not None
        from retrieval.embed.engines import embed_to_parts
        from retrieval.embed.job import EmbedOptions, source_from_dataset, source_from_images
        from retrieval.embed.ray_engine import RayOptions
        from retrieval.embed.spec import open_embedder

        options = EmbedOptions(part_size=part_size, dtype=dtype, batch_size=batch_size)
        ray_options = RayOptions(
            address=address,
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            retries=retries,
        )
        if dataset is not None:
            from retrieval.data import load_dataset

            source = source_from_dataset(load_dataset(dataset, data_root))  # type: ignore[arg-type]
        else:
            source = source_from_images(images or [])
        # the driver opens the embedder for its facts (fingerprint, size); Ray actors open their own copy
        local_device = "cpu" if engine == "ray" else device
        emb_backend = open_embedder(spec, local_device)
        n = sum(len(r.paths) for r in source.roles)
        where = f"Ray, {workers} workers" if engine == "ray" else escape(emb_backend.device)
        console.print(
            f"Embedding {n:,} images of {escape(source.dataset)} "
            f"({', '.join(f'{r.role}: {len(r.paths):,}' for r in source.roles)}) with the "
            f"{emb_backend.name} embedder {emb_backend.fingerprint} on {where} into {escape(str(out))}"
        )
        report = embed_to_parts(out, source, emb_backend, options, engine=engine, ray_options=ray_options)
        m = report.manifest
        rate = f"{report.images_per_second:,.1f} images/s" if report.images else "nothing left to embed"
        console.print(
            f"[green]{escape(str(out))} complete[/green]: {report.parts_total} parts ({report.parts_done_before} "
            f"already done, {len(report.results)} embedded now, {rate}); "
            f"{sum(m.get('embedded', {}).values()):,} embeddings ({m['dtype']}), {m.get('n_bad', 0)} unreadable "
            "images listed in manifest.json"
        )
        console.print(f"next: retrieval index --from-embeddings {escape(str(out))} --out INDEX_DIR")
