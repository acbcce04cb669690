"""Evaluation results computed once per index and kept beside it in `eval_cache.json`.

Evaluating the stored query set can take minutes on a real gallery, so the app computes it on first
request and caches it. The cache is keyed by the index's identity (its metadata, which changes on
every rebuild, and the embedder fingerprint) and by the backend that computed it, so a rebuilt index
or another embedder never shows stale numbers. Written atomically; an unwritable index folder keeps
the result in memory and says so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write_json

CACHE_FILE = "eval_cache.json"
CACHE_VERSION = 1

log = logging.getLogger(__name__)


def index_cache_key(meta: Mapping[str, Any], fingerprint: str, backend: str) -> str:
    """sha256 over the index metadata (checksums, build time, fingerprint) plus the embedder in use."""
    blob = json.dumps({"meta": meta, "fingerprint": fingerprint, "backend": backend}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, float]  # "R@1", ..., "MAP@R": fractions in [0, 1]
    computed_at: str  # ISO 8601, UTC
    seconds: float  # how long the computation took
    from_cache: bool  # read from eval_cache.json (or memory) rather than computed by this call
    cache_path: Path | None  # None when the index folder is not writable
    note: str = ""


class EvaluationCache:
    """Thread-safe compute-once wrapper around `compute()` persisted at `<index_dir>/eval_cache.json`."""

    def __init__(self, index_dir: str | os.PathLike[str], key: str, compute: Callable[[], Mapping[str, float]]) -> None:
        self.path = Path(index_dir) / CACHE_FILE
        self.key = key
        self._compute = compute
        self._lock = threading.Lock()
        self._memory: EvaluationResult | None = None

    def _read(self) -> EvaluationResult | None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable evaluation cache %s (%s); recomputing", self.path, exc)
            return None
        if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or raw.get("key") != self.key:
            return None
        try:
            metrics = {str(k): float(v) for k, v in raw["metrics"].items()}
            return EvaluationResult(metrics, str(raw["computed_at"]), float(raw["seconds"]), True, self.path)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def get(self, recompute: bool = False) -> EvaluationResult:
        """The cached result, or a fresh computation when asked for or when none matches this index."""
        with self._lock:
            if not recompute:
                if self._memory is not None:
                    return EvaluationResult(**{**self._memory.__dict__, "from_cache": True})
                cached = self._read()
                if cached is not None:
                    self._memory = cached
                    return cached
            start = time.perf_counter()
            metrics = {str(k): float(v) for k, v in self._compute().items()}
            seconds = time.perf_counter() - start
            computed_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            record = {
                "version": CACHE_VERSION,
                "key": self.key,
                "metrics": metrics,
                "computed_at": computed_at,
                "seconds": round(seconds, 3),
            }
            path: Path | None = self.path
            note = ""
            try:
                atomic_write_json(self.path, record)
            except OSError as exc:
                path = None
                note = (
                    f"could not write {CACHE_FILE} beside the index ({exc.strerror or exc.__class__.__name__}); "
                    "the result is kept in memory only"
                )  # the page never shows the server's paths
                log.warning("could not write %s (%s); the evaluation is kept in memory only", self.path, exc)
            self._memory = EvaluationResult(metrics, computed_at, seconds, False, path, note)
            return self._memory
