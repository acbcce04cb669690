"""`retrieval export`: a checkpoint -> one verified ONNX file that the onnx backend serves without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint written by `retrieval train`."),
        out: Path = typer.Option(Path("model.onnx"), "--out", help="ONNX file to write."),
        opset: int = typer.Option(18, "--opset", min=9, help="ONNX opset (>= 18: torch.export-based exporter)."),
        fp16: bool = typer.Option(
            False, "--fp16", help="Weights and compute in fp16 (half the file); inputs/outputs stay fp32."
        ),
        batch_size: Optional[int] = typer.Option(
            None, "--batch-size", min=1, help="Fix the batch size (default: dynamic batch axis)."
        ),
        external_data: bool = typer.Option(
            False, "--external-data", help="Weights in OUT.data beside the model (needed above 2 GB)."
        ),
        parity_images: Optional[Path] = typer.Option(
            None, "--parity-images", help="Folder of images for the parity check (default: the checkpoint's dataset)."
        ),
        dataset: Optional[str] = typer.Option(
            None, "--dataset", help="Dataset for parity images (default: the checkpoint's)."
        ),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="Its folder (default: the checkpoint's)."),
        parity_count: int = typer.Option(8, "--parity-count", min=1, help="Images in the parity check."),
        no_parity: bool = typer.Option(False, "--no-parity", help="Skip the onnxruntime-vs-torch parity check."),
        providers: Optional[str] = typer.Option(
            None, "--providers", help="Comma-separated onnxruntime providers for the parity run (default: CPU)."
        ),
    ) -> None:
        """Export the full embedder (trunk, pooling, head, L2 norm) to ONNX and check it against torch.

        The file records the checkpoint's fingerprint and preprocessing, so indexes built with the torch backend
        are searchable with `--backend onnx --model OUT` and vice versa.

        Parity fails (exit 1, nothing written) if max abs diff > 1e-4 (fp32) or min cosine < 0.999 (fp16).
        """
        from rich.console import Console
        from rich.markup import escape

        from retrieval.errors import UserError
        from retrieval.export import ParityError, export_checkpoint

        console = Console()
        provider_list = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
        try:
            result = export_checkpoint(
                checkpoint,
                out,
                opset=opset,
                fp16=fp16,
                batch_size=batch_size,
                external_data=external_data,
                parity=not no_parity,
                parity_folder=parity_images,
                dataset=dataset,
                data_root=data_root,
                parity_count=parity_count,
                providers=provider_list,
            )
        except ParityError as exc:
            raise UserError(f"parity check failed: {exc}") from None
        console.print(f"Exported {escape(str(checkpoint))} -> [bold]{escape(str(out))}[/bold] "
                      f"(opset {opset}, {'fp16' if fp16 else 'fp32'}, "
                      f"batch {'dynamic' if batch_size is None else batch_size})")  # fmt: skip
        for note in result.notes:
            console.print(f"[yellow]note:[/yellow] {escape(note)}")
        meta = result.metadata
        if result.parity is not None:
            console.print(f"[green]{escape(result.parity.summary())}[/green]")
            if "random tensors" in result.parity.source:
                console.print("[yellow]Parity used random tensors, not real images; pass --parity-images FOLDER "
                              "to check on photos.[/yellow]")  # fmt: skip
        files = ", ".join(str(f) for f in result.files)
        console.print(f"Wrote {escape(files)} ({result.size_bytes / 2**20:.1f} MiB): {meta['arch']}, "
                      f"{meta['embedding_size']}-d, {meta['image_size']} px (test-time resize {meta['resize_size']} "
                      f"px), fingerprint {meta['fingerprint']}")  # fmt: skip
        console.print(
            f"Serve it without torch: retrieval serve --index INDEX --backend onnx --model {escape(str(out))}"
        )
