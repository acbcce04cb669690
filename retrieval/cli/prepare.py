"""`retrieval prepare`: decode a dataset once into the image cache that `--cache` training reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from retrieval.data import dataset_choices
from retrieval.data.cache.layout import CACHE_DIR_NAME, DEFAULT_MAX_SHORT_SIDE, DEFAULT_SHORT_SIDE, default_cache_dir


def register(app: typer.Typer) -> None:
    @app.command("prepare")
    def prepare(
        dataset: str = typer.Option(..., "--dataset", help=f"{dataset_choices()}."),
        data_root: Path = typer.Option(..., "--data-root", help="The dataset folder (official layout)."),
        out: Optional[Path] = typer.Option(None, "--out", help=f"Cache folder (default: DATA_ROOT/{CACHE_DIR_NAME})."),
        short_side: int = typer.Option(
            DEFAULT_SHORT_SIDE,
            "--short-side",
            min=32,
            help="Evaluation images' short side in pixels (the test transform's resize).",
        ),
        max_side: int = typer.Option(
            DEFAULT_MAX_SHORT_SIDE,
            "--max-side",
            min=0,
            help="Training images are stored at their own resolution, short side capped at "
            "this many pixels (0 = no cap), so random crops are as sharp as from the files.",
        ),
        splits: Optional[str] = typer.Option(
            None, "--splits", help="Comma-separated splits to cache (default: all of the dataset's splits)."
        ),
        workers: int = typer.Option(
            min(8, os.cpu_count() or 1), "--workers", min=0, help="Decoding processes (0 = in this process)."
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="Rewrite splits whose cache is already up to date."),
    ) -> None:
        """Decode every image once into memory-mappable files: training images at their own resolution (short
        side capped by --max-side), evaluation images at the test transform's short side.

        Interrupted runs resume where they stopped; unreadable images are listed and skipped.
        Train with `retrieval train ... --cache OUT` afterwards.
        """
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from retrieval.data import load_dataset
        from retrieval.data.cache.writer import prepare_split
        from retrieval.errors import UsageError

        console = Console()
        ds = load_dataset(dataset, data_root)
        available = {s.name: s for s in (ds.train, ds.test, ds.query, ds.gallery) if s is not None}
        wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else list(available)
        unknown = [s for s in wanted if s not in available]
        if unknown:
            raise UsageError(f"--splits: {dataset} has no split(s) {unknown}; choose from {list(available)}")
        cache_dir = out if out is not None else default_cache_dir(ds.root)
        cap = f"up to {max_side} px" if max_side else "uncapped"
        console.print(
            f"Caching {dataset} ({', '.join(wanted)}) into [bold]{cache_dir}[/bold]: training images at full "
            f"resolution (short side {cap}), others at short side {short_side} px"
        )

        table = Table(title="image cache")
        for col in ("split", "images", "skipped", "size", "status"):
            table.add_column(col, justify="right" if col in ("images", "skipped", "size") else "left")
        any_skipped = False
        for name in wanted:
            report = prepare_split(
                available[name], cache_dir, dataset=ds.name, root=ds.root, short_side=short_side,
                workers=workers, overwrite=overwrite,
                log=lambda msg: console.print(f"  [yellow]{escape(msg)}[/yellow]"),
                max_short_side=max_side if name == ds.train.name else None,
            )  # fmt: skip
            status = "up to date" if report.up_to_date else f"written in {report.seconds:.1f} s"
            if report.resumed_from:
                status += f" (resumed at {report.resumed_from:,})"
            table.add_row(
                name, f"{report.count:,}", str(len(report.skipped)), f"{report.total_bytes / 2**30:.2f} GiB", status
            )
            if report.skipped:
                any_skipped = True
                if report.up_to_date:  # not logged during this run
                    for item in report.skipped[:20]:
                        text = item["reason"] if item["path"] in item["reason"] else f"{item['path']}: {item['reason']}"
                        console.print(f"  [yellow]skipped {escape(text)}[/yellow]")
                console.print(
                    f"  {len(report.skipped)} unreadable image(s) of split {name!r} are listed in "
                    f"{escape(str(report.path / 'meta.json'))}"
                )
        console.print(table)
        if any_skipped:
            console.print(
                "[yellow]Unreadable images were skipped; training substitutes another image of the same "
                "class when the sampler picks one. Fix or remove them and rerun to include them.[/yellow]"
            )
        console.print(
            f"Train from the cache with: retrieval train --dataset {dataset} --data-root {data_root} "
            f"--cache {cache_dir}"
        )
