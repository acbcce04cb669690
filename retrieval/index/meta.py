"""An index folder's metadata (meta.json) as one typed record, read and written only here.

meta.json stays plain JSON, written atomically and last (its presence marks a complete folder). Its
`format` names what the file is and has not changed since the first release, so older releases
still open folders they can read; `format_version` counts changes to what it records:

    1  no `format_version` key: every folder written before the version was recorded
    2  `format_version` recorded; `index_params` always present

A folder of an older version is migrated on reading (and written back as the current one when it
is next saved). A newer version is refused, saying which release wrote it. Keys this version does not
know are kept as they are and written back, so a folder passing through an older release loses nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write_json, read_json
from retrieval.index.errors import IndexFileError
from retrieval.index.types import IndexParams

INDEX_FORMAT = "metrix-retrieval/index/1"
FORMAT_VERSION = 2
NORMALISATION = "l2"
METRIC = "inner_product"
META_FILE = "meta.json"
_DERIVED = ("format", "metric", "index_type", "index_factory", "n_bad_images")  # written from other fields
_RUNTIME = ("folder", "extra")  # never written as keys of their own


@dataclass
class IndexMeta:
    """What an index folder records about its gallery, embedder and build. None = not recorded (the key
    is left out of meta.json), as for indexes built from vectors, which have no preprocessing."""

    format_version: int = FORMAT_VERSION
    # what was indexed
    dataset: str = ""
    data_root: str | None = None  # paths in items.json are relative to it; "" = absolute paths
    split: str = ""
    protocol: str = "all-vs-all"  # or "query-gallery" (stored queries)
    recall_ks: list[int] | None = None
    # the embedder
    fingerprint: str = ""
    embedding_size: int = 0
    normalisation: str = NORMALISATION
    preprocessing: dict[str, Any] | None = None
    backend: str | None = None
    embed_device: str | None = None
    embedder_source: dict[str, Any] = field(default_factory=dict)  # how search re-opens the embedder
    # the build
    index_device: str = ""
    index_note: str = ""
    index_config: dict[str, Any] = field(default_factory=dict)
    embed_seconds: float = 0.0
    train_seconds: float = 0.0
    add_seconds: float = 0.0
    build_seconds: float = 0.0
    created_at: str = ""
    updated_at: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    built_from: dict[str, Any] | None = None  # an embeddings folder: where, how, which shards
    bad_images: list[dict[str, Any]] | None = None  # images skipped while embedding, with the reason
    calibration: dict[str, Any] | None = None  # retrieval.index.calibrate.Calibration.to_dict()
    calibration_rejected: dict[str, Any] | None = None
    index_decision: str | None = None  # why auto chose the type, when not the plain size rule
    auto_candidates: list[dict[str, Any]] | None = None  # what auto measured: each type's speed, recall, memory
    # the saved folder
    n_items: int = 0
    n_queries: int = 0
    index_params: IndexParams | None = None  # as calibrated; search may override them in memory
    saved_at: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    rerank: dict[str, Any] | None = None  # neighbour lists: width and the index file they belong to
    shards: list[dict[str, Any]] | None = None  # sharded folders: file, n_items, first_id of each shard
    # vectors and items kept in a database: {"kind": "milvus", "uri", "collection", "token_env", "keys_sha256"}
    store: dict[str, Any] | None = None
    # not written
    folder: str = ""  # where it was loaded from or saved to
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as read

    @property
    def index_type(self) -> str:
        return self.index_params.index_type if self.index_params is not None else ""

    @property
    def index_factory(self) -> str:
        return self.index_params.factory_string() if self.index_params is not None else ""

    def to_dict(self) -> dict[str, Any]:
        """The meta.json form."""
        out: dict[str, Any] = {"format": INDEX_FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _RUNTIME or value is None:
                continue
            if isinstance(value, IndexParams):
                out.update(index_type=value.index_type, index_params=value.to_dict(), index_factory=self.index_factory)
            elif f.name == "bad_images":
                out.update(n_bad_images=len(value), bad_images=value)
            else:
                out[f.name] = value
        out["metric"] = METRIC
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: Path | str = META_FILE) -> IndexMeta:
        """Read the meta.json form of any version up to FORMAT_VERSION; IndexFileError naming `source` else."""
        if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
            raise IndexFileError(f"{source} is not metrix-retrieval index metadata (format {INDEX_FORMAT} expected)")
        version = raw.get("format_version", 1)
        if not isinstance(version, int) or version < 1:
            raise IndexFileError(f"{source} records an invalid format_version {version!r}; rebuild the index")
        if version > FORMAT_VERSION:
            raise IndexFileError(_newer_message(raw, version, source))
        for step in range(version, FORMAT_VERSION):
            raw = _MIGRATIONS[step](dict(raw))
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME)
        values = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in _DERIVED}
        try:
            if values.get("index_params") is not None:
                values["index_params"] = IndexParams.from_dict(values["index_params"])
            return cls(**values, extra=extra)
        except (TypeError, ValueError, AttributeError) as exc:
            raise IndexFileError(f"{source} holds unreadable index metadata ({exc}); rebuild the index") from exc


def _newer_message(raw: dict[str, Any], version: int, source: Path | str) -> str:
    import retrieval

    versions = raw.get("versions")
    writer = versions.get("metrix-retrieval") if isinstance(versions, dict) else None
    by = f"metrix-retrieval {writer}" if writer else "a newer metrix-retrieval"
    return (
        f"{source} was written by {by} (index format version {version}); this is metrix-retrieval "
        f"{retrieval.__version__}, which reads versions up to {FORMAT_VERSION}. Open it with that release "
        "or newer, or rebuild the index with this one (`retrieval index`)"
    )


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 folders from before index parameters were recorded hold only their type."""
    raw.setdefault("index_params", {"index_type": raw.get("index_type", "flat")})
    raw["format_version"] = 2
    return raw


_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _from_version_1}  # version -> next


def read_meta(path: Path) -> IndexMeta:
    """An index folder's meta.json (the caller has checked it exists)."""
    try:
        raw = read_json(path, "index metadata")
    except ValueError as exc:
        raise IndexFileError(str(exc)) from exc
    return IndexMeta.from_dict(raw, path)


def write_meta(path: Path, meta: IndexMeta) -> None:
    atomic_write_json(path, meta.to_dict())
