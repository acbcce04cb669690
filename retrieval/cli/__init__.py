"""The `retrieval` command line. Each command lives in its own module and registers itself here.

Command modules import only typer at import time; heavy libraries (torch, faiss, gradio,
onnxruntime) are imported inside the commands, so `retrieval --help` is instant and the ONNX path
never loads torch.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="retrieval",
    help="Train Metrix embedders, index galleries with FAISS, search by photo, export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order here is the order shown by `retrieval --help`.
_COMMAND_MODULES = ("demo", "datasets", "prepare", "train", "embed", "index", "search", "evaluate", "plot", "compare",
                    "export", "serve")

for _name in _COMMAND_MODULES:
    importlib.import_module(f"retrieval.cli.{_name}").register(app)


def main() -> None:
    app()
