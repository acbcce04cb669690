"""The ways an index goes wrong for a user: it cannot be built as asked, its files cannot be read, or it
holds nothing a requested re-ranking needs."""

from __future__ import annotations

from retrieval.errors import UsageError, UserError


class IndexBuildError(UserError, ValueError):
    """The requested index cannot be built from these vectors; the message says what to change."""


class IndexFileError(UserError, ValueError):
    """An index file is missing, truncated, corrupt or unreadable; the message names the file."""


class RerankError(UsageError):
    """A re-ranking that cannot run on this index (unknown method, neighbour lists missing or stale)."""
