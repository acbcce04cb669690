"""The software versions an artifact records (index folders, embeddings folders), so results can be traced."""

from __future__ import annotations

import platform


def software_versions(*modules: str) -> dict[str, str]:
    """{"metrix-retrieval", "python", "numpy"} plus each named module's __version__ ("faiss", "torch", ...)."""
    import importlib

    import numpy as np

    import retrieval

    versions = {"metrix-retrieval": retrieval.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in modules:
        versions[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return versions
