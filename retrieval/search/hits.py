"""The one search-hit record every client sees: `retrieval search --json`, the JSON API and the web UI.

Paths are relative to the dataset root recorded in the index (so an answer names no server folder
and stays valid when the dataset moves); an item added from outside that root keeps its absolute
path. The file itself is `Searcher.gallery_paths[hit.gallery_index]`. The field descriptions are
read by the API's response schema (app.schemas), so the record is documented once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCORE_DECIMALS = 6  # float32 similarities carry about 7 significant digits


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery item at a rank, with its similarity to the query."""

    rank: int = field(metadata={"description": "1 for the best match"})
    gallery_index: int = field(metadata={"description": "row of the item in the index's item table"})
    item_id: str = field(metadata={"description": "the item's id (product id, class folder name, ...)"})
    label: int = field(metadata={"description": "integer class label; -1 = unlabelled"})
    path: str = field(
        metadata={
            "description": "the image file, relative to the dataset root (absolute for an item added from outside it)"
        }
    )
    score: float = field(metadata={"description": "cosine similarity to the query (higher is closer)"})
    attributes: Mapping[str, str] = field(
        default_factory=dict, metadata={"description": "filterable attributes, e.g. category"}
    )

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values, in field order; the score rounded to SCORE_DECIMALS."""
        return {
            "rank": int(self.rank),
            "gallery_index": int(self.gallery_index),
            "item_id": str(self.item_id),
            "label": int(self.label),
            "path": self.path,
            "score": round(float(self.score), SCORE_DECIMALS),
            "attributes": dict(self.attributes),
        }


HIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Hit))


def dataset_relative(path: str, data_root: str | None) -> str:
    """`path` relative to `data_root` (POSIX separators), or unchanged when outside it or without a root."""
    if data_root:
        prefix = os.path.join(data_root, "")
        if path.startswith(prefix):
            return Path(path[len(prefix) :]).as_posix()
    return path


def hits_as_json(queries: Sequence[str | os.PathLike[str]], results: Sequence[Sequence[Hit]]) -> list[dict[str, Any]]:
    """[{"query": path, "hits": [Hit.to_json()]}], the `results` of `retrieval search --json`."""
    return [{"query": str(Path(q)), "hits": [h.to_json() for h in hits]} for q, hits in zip(queries, results)]
