"""Milvus as an index store: one collection holds the gallery's vectors and item table; searches go to the server.

    record = MilvusStoreRecord(uri="http://milvus:19530", collection="sop", token_env="MILVUS_TOKEN")
    upload = MilvusUpload(record, items, fingerprint="3fa2...", data_root="/data/SOP")   # a build's store builder
    collection = MilvusCollection.open(record)                                            # a folder's store

The collection's rows are (key INT64 primary, vector FLOAT_VECTOR, label, item_id, path, attributes JSON);
row i of the gallery is the row with the i-th smallest key, so removing keys moves later rows up as in a
FAISS folder, and added items take keys after the largest. Paths inside the dataset root are stored relative
to it. The collection's properties record the embedder fingerprint and the metric: opening a collection
whose fingerprint, dimension, metric or row count disagree with the folder's meta.json is refused, naming
what differs. The token comes from the environment variable the record names; it is never written anywhere.

`MilvusCollection` has what the Searcher's index needs of any store (`d`, `ntotal`, `search`, `configure`),
so build-time calibration (retrieval.index.calibrate) measures it exactly as it measures a FAISS index.
Uploads are upserts by key in batches: a killed upload run again gives the same collection.
pymilvus is imported inside the functions: it is the optional `milvus` extra.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import UsageError
from retrieval.index.errors import IndexBuildError, IndexFileError
from retrieval.index.faiss_index import BuiltIndex, check_embeddings
from retrieval.index.milvus_filters import keys_expression
from retrieval.index.types import IndexParams

if TYPE_CHECKING:
    from retrieval.index.folder import ItemTable

STORE_KIND = "milvus"
COLLECTION_FORMAT = "metrix-retrieval/milvus/1"
METRIC = "IP"  # inner product over L2-normalised vectors = cosine similarity, as the FAISS store
PROPERTY_FORMAT, PROPERTY_FINGERPRINT, PROPERTY_METRIC = "metrix.format", "metrix.fingerprint", "metrix.metric"
DEFAULT_BATCH = 1000  # rows per upsert
# Consistency per call. A Strong read waits for the server's next time tick (about 400 ms per call on Milvus
# standalone 2.3.5, measured; Milvus Lite has none), so only the reads that must see every client's writes take it:
# the row count and the key/item table read when a folder is opened or reloaded. Searches and vector reads take
# Session: they see this client's own writes (a build's upserts, deletes) and, after such a Strong read, the rows it
# counted; 2-3 ms per call on the same server.
READ_ALL_WRITES = "Strong"
SEARCH_CONSISTENCY = "Session"
FETCH_BATCH = 4096  # rows per query when reading vectors or items back (Milvus caps a query's limit at 16,384)
MAX_PATH, MAX_ID = 4096, 1024


def _missing_pymilvus() -> UsageError:
    return UsageError("the Milvus store needs the pymilvus client: pip install -e .[milvus]")


@dataclass(frozen=True)
class MilvusStoreRecord:
    """Where an index folder's vectors live: a Milvus server (URI), a collection, and the environment variable
    holding the token ("" = none). This is what meta.json records as `store`; never the token itself."""

    uri: str
    collection: str
    token_env: str = ""

    def __post_init__(self) -> None:
        if not self.uri:
            raise UsageError("--store milvus needs --milvus-uri (e.g. http://localhost:19530)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", self.collection):
            raise UsageError(
                f"collection name {self.collection!r}: use letters, digits and underscores, not "
                "starting with a digit (--collection NAME)"
            )

    def to_dict(self) -> dict[str, str]:
        return {"kind": STORE_KIND, "uri": self.uri, "collection": self.collection, "token_env": self.token_env}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "meta.json") -> MilvusStoreRecord:
        if not isinstance(raw, dict) or raw.get("kind") != STORE_KIND:
            raise IndexFileError(f"{source} names an unknown index store {raw!r}; this release knows milvus")
        try:
            return cls(str(raw["uri"]), str(raw["collection"]), str(raw.get("token_env") or ""))
        except (KeyError, UsageError) as exc:
            raise IndexFileError(f"{source} has an unreadable Milvus store record ({exc}); rebuild the index") from exc

    def describe(self) -> str:
        return f"milvus {self.uri} collection {self.collection}"

    def token(self) -> str:
        """The token from the named environment variable; UsageError naming it when it is not set."""
        if not self.token_env:
            return ""
        value = os.environ.get(self.token_env)
        if value is None:
            raise UsageError(
                f"the Milvus store {self.uri} needs its token in the environment variable "
                f"{self.token_env}, which is not set"
            )
        return value


def default_collection_name(folder: str | os.PathLike[str]) -> str:
    """A collection name from an index folder's name (letters, digits, underscores)."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(os.path.abspath(os.fspath(folder))))
    return f"metrix_{stem}"[:255]


