"""The two ways an index goes wrong for a user: it cannot be built as asked, or its files cannot be read."""

from __future__ import annotations

from retrieval.errors import UserError


class IndexBuildError(UserError, ValueError):
    """The requested index cannot be built from these vectors; the message says what to change."""


class IndexFileError(UserError, ValueError):
    """An index file is missing, truncated, corrupt or unreadable; the message names the file."""
