"""Expected errors and the exit statuses of the `retrieval` command line.

An expected error is one the user can fix (a bad option, a missing or malformed dataset, an image that
cannot be used, an artifact that does not match or is corrupt). Library code raises a subclass of
`UserError` (the domain errors mix it in next to their builtin base, so `except ValueError` still
catches them); the command line prints it as one line on stderr, `error: <message>`, optionally followed
by one `hint: ...` line, and exits with the status below. Anything else is a bug: its traceback is
printed, followed by a line saying so.

Exit statuses (documented in README.md):
    0    success
    1    an expected error: bad input, missing or malformed data, mismatch, corruption
    2    bad command line: unknown or invalid option, impossible combination, bad configuration
    70   internal error (a bug); the traceback is printed
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import sys
import traceback
from typing import TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUG = 70
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A failure the user can fix; `str()` is the whole message (it names the file and what to do)."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(UserError, ValueError):
    """A bad option, option combination or configuration value (exit status 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config file, flag or --set value that cannot be applied; the message says which and why."""


class InputError(UserError, ValueError):
    """Input data that cannot be used (a file, a dataset, an artifact); exit status 1."""


def one_line(text: str) -> str:
    """Messages are printed unwrapped on one line, whatever width the terminal has."""
    return " ".join(str(text).split())


def exit_code_for(exc: BaseException) -> int | None:
    """The exit status of an expected error, or None for a bug.

    OSError counts as expected: a missing file, a permission problem or a full disk is the
    operator's to fix, and its message names the path.
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, UserError):
        return int(exc.exit_code)
    if isinstance(exc, OSError):
        return EXIT_ERROR
    return None


def describe(exc: BaseException) -> tuple[str, str]:
    """(one-line message, hint) of an expected error.

    A message's first paragraph is the error; further paragraphs (after a blank line, such as the
    expected dataset layout) and an explicit `hint` are the hint, printed beneath it as written.
    """
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    first, _, rest = text.strip().partition("\n\n")
    hints = [h.strip("\n") for h in (rest, getattr(exc, "hint", None) or "") if h and h.strip()]
    return one_line(first), "\n".join(hints)


def report(exc: BaseException, stream: TextIO | None = None) -> int:
    """Print `exc` the way the command line does and return the exit status to use."""
    stream = stream if stream is not None else sys.stderr
    code = exit_code_for(exc)
    if code == EXIT_INTERRUPTED:
        stream.write("error: interrupted\n")
    elif code is not None:
        message, hint = describe(exc)
        stream.write(f"error: {message}\n")
        if hint:
            stream.write(f"hint: {hint}\n")
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
        stream.write(
            f"error: internal error ({type(exc).__name__}); this is a bug, please report it with the traceback above\n"
        )
        code = EXIT_BUG
    stream.flush()
    return code
