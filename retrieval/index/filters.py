"""Item attributes and exact metadata filters inside the FAISS search.

Items carry string attributes from their dataset (each dataset's rule in the retrieval.data registry),
stored in the index folder's item table:

    inshop, demo   gender, category      from the image path (img/WOMEN/Dresses/id_.../...)
    sop            super_category        from the image folder (bicycle_final/... -> bicycle)
    folder         folder                the sub-folder path of the image (class_a, class_a/sub, ...)
    cub, cars      class                 the class (folder name / model name)

A filter (`--where category=Dresses`, the API's `filter`, the UI dropdown) keeps the items whose
attributes match every key given, any of the values given for one key. It is applied inside the FAISS
search through an ID selector (`SearchParameters(sel=...)`), so a flat index returns exactly the top K
of the subset, and IVF/HNSW search the subset with their usual recall (the subset is never shortlisted
from an unfiltered result). Filtered searches run on the CPU index: FAISS GPU indexes take no selector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import faiss
import numpy as np

from retrieval.errors import UsageError

Where = dict[str, frozenset[str]]  # attribute -> accepted values (a key's values are OR-ed, keys AND-ed)


class FilterError(UsageError):
    """A filter that cannot be applied (bad syntax, unknown attribute); the message says what exists."""


# --- attribute values --------------------------------------------------------------------------------


def attribute_values(attributes: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """attribute -> its sorted distinct values over all items (what a dropdown offers)."""
    seen: dict[str, set[str]] = {}
    for attrs in attributes:
        for key, value in attrs.items():
            seen.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in sorted(seen.items())}


# --- filters ----------------------------------------------------------------------------------------


def parse_where(terms: Iterable[str] | Mapping[str, Any] | None) -> Where:
    """`["category=Dresses", "gender=WOMEN"]` or `{"category": "Dresses"}` / `{"category": [..]}` -> Where.

    Repeating a key accepts any of its values; different keys must all match.
    """
    if not terms:
        return {}
    pairs: list[tuple[str, str]] = []
    if isinstance(terms, Mapping):
        for key, value in terms.items():
            values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            pairs += [(str(key), str(v)) for v in values]
    else:
        for term in terms:
            if not isinstance(term, str) or "=" not in term:
                raise FilterError(f"filter {term!r} is not KEY=VALUE (e.g. category=Dresses)")
            key, value = term.split("=", 1)
            pairs.append((key.strip(), value.strip()))
    where: dict[str, set[str]] = {}
    for key, value in pairs:
        if not key or not value:
            raise FilterError(f"filter {key}={value} needs both a key and a value (e.g. category=Dresses)")
        where.setdefault(key, set()).add(value)
    return {key: frozenset(values) for key, values in where.items()}


def format_where(where: Where) -> str:
    return " and ".join(f"{k}={'|'.join(sorted(v))}" for k, v in sorted(where.items()))


def matching_ids(attributes: Sequence[Mapping[str, str]], where: Where) -> np.ndarray:
    """Sorted int64 row ids of the items matching `where`; FilterError for an attribute no item has."""
    known = {key for attrs in attributes for key in attrs}
    unknown = sorted(set(where) - known)
    if unknown:
        offered = ", ".join(sorted(known)) or "none (this index stores no item attributes; rebuild it to filter)"
        raise FilterError(f"unknown filter attribute {unknown[0]!r}; this index's items have: {offered}")
    keep = [i for i, attrs in enumerate(attributes) if all(attrs.get(key) in values for key, values in where.items())]
    return np.asarray(keep, dtype=np.int64)


# --- FAISS search restricted to a subset -------------------------------------------------------------


def id_selector(ids: np.ndarray, ntotal: int) -> tuple[Any, np.ndarray]:
    """(IDSelectorBitmap, its bitmap): O(1) membership per scanned vector. Keep the bitmap alive while searching."""
    bitmap = np.zeros((ntotal + 7) // 8, dtype=np.uint8)
    ids = np.asarray(ids, dtype=np.int64)
    np.bitwise_or.at(bitmap, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
    return faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bitmap)), bitmap


def search_parameters(index: faiss.Index, selector: Any) -> Any:
    """Search parameters carrying `selector` plus the index's current knobs (nprobe, efSearch, k_factor)."""
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        base = search_parameters(down.base_index, selector)
        return faiss.IndexRefineSearchParameters(k_factor=float(down.k_factor), base_index_params=base, sel=selector)
    if isinstance(down, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(down.nprobe))
    if isinstance(down, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(down.hnsw.efSearch))
    return faiss.SearchParameters(sel=selector)


def filtered_search(index: faiss.Index, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the subset `ids` for (Q, D) float32 queries: (scores (Q, k'), ids (Q, k')), -1 = none,
    k' = min(k, |ids|)."""
    k = int(min(k, len(ids)))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), max(k, 0)), np.float32), np.full((len(queries), max(k, 0)), -1, np.int64)
    selector, bitmap = id_selector(ids, index.ntotal)
    params = search_parameters(index, selector)
    # faiss.contrib.torch_utils (imported by pytorch-metric-learning, among others) replaces Index.search with a
    # version that takes no search parameters and keeps FAISS's own NumPy method as search_numpy: call that one.
    search = getattr(index, "search_numpy", index.search)
    scores, found = search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
    del bitmap  # the selector read it during the search
    return scores, found