def connect(record: MilvusStoreRecord) -> Any:
    """A pymilvus MilvusClient for the record's server; UsageError naming the URI when it cannot connect."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise _missing_pymilvus() from exc
    try:
        return MilvusClient(uri=record.uri, token=record.token(), timeout=30)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"cannot reach the Milvus server {record.uri} ({_first_line(exc)}); start it or correct --milvus-uri"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _schema(client: Any, d: int, fingerprint: str) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(d))
    schema.add_field("label", DataType.INT64)
    schema.add_field("item_id", DataType.VARCHAR, max_length=MAX_ID)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field("attributes", DataType.JSON)
    return schema


def collection_facts(client: Any, name: str) -> dict[str, Any]:
    """What a collection says about itself: fingerprint, metric, dimension, format (from its properties/schema)."""
    info = client.describe_collection(name)
    props = info.get("properties") or {}
    dims = [f.get("params", {}).get("dim") for f in info.get("fields", []) if f.get("name") == "vector"]
    return {
        "fingerprint": props.get(PROPERTY_FINGERPRINT, ""),
        "metric": props.get(PROPERTY_METRIC, ""),
        "format": props.get(PROPERTY_FORMAT, ""),
        "dim": int(dims[0]) if dims and dims[0] else 0,
    }


def mismatch(
    facts: dict[str, Any], fingerprint: str, d: int, rows: int | None = None, expected_rows: int | None = None
) -> list[str]:
    """What differs between a collection and what an index folder expects ("" list = nothing)."""
    problems = []
    if facts["format"] != COLLECTION_FORMAT:
        problems.append(f"it is not a metrix-retrieval collection (format {facts['format'] or 'none'!r})")
    if facts["fingerprint"] != fingerprint:
        problems.append(f"embedder fingerprint {facts['fingerprint'] or 'none'} != {fingerprint}")
    if facts["dim"] != int(d):
        problems.append(f"dimension {facts['dim']} != {d}")
    if facts["metric"] != METRIC:
        problems.append(f"metric {facts['metric'] or 'none'} != {METRIC}")
    if rows is not None and expected_rows is not None and rows != expected_rows:
        problems.append(f"row count {rows:,} != {expected_rows:,}")
    return problems


def count_rows(client: Any, name: str) -> int:
    raw = client.query(name, filter="", output_fields=["count(*)"], consistency_level=READ_ALL_WRITES)
    return int(raw[0]["count(*)"])


def read_keys_and_items(client: Any, name: str, data_root: str | None) -> tuple[np.ndarray, ItemTable]:
    """(sorted keys, the item table in key order) of the whole collection, read in pages by key."""
    from retrieval.index.folder import ItemTable

    keys: list[int] = []
    paths: list[str] = []
    labels: list[int] = []
    item_ids: list[str] = []
    attributes: list[dict[str, str]] = []
    last = -1
    while True:
        page = client.query(
            name,
            filter=f"key > {last}",
            output_fields=["key", "label", "item_id", "path", "attributes"],
            limit=FETCH_BATCH,
            consistency_level=READ_ALL_WRITES,
        )
        if not page:
            break
        page = sorted(page, key=lambda r: int(r["key"]))
        for row in page:
            keys.append(int(row["key"]))
            paths.append(str(row["path"]))
            labels.append(int(row["label"]))
            item_ids.append(str(row["item_id"]))
            attributes.append({str(k): str(v) for k, v in (row.get("attributes") or {}).items()})
        last = keys[-1]
        if len(page) < FETCH_BATCH:
            break
    table = ItemTable.from_dict(
        {"paths": paths, "labels": labels, "item_ids": item_ids, "attributes": attributes},
        f"the item rows of Milvus collection {name!r}",
        data_root,
    )
    return np.asarray(keys, dtype=np.int64), table


class MilvusCollection:
    """The store object of a Milvus-backed index: searches, reads and changes one collection.

    Row ids are positions in `keys` (sorted): what the Searcher and the item table call a gallery row."""

    is_trained = True

    def __init__(
        self, client: Any, record: MilvusStoreRecord, d: int, keys: np.ndarray, params: IndexParams | None = None
    ) -> None:
        self.client, self.record, self.d = client, record, int(d)
        self.keys = np.asarray(keys, dtype=np.int64)
        self.params = params or IndexParams("flat")

    @property
    def ntotal(self) -> int:
        return len(self.keys)

    @property
    def name(self) -> str:
        return self.record.collection

    @property
    def device(self) -> str:
        """Where searches run (what calibration and the Searcher report)."""
        return self.record.describe()

    def configure(self, params: IndexParams) -> None:
        """Search with `params`' knob (nprobe, ef) from now on."""
        self.params = params

    # -- search ---------------------------------------------------------------------------------------
    def search(self, x: np.ndarray, k: int, expression: str = "") -> tuple[np.ndarray, np.ndarray]:
        """x (Q, D) float32 -> (scores (Q, k), rows (Q, k)), -1 / lowest float padded, as a FAISS search."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        k = int(k)
        scores = np.full((len(x), k), -np.finfo(np.float32).max, np.float32)
        rows = np.full((len(x), k), -1, np.int64)
        if k <= 0 or len(x) == 0:
            return scores, rows
        params = {"metric_type": METRIC, "params": self.params.kind.milvus_search(self.params)}
        result = self.client.search(
            self.name,
            data=x.tolist(),
            limit=k,
            filter=expression,
            output_fields=["key"],
            search_params=params,
            anns_field="vector",
            consistency_level=SEARCH_CONSISTENCY,
        )
        for q, hits in enumerate(result):
            found = np.asarray([int(h["key"]) for h in hits], dtype=np.int64)
            sims = np.asarray([float(h["distance"]) for h in hits], dtype=np.float32)
            pos = np.searchsorted(self.keys, found)
            known = (pos < len(self.keys)) & (self.keys[np.minimum(pos, len(self.keys) - 1)] == found)
            # a key this version does not hold (added since it was opened) is left out until it reloads
            pos, sims = pos[known][:k], sims[known][:k]
            rows[q, : len(pos)], scores[q, : len(pos)] = pos, sims
        return scores, rows

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 stored vectors of gallery rows `rows`, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.d), np.float32)
        if len(rows) == 0:
            return out
        wanted = self.keys[rows]
        unique = np.unique(wanted)
        found: dict[int, list[float]] = {}
        for start in range(0, len(unique), FETCH_BATCH):
            chunk = unique[start : start + FETCH_BATCH].tolist()
            for row in self.client.query(
                self.name,
                filter=keys_expression(chunk),
                output_fields=["key", "vector"],
                limit=len(chunk),
                consistency_level=SEARCH_CONSISTENCY,
            ):
                found[int(row["key"])] = row["vector"]
        missing = [int(k) for k in unique if int(k) not in found]
        if missing:
            raise IndexFileError(
                f"{self.record.describe()} no longer holds key {missing[0]} (changed since this "
                "index folder was opened); open it again"
            )
        for i, key in enumerate(wanted.tolist()):
            out[i] = found[key]
        return out

    def all_vectors(self) -> np.ndarray:
        """(N, D) float32 vectors of every row, in row order."""
        return self.vectors_of(np.arange(self.ntotal))

    # -- change ---------------------------------------------------------------------------------------
    def upsert(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        items: ItemTable,
        data_root: str | None,
        batch_size: int = DEFAULT_BATCH,
        progress: bool = False,
        what: str = "uploading",
    ) -> float:
        """Upsert rows (key, vector, item) in batches of `batch_size`; returns the seconds it took."""
        from tqdm.auto import tqdm

        table = items.to_dict(data_root)
        t0 = time.perf_counter()
        with tqdm(total=len(keys), desc=f"{what} to Milvus", unit="rows", unit_scale=True, disable=not progress) as bar:
            for start in range(0, len(keys), batch_size):
                stop = min(start + batch_size, len(keys))
                rows = [
                    {
                        "key": int(keys[i]),
                        "vector": vectors[i].tolist(),
                        "label": int(table["labels"][i]),
                        "item_id": str(table["item_ids"][i])[:MAX_ID],
                        "path": str(table["paths"][i]),
                        "attributes": dict(items.attributes[i]),
                    }
                    for i in range(start, stop)
                ]
                self.client.upsert(self.name, rows)
                bar.update(stop - start)
        return time.perf_counter() - t0

    def delete_keys(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        for start in range(0, len(keys), FETCH_BATCH):
            self.client.delete(self.name, filter=keys_expression(keys[start : start + FETCH_BATCH].tolist()))

    def create_index(self, params: IndexParams) -> float:
        """(Re)build the collection's vector index as `params` says and load it; returns the seconds it took."""
        kind = params.kind
        if not kind.milvus_type:
            raise IndexBuildError(f"{params.index_type} has no Milvus index type; use flat, ivf-flat, ivf-pq or hnsw")
        if params.refine_factor > 0:
            raise IndexBuildError("--refine-factor is a FAISS refinement; Milvus-backed indexes do not take it")
        t0 = time.perf_counter()
        client = self.client
        client.flush(self.name)  # seal what was uploaded, so the index covers it (growing rows are brute-forced)
        existing = client.list_indexes(self.name)
        if existing:
            client.release_collection(self.name)
            for name in existing:
                client.drop_index(self.name, name)
        index_params = client.prepare_index_params()
        index_params.add_index(
            field_name="vector",
            index_name="vector",
            index_type=kind.milvus_type,
            metric_type=METRIC,
            params=kind.milvus_build(params),
        )
        try:
            client.create_index(self.name, index_params)
        except Exception as exc:
            raise IndexBuildError(
                f"{self.record.describe()} cannot build a {kind.milvus_type} index "
                f"({_first_line(exc)}); choose another --index-type"
            ) from exc
        client.load_collection(self.name)
        self.configure(params)
        return time.perf_counter() - t0

    @classmethod
    def open(
        cls,
        record: MilvusStoreRecord,
        fingerprint: str,
        d: int,
        expected_rows: int,
        params: IndexParams,
        data_root: str | None,
        source: str = "meta.json",
    ) -> tuple[MilvusCollection, ItemTable]:
        """The collection an index folder names, checked against it, and its item table; IndexFileError
        naming what differs (fingerprint, dimension, metric, row count)."""
        client = connect(record)
        if not client.has_collection(record.collection):
            raise IndexFileError(
                f"{source} names {record.describe()}, which does not exist; rebuild the index "
                "into it with `retrieval index ... --store milvus`"
            )
        facts = collection_facts(client, record.collection)
        client.load_collection(record.collection)
        problems = mismatch(facts, fingerprint, d, count_rows(client, record.collection), expected_rows)
        if problems:
            raise IndexFileError(
                f"{record.describe()} does not match {source}: {'; '.join(problems)}; rebuild "
                "the index (`retrieval index ... --store milvus`) or point the folder at its own "
                "collection"
            )
        keys, items = read_keys_and_items(client, record.collection, data_root)
        if len(keys) != expected_rows:  # changed between the count and the read
            raise IndexFileError(
                f"{record.describe()} changed while it was opened ({len(keys):,} rows, "
                f"{source} says {expected_rows:,}); open it again"
            )
        return cls(client, record, d, keys, params), items


