"""The `retrieval` command line. Each command lives in its own module and registers itself here.

Command modules import only typer at import time; heavy libraries (torch, faiss, gradio,
onnxruntime) are imported inside the commands, so `retrieval --help` is instant and the ONNX path
never loads torch.
"""

from __future__ import annotations

import functools
import importlib
import os
import select
import sys
from collections.abc import Callable
from typing import Any

import typer

from retrieval.errors import EXIT_ERROR, EXIT_USAGE, report

app = typer.Typer(
    name="retrieval",
    help="Train Metrix embedders, index galleries with FAISS, search by photo, export to ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order here is the order shown by `retrieval --help`.
_COMMAND_MODULES = (
    "demo",
    "datasets",
    "prepare",
    "train",
    "embed",
    "index",
    "search",
    "evaluate",
    "plot",
    "compare",
    "export",
    "serve",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"retrieval.cli.{_name}").register(app)


def cli_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command so that an expected error is one line on stderr and a documented exit status
    (retrieval.errors); a bug prints its traceback and says so. Applied to every registered command,
    so commands just raise (UserError, UsageError, or a domain error) and never print errors themselves."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError as exc:
            if not stdout_reader_gone():
                raise typer.Exit(code=report(exc)) from None
            _discard_stdout()  # `retrieval ... | head`: the reader has all it wanted; nothing to report
            raise typer.Exit(code=EXIT_ERROR) from None
        except (Exception, KeyboardInterrupt) as exc:
            sys.stdout.flush()
            raise typer.Exit(code=report(exc)) from None

    run.reports_errors = True  # type: ignore[attr-defined]
    return run


def stdout_reader_gone() -> bool:
    """Whether nothing reads standard output any more (it is a pipe whose reader exited, as `head` does)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout is not a file
        return False


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def handle_errors(typer_app: typer.Typer) -> typer.Typer:
    """Apply `cli_errors` to every command registered on `typer_app` (once each)."""
    for info in typer_app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "reports_errors", False):
            info.callback = cli_errors(info.callback)
    return typer_app


handle_errors(app)


def main() -> None:
    """Console entry point: command-line mistakes caught by the option parser are one line on stderr too."""
    try:  # typer >= 0.24 vendors click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_exceptions  # type: ignore[no-redef]

    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx is not None else str(exc))
        code = 0
    except click_exceptions.ClickException as exc:
        ctx = getattr(exc, "ctx", None)  # UsageError and its kind carry the command's context
        command = ctx.command_path if ctx is not None else "retrieval"
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}\n")
        sys.stderr.write(f"hint: see `{command} --help`\n")
        code = exc.exit_code if exc.exit_code else EXIT_USAGE
    except typer.Abort:  # end of input at a prompt, or Ctrl-C while Typer was reading the command line
        sys.stderr.write("error: interrupted\n")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
