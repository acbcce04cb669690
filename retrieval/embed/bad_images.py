"""Embed a list of image files, skipping the ones that cannot be used instead of stopping at the first.

A gallery of a million photos always holds a few broken files; one of them must not cost the whole
build. Files are first checked from their headers (cheap, in threads), which catches missing files,
non-images, oversized and over-elongated images; files whose pixel data turns out corrupt while
embedding are found by re-embedding their chunk without them. The caller decides how many bad files
are acceptable (`max_bad_fraction`); `strict` stops at the first, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retrieval.errors import InputError
from retrieval.images import ImageLoadError, probe_image

DEFAULT_MAX_BAD_FRACTION = 0.01
CHUNK_BATCHES = 8  # embedding chunk = this many batches; a corrupt file costs one chunk's re-embedding
PROBE_THREADS = 8
SHOWN = 10  # bad files named in an error message (all of them are in the index metadata)


@dataclass
class EmbedResult:
    """Embeddings of the usable files, which files those are, and why the others were skipped."""

    emb: np.ndarray  # (n_kept, D) float32, L2-normalised, in the order of `kept`
    kept: np.ndarray  # (n_kept,) int64 indices into the input list, ascending
    bad: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} per skipped file


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def embed_skipping_bad(
    backend: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 64,
    progress: bool = True,
    strict: bool = False,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    what: str = "images",
) -> EmbedResult:
    """Embed `paths` with `backend.embed_paths`; raise InputError when more than `max_bad_fraction`
    of them cannot be used (or, with `strict`, at the first one)."""
    n = len(paths)
    if strict or n == 0:
        return EmbedResult(
            backend.embed_paths(list(paths), batch_size=batch_size, progress=progress), np.arange(n, dtype=np.int64)
        )
    with ThreadPoolExecutor(min(PROBE_THREADS, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(probe_image, paths))
    bad = {i: r for i, r in enumerate(reasons) if r is not None}
    _check_fraction(bad, paths, n, max_bad_fraction, what)

    good = [i for i in range(n) if i not in bad]
    chunk = max(1, batch_size * CHUNK_BATCHES)
    parts: list[np.ndarray] = []
    kept: list[int] = []
    bar = tqdm(total=len(good), desc=f"embedding {what}", unit="img", disable=not progress)
    for start in range(0, len(good), chunk):
        todo = good[start : start + chunk]
        while todo:
            try:
                parts.append(backend.embed_paths([paths[i] for i in todo], batch_size=batch_size, progress=False))
                kept += todo
                break
            except ImageLoadError as exc:
                culprit = next((i for i in todo if str(paths[i]) in str(exc)), None)
                if culprit is None:  # the message does not say which: embed one by one
                    emb, ok = _one_by_one(backend, paths, todo, bad)
                    parts.append(emb)
                    kept += ok
                    break
                bad[culprit] = _reason(exc)
                todo = [i for i in todo if i != culprit]
                _check_fraction(bad, paths, n, max_bad_fraction, what)
        bar.update(len(good[start : start + chunk]))
    bar.close()
    _check_fraction(bad, paths, n, max_bad_fraction, what)
    order = np.argsort(np.asarray(kept, dtype=np.int64), kind="stable")
    emb = np.concatenate(parts, axis=0)[order] if parts else np.zeros((0, int(backend.embedding_size)), np.float32)
    listed = [{"path": str(paths[i]), "reason": bad[i]} for i in sorted(bad)]
    return EmbedResult(emb, np.asarray(kept, dtype=np.int64)[order], listed)


def _one_by_one(
    backend: Any, paths: Sequence[Any], todo: list[int], bad: dict[int, str]
) -> tuple[np.ndarray, list[int]]:
    rows, ok = [], []
    for i in todo:
        try:
            rows.append(backend.embed_paths([paths[i]], batch_size=1, progress=False))
            ok.append(i)
        except ImageLoadError as exc:
            bad[i] = _reason(exc)
    emb = np.concatenate(rows, axis=0) if rows else np.zeros((0, int(backend.embedding_size)), np.float32)
    return emb, ok


def _check_fraction(bad: dict[int, str], paths: Sequence[Any], n: int, max_bad_fraction: float, what: str) -> None:
    if bad and len(bad) > max_bad_fraction * n:
        shown = "; ".join(bad[i] for i in sorted(bad)[:SHOWN])
        more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
        raise InputError(
            f"{len(bad)} of {n} {what} cannot be used, more than --max-bad-fraction {max_bad_fraction:g} allows: "
            f"{shown}{more}; fix or remove them, or raise --max-bad-fraction"
        )