class MilvusUpload:
    """A build's store: uploads the gallery into the collection and builds its Milvus index.

    Given to retrieval.index.calibrate.build_calibrated as its builder: `build(vectors, params)` upserts the rows
    not yet uploaded (the first len(vectors) items) and (re)builds the index; `add(collection, vectors)` upserts
    the next rows (the graph's held-out calibration rows). Rows take keys 0..N-1, so an upload run again after a
    kill upserts the same rows and gives the same collection; rows left over from a larger earlier upload are
    deleted. Its searches go over the network, so auto never swaps it for flat by speed (`local` False)."""

    local = False

    def __init__(
        self,
        record: MilvusStoreRecord,
        items: ItemTable,
        fingerprint: str,
        data_root: str | None,
        batch_size: int = DEFAULT_BATCH,
        progress: bool = True,
    ) -> None:
        self.record, self.items, self.fingerprint, self.data_root = record, items, fingerprint, data_root
        self.batch_size, self.progress = int(batch_size), progress
        self.collection: MilvusCollection | None = None
        self.uploaded = 0
        self.upload_seconds = 0.0

    def uploaded_elsewhere(self, d: int, rows: int) -> None:
        """Rows 0..rows-1 were upserted by other processes (parallel part uploads): the collection exists, and
        `build` / `add` upload only the rows after them."""
        self._collection(d)
        self.uploaded = int(rows)

    def _collection(self, d: int) -> MilvusCollection:
        if self.collection is not None:
            return self.collection
        client = connect(self.record)
        name = self.record.collection
        if client.has_collection(name):
            problems = mismatch(collection_facts(client, name), self.fingerprint, d)
            if problems:
                raise IndexBuildError(
                    f"{self.record.describe()} already exists and does not match this build: "
                    f"{'; '.join(problems)}; choose another --collection or drop it"
                )
        else:
            client.create_collection(
                name,
                schema=_schema(client, d, self.fingerprint),
                consistency_level="Strong",
                properties={
                    PROPERTY_FORMAT: COLLECTION_FORMAT,
                    PROPERTY_FINGERPRINT: self.fingerprint,
                    PROPERTY_METRIC: METRIC,
                },
            )
        self.collection = MilvusCollection(client, self.record, d, np.zeros(0, np.int64))
        return self.collection

    def _upload(self, vectors: np.ndarray, first: int) -> MilvusCollection:
        """Upsert `vectors` as rows first.. (only those past what this build uploaded already)."""
        vectors = check_embeddings(vectors)
        collection = self._collection(vectors.shape[1])
        start, stop = max(first, self.uploaded), first + len(vectors)
        if stop > start:
            self.upload_seconds += collection.upsert(
                np.arange(start, stop, dtype=np.int64),
                vectors[start - first :],
                self.items.select(range(start, stop)),
                self.data_root,
                self.batch_size,
                self.progress,
            )
            self.uploaded = stop
        collection.keys = np.arange(self.uploaded, dtype=np.int64)
        return collection

    def _drop_leftovers(self, collection: MilvusCollection) -> None:
        """Delete rows keyed past those this build has uploaded: left by an earlier build into the same collection
        (a larger gallery, or calibration rows this build adds later), they must not answer its searches. Runs on
        the loaded collection: Milvus standalone deletes only from loaded collections."""
        collection.client.delete(self.record.collection, filter=f"key >= {int(self.uploaded)}")

    def build(self, vectors: np.ndarray, params: IndexParams, *, use_gpu: bool = True, seed: int = 0) -> BuiltIndex:
        """Upload rows 0..len(vectors)-1 (those not uploaded yet) and build the Milvus index of `params`."""
        collection = self._upload(vectors, 0)
        index_seconds = collection.create_index(params)
        self._drop_leftovers(collection)
        return BuiltIndex(collection, params, self.record.describe(), index_seconds, self.upload_seconds)

    def add(self, collection: Any, vectors: np.ndarray) -> None:
        """Upload the next len(vectors) rows (after those uploaded so far)."""
        self._drop_leftovers(self._upload(vectors, self.uploaded))
