"""`retrieval datasets`: what datasets are supported, how each must be laid out, and a layout check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.data import DATASETS, dataset_spec


def register(app: typer.Typer) -> None:
    @app.command("datasets")
    def datasets(
        name: Annotated[
            Optional[str], typer.Argument(help=f"Dataset to describe or check ({', '.join(DATASETS)}).")
        ] = None,
        root: Annotated[
            Optional[Path],
            typer.Option("--root", help="Check this folder against the dataset's layout and count its splits."),
        ] = None,
    ) -> None:
        """List supported datasets with protocol, Recall@K and expected folder layout; --root checks a folder."""
        from rich.console import Console
        from rich.table import Table

        from retrieval.errors import InputError, UsageError

        console = Console()
        spec = dataset_spec(name) if name is not None else None
        if root is not None and name is None:
            raise UsageError("--root needs a dataset name, e.g. `retrieval datasets cub --root /data/CUB_200_2011`")

        if root is None:
            from rich.panel import Panel
            from rich.text import Text

            shown = list(DATASETS.values()) if spec is None else [spec]
            table = Table(title="Supported datasets")
            table.add_column("name", style="bold cyan", no_wrap=True)
            table.add_column("dataset")
            table.add_column("protocol", no_wrap=True)
            table.add_column("Recall@K", no_wrap=True)
            for info in shown:
                table.add_row(info.name, info.title, info.protocol, ", ".join(str(k) for k in info.recall_ks))
            console.print(table)
            for info in shown:
                console.print(
                    Panel.fit(Text(info.layout.rstrip()), title=f"{info.name}: expected layout", title_align="left")
                )
            console.print("Check a folder: [bold]retrieval datasets NAME --root PATH[/bold]")
            return

        assert spec is not None
        if spec.name == "demo" and not root.exists():
            raise InputError(f"{root} does not exist; `retrieval demo` draws the demo dataset there")
        ds = spec.load(root)
        table = Table(title=f"{ds.name} at {ds.root}")
        table.add_column("split")
        table.add_column("images", justify="right")
        table.add_column("classes", justify="right")
        for split in (ds.train, ds.test, ds.query, ds.gallery):
            if split is not None:
                table.add_row(split.name, f"{len(split):,}", f"{split.num_classes:,}")
        console.print(table)
        ks = ", ".join(str(k) for k in ds.recall_ks)
        console.print(f"protocol: {ds.protocol}; reported Recall@K: {ks}; all listed image files exist.")
