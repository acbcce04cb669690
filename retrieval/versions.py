"""What an artifact (index folder, embeddings folder) records about how and when it was made, so results can be
traced: the software versions and UTC timestamps."""

from __future__ import annotations

import platform
from datetime import datetime, timezone


def software_versions(*modules: str) -> dict[str, str]:
    """{"metrix-retrieval", "python", "numpy"} plus each named module's __version__ ("faiss", "torch", ...)."""
    import importlib

    import numpy as np

    import retrieval

    versions = {"metrix-retrieval": retrieval.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in modules:
        versions[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return versions


def now_iso() -> str:
    """The current UTC time to the second, ISO 8601 ("2025-01-31T12:00:00+00:00"): every recorded timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
