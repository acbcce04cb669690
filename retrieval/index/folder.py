"""The index folder: FAISS index + item table + metadata (+ stored queries), published atomically, verified on load.

    <dir>/index.faiss    the FAISS index (CPU form); row i is item i
    <dir>/shard-NNN.faiss  in a sharded folder, instead of index.faiss: the shards listed in meta.json
                         (`ShardedGalleryIndex`; the shard store itself is retrieval.index.shards)
    <dir>/items.json     {"paths": [...], "labels": [...], "item_ids": [...]} of the indexed gallery; paths inside
                         meta.json's data_root are stored relative to it, so dataset + index can move together
    <dir>/queries.npy    (Q, D) float32 query embeddings, for query/gallery datasets (evaluation needs no re-embedding)
    <dir>/queries.json   the queries' paths, labels and item ids
    <dir>/gallery.npy    (N, D) float32 gallery embeddings, only for lossy (IVF-PQ) indexes, so exact
                         evaluation stays possible
    <dir>/neighbours.npy, neighbour_scores.npy   (N, n) gallery neighbour lists for re-ranking (DBA), when
                         built with --rerank-neighbours; meta.json's rerank records the index file they belong to
    <dir>/meta.json      written last: embedder fingerprint, index parameters, dataset, build facts, and the
                         size and SHA-256 of every file above (`retrieval.index.meta.IndexMeta`)

A Milvus-backed folder keeps only meta.json (naming its collection) and the stored queries here; its vectors and
item table are rows of the collection (`MilvusGalleryIndex`, retrieval.index.milvus_folder).

A save builds a complete sibling folder and swaps it in (old folder renamed aside, new one renamed in,
old one deleted), so an interrupted build leaves the previous index in place. A load refuses a
folder whose meta.json is missing or whose files do not match the sizes/checksums recorded in it,
naming the bad file. Nothing here uses pickle.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.atomic import (
    atomic_write_json,
    atomic_write_with,
    clean_stale_leftovers,
    file_digest,
    fsync_dir,
    locked_dir,
    read_json,
    swap_in_folder,
)
from retrieval.embed.spec import EmbedderSpec
from retrieval.errors import UserError
from retrieval.index.errors import IndexBuildError, IndexFileError, RerankError
from retrieval.index.faiss_index import (
    add_to_index,
    check_embeddings,
    configure_search,
    exact_vectors,
    read_index,
    remove_from_index,
    search,
    to_search_device,
    write_index,
)
from retrieval.index.filters import filtered_search
from retrieval.index.meta import META_FILE, NORMALISATION, IndexMeta, read_meta, write_meta
from retrieval.index.neighbours import DEFAULT_NEIGHBOURS, NeighbourLists, gallery_neighbours
from retrieval.index.shards import ShardSet, merge_results, read_shard_set, shard_file_name
from retrieval.index.types import IndexParams
from retrieval.versions import now_iso

INDEX_FILE, ITEMS_FILE = "index.faiss", "items.json"
QUERIES_FILE, QUERY_ITEMS_FILE, GALLERY_FILE = "queries.npy", "queries.json", "gallery.npy"
NEIGHBOURS_FILE, NEIGHBOUR_SCORES_FILE = "neighbours.npy", "neighbour_scores.npy"


class EmbedderMismatchError(UserError, ValueError):
    """An index was opened with an embedder other than the one that built it."""


@dataclass
class ItemTable:
    """What each index row is: image path, integer label (-1 = unlabelled), display item id and attributes
    (e.g. {"category": "Dresses"}; {} for none; tables written before attributes existed read as all {})."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    attributes: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.attributes:
            self.attributes = [{} for _ in self.paths]
        if len(self.attributes) != len(self.paths):
            raise ValueError(f"item table has {len(self.paths)} paths but {len(self.attributes)} attribute rows")
        if not len(self.paths) == len(self.labels) == len(self.item_ids):
            raise ValueError(
                f"item table columns differ in length: {len(self.paths)} paths, {len(self.labels)} labels, "
                f"{len(self.item_ids)} item ids"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_split(cls, split: Any) -> ItemTable:
        """From a retrieval.data Split (paths, labels, optional item_ids)."""
        n = len(split.paths)
        paths = [os.path.abspath(p) for p in split.paths]  # search results must not depend on the working directory
        return cls(paths, [int(v) for v in split.labels], [split.item_id(i) for i in range(n)])

    def extend(self, other: ItemTable) -> None:
        self.paths += other.paths
        self.labels += other.labels
        self.item_ids += other.item_ids
        self.attributes += other.attributes

    def select(self, rows: Sequence[int]) -> ItemTable:
        """The rows `rows`, in that order (a copy)."""
        return ItemTable(
            [self.paths[i] for i in rows],
            [self.labels[i] for i in rows],
            [self.item_ids[i] for i in rows],
            [dict(self.attributes[i]) for i in rows],
        )

    def to_dict(self, data_root: str | None = None) -> dict[str, list]:
        """Paths under `data_root` (an absolute folder) become relative to it; others stay absolute."""
        prefix = os.path.join(data_root, "") if data_root else None
        paths = [Path(p[len(prefix) :]).as_posix() if prefix and p.startswith(prefix) else p for p in self.paths]
        table: dict[str, list] = {"paths": paths, "labels": self.labels, "item_ids": self.item_ids}
        if any(self.attributes):
            table["attributes"] = self.attributes
        return table

    @classmethod
    def from_dict(cls, raw: Any, source: Path | str, data_root: str | None = None) -> ItemTable:
        """Relative paths are resolved against `data_root` (absolute ones are kept); `source` names it in errors."""
        try:
            paths = [
                str(p) if os.path.isabs(str(p)) or not data_root else os.path.join(data_root, *str(p).split("/"))
                for p in raw["paths"]
            ]
            attributes = [{str(k): str(v) for k, v in row.items()} for row in raw.get("attributes") or []]
            return cls(paths, [int(v) for v in raw["labels"]], [str(v) for v in raw["item_ids"]], attributes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexFileError(f"{source} is not a valid item table ({exc}); rebuild the index") from exc


@dataclass
class StoredQueries:
    """Query embeddings (Q, D) L2-normalised with their items: what `evaluate` searches with."""

    emb: np.ndarray
    items: ItemTable


def _write_npy(target: Path, arr: np.ndarray) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle, so np.save does not append ".npy" to the temporary name
            np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)

    atomic_write_with(target, writer)


def _read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFileError(f"{path} is corrupt or truncated ({exc}); rebuild the index") from exc


def publish_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)` on a fresh sibling folder, then swap it in for `target`.

    If `write` raises, the temporary folder is removed and `target` is untouched. The swap is two
    renames; if the second fails the old folder is renamed back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_leftovers(target.parent, [target.name])  # what a killed build left beside the folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        with locked_dir(tmp):  # tells a concurrent cleaner that this folder is being built, not left over
            write(tmp)
            # mkdtemp/mkstemp create owner-only entries; an index is meant to be shared like any output folder
            os.chmod(tmp, 0o755)
            for entry in tmp.iterdir():
                os.chmod(entry, 0o644)
            fsync_dir(tmp)
            swap_in_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _missing_folder_message(folder: Path) -> str:
    aside = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
    if aside:
        return (
            f"index folder {folder} not found, but {aside[-1]} holds a previous index left by an interrupted "
            f"update: rename it to {folder} to use it, or rebuild with `retrieval index`"
        )
    return f"index folder not found: {folder}; build one with `retrieval index --dataset ... --out {folder}`"


class GalleryIndex:
    """A searchable gallery: FAISS index + the item behind each row + metadata (+ stored queries)."""

    def __init__(
        self,
        index: faiss.Index,
        params: IndexParams,
        items: ItemTable,
        meta: IndexMeta,
        queries: StoredQueries | None = None,
        gallery_vectors: np.ndarray | None = None,
        use_gpu: bool = True,
    ) -> None:
        if index.ntotal != len(items):
            raise ValueError(f"index holds {index.ntotal} vectors but the item table has {len(items)} rows")
        self.index, self.params, self.items, self.meta = index, params, items, meta
        self.queries, self.gallery_vectors = queries, gallery_vectors
        self.use_gpu = use_gpu
        self._searchable: Any = None
        self.search_device = "not yet used"
        self.neighbours: NeighbourLists | None = None  # gallery neighbour lists for re-ranking, when built
        self.neighbours_problem = ""  # why there are none: never built, or stale (set by load)
        self._configure_search()

    def _configure_search(self) -> None:
        configure_search(self.index, self.params)

    # -- facts ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def embedding_size(self) -> int:
        return int(self.index.d)

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def exact(self) -> bool:
        return self.params.exact

    def check_embedder(
        self, fingerprint: str, embedding_size: int, normalisation: str = NORMALISATION, what: str = "the embedder"
    ) -> None:
        """Refuse an embedder other than the one that built this index, saying what to do."""
        problems = []
        if fingerprint != self.fingerprint:
            problems.append(f"fingerprint {fingerprint} != {self.fingerprint}")
        if int(embedding_size) != self.embedding_size:
            problems.append(f"embedding size {embedding_size} != {self.embedding_size}")
        index_norm = self.meta.normalisation
        if normalisation != index_norm:
            problems.append(f"normalisation {normalisation} != {index_norm}")
        if problems:
            try:
                hint = f" (built from {EmbedderSpec.from_record(self.meta.embedder_source).describe()})"
            except (ValueError, KeyError):  # built from vectors: no embedder recorded
                hint = ""
            raise EmbedderMismatchError(
                f"{what} does not match index {self.meta.folder}: " + "; ".join(problems) + ". "
                f"The index was built with embedder {self.fingerprint}{hint}, {self.embedding_size}-d, {index_norm}; "
                f"{what} is {fingerprint}, {embedding_size}-d. Its results would be meaningless: pass the checkpoint "
                "or model the index was built with, or rebuild the index with this embedder (`retrieval index`)."
            )

    # -- search --------------------------------------------------------------------------------
    def _target(self) -> Any:
        if self._searchable is None:
            self._searchable, self.search_device = to_search_device(self.index, self.params, self.use_gpu)
        return self._searchable

    def set_search_params(self, params: IndexParams) -> None:
        """Search with `params` (e.g. an --nprobe / --ef-search override) from now on; the files are unchanged."""
        self.params = params
        self._searchable = None
        self._configure_search()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) L2-normalised -> (scores (Q, k'), ids (Q, k')), k' = min(k, len(self)); ids -1 = none."""
        return search(self._target(), queries, k)

    def search_subset(
        self, queries: np.ndarray, k: int, ids: np.ndarray, where: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, restricted to the rows `ids` inside FAISS (an ID selector on the CPU index).

        `where` is the filter those rows match (retrieval.index.filters.Where): a store that filters by
        expression (Milvus) searches with it; FAISS stores use the rows."""
        queries = check_embeddings(queries, self.embedding_size, "query embeddings")
        return filtered_search(self.index, queries, k, ids)

    fetches_vectors = False  # True: re-ranking reads candidates' vectors with `vectors_of` instead of all of them

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 exact vectors of gallery rows `rows`."""
        return self.exact_gallery_vectors()[np.asarray(rows, dtype=np.int64)]

    def neighbour_lists(self) -> NeighbourLists:
        """The stored gallery neighbour lists, or RerankError saying how to build them."""
        if self.neighbours is None:
            folder = self.meta.folder or "DIR"
            why = self.neighbours_problem or "this index has no gallery neighbour lists"
            raise RerankError(
                f"{why}; build them with `retrieval index --out {folder} --rerank-neighbours "
                f"{DEFAULT_NEIGHBOURS}` (or rebuild the index with that flag)"
            )
        return self.neighbours

    def build_neighbours(self, n: int = DEFAULT_NEIGHBOURS) -> None:
        """Compute the gallery neighbour lists (exact search over the exact vectors); `save` stores them."""
        self.neighbours = gallery_neighbours(self.exact_gallery_vectors(), n, use_gpu=self.use_gpu)
        self.neighbours_problem = ""

    def exact_gallery_vectors(self) -> np.ndarray:
        """(N, D) float32 gallery embeddings exactly as indexed (for exact evaluation and self-exclusion)."""
        if self.gallery_vectors is not None:
            return np.asarray(self.gallery_vectors, dtype=np.float32)
        vectors = exact_vectors(self.index, self.params)
        if vectors is None:
            raise IndexFileError(
                f"the {self.params.index_type} index does not keep exact vectors and no "
                f"{GALLERY_FILE} was stored; rebuild the index"
            )
        return vectors

    # -- change --------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, items: ItemTable) -> None:
        """Append (N, D) L2-normalised embeddings of `items` (in memory; `save` publishes)."""
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} embeddings for {len(items)} items")
        vectors = check_embeddings(vectors, self.embedding_size, "new embeddings")
        n_before = len(self)
        add_to_index(self.index, vectors)
        if self.gallery_vectors is not None:
            self.gallery_vectors = np.concatenate([np.asarray(self.gallery_vectors), vectors])
        self.items.extend(items)
        self._searchable = None
        self.meta.history.append({"action": "add", "items": len(items), "from": n_before, "at": now_iso()})
        if self.neighbours is not None:
            self.build_neighbours(self.neighbours.width)

    def remove(self, rows: Sequence[int]) -> None:
        """Drop gallery rows `rows` (in memory; `save` publishes); the rows after them move up.

        Flat and IVF indexes support removal; HNSW graphs and refined indexes do not (IndexBuildError
        saying how to rebuild without the items).
        """
        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) and (drop[0] < 0 or drop[-1] >= len(self)):
            raise ValueError(f"row {int(drop[-1])} is not in the index (it holds {len(self)} items)")
        remove_from_index(self.index, self.params, drop)
        keep = np.setdiff1d(np.arange(len(self.items)), drop)
        self.items = self.items.select(keep.tolist())
        if self.gallery_vectors is not None:
            self.gallery_vectors = np.asarray(self.gallery_vectors)[keep]
        self._searchable = None
        self.meta.history.append({"action": "remove", "items": int(len(drop)), "at": now_iso()})
        if self.neighbours is not None:
            self.build_neighbours(self.neighbours.width)

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Publish this index as `folder`, atomically (see module docstring)."""
        folder = Path(folder)

        published: list[IndexMeta] = []

        def write(tmp: Path) -> None:
            names = self._write_index_files(tmp)
            data_root = self.meta.data_root or None
            names += self._write_table_files(tmp)
            if self.queries is not None:
                _write_npy(tmp / QUERIES_FILE, self.queries.emb)
                atomic_write_json(tmp / QUERY_ITEMS_FILE, self.queries.items.to_dict(data_root))
                names += [QUERIES_FILE, QUERY_ITEMS_FILE]
            if self.gallery_vectors is not None:
                _write_npy(tmp / GALLERY_FILE, np.asarray(self.gallery_vectors))
                names.append(GALLERY_FILE)
            rerank = None
            if self.neighbours is not None:
                _write_array(tmp / NEIGHBOURS_FILE, self.neighbours.ids.astype(np.int64))
                _write_array(tmp / NEIGHBOUR_SCORES_FILE, self.neighbours.scores.astype(np.float32))
                names += [NEIGHBOURS_FILE, NEIGHBOUR_SCORES_FILE]
                rerank = {"neighbours": self.neighbours.width, "index_sha256": file_digest(tmp / INDEX_FILE)["sha256"]}
            meta = dataclasses.replace(
                self.meta,
                n_items=len(self),
                embedding_size=self.embedding_size,
                index_params=self.params,
                n_queries=0 if self.queries is None else len(self.queries.items),
                saved_at=now_iso(),
                files={name: file_digest(tmp / name) for name in names},
                rerank=rerank,
                folder="",
            )
            write_meta(tmp / META_FILE, meta)  # last: its presence marks a complete folder
            published.append(meta)

        publish_folder(folder, write)
        self.meta = dataclasses.replace(published[0], folder=str(folder))
        return folder

    def _write_table_files(self, tmp: Path) -> list[str]:
        """Write the item table into the folder being published; returns the file names written."""
        atomic_write_json(tmp / ITEMS_FILE, self.items.to_dict(self.meta.data_root or None))
        return [ITEMS_FILE]

    def _write_index_files(self, tmp: Path) -> list[str]:
        """Write the index itself into the folder being published; returns the file names written."""
        atomic_write_with(tmp / INDEX_FILE, lambda p: write_index(self.index, p))
        return [INDEX_FILE]

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        *,
        verify_checksums: bool = True,
        use_gpu: bool = True,
        data_root: str | os.PathLike[str] | None = None,
    ) -> GalleryIndex:
        """Open an index folder, refusing missing, truncated or altered files with an error naming the file.

        `data_root` says where the dataset is now when it moved since the build (default: meta.json's data_root)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise IndexFileError(_missing_folder_message(folder))
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise IndexFileError(
                f"{meta_path} is missing: {folder} is not a complete index folder (an interrupted write, or not an "
                "index); rebuild it with `retrieval index`"
            )
        meta = read_meta(meta_path)
        if meta.store:
            raise IndexFileError(
                f"{folder} keeps its vectors in {meta.store.get('kind')!r}, not in FAISS files: open "
                "it with retrieval.index.stores.open_index"
            )
        files = meta.files
        sharded = bool(meta.shards)  # shard files listed in meta.json instead of one index.faiss
        for name in (ITEMS_FILE,) if sharded else (INDEX_FILE, ITEMS_FILE):
            if name not in files:
                raise IndexFileError(f"{meta_path} records no {name}; rebuild the index")
        for name, expected in files.items():
            _verify_file(folder / name, expected, verify_checksums)

        if data_root is not None:
            meta.data_root = os.path.abspath(data_root)
        root = meta.data_root or None
        if sharded:
            index, cls = read_shard_set(folder, meta), ShardedGalleryIndex
        else:
            index = read_index(folder / INDEX_FILE)
        items_path = folder / ITEMS_FILE
        items = ItemTable.from_dict(_read_json_file(items_path, "item table"), items_path, root)
        params = meta.index_params
        if params is None:
            raise IndexFileError(f"{meta_path} records no index parameters; rebuild the index")
        if index.ntotal != len(items) or index.ntotal != meta.n_items:
            raise IndexFileError(
                f"{folder / INDEX_FILE} holds {index.ntotal} vectors, {items_path} {len(items)} items, meta.json says "
                f"{meta.n_items}; the folder is inconsistent, rebuild the index"
            )
        if index.d != meta.embedding_size:
            raise IndexFileError(
                f"{folder / INDEX_FILE} holds {index.d}-d vectors but meta.json says "
                f"{meta.embedding_size}; rebuild the index"
            )
        queries = _load_queries(folder, index.d, root) if QUERIES_FILE in files else None
        gallery_vectors = None
        if GALLERY_FILE in files:
            gallery_vectors = _read_npy(folder / GALLERY_FILE, mmap=True)
            if gallery_vectors.shape != (index.ntotal, index.d):
                raise IndexFileError(
                    f"{folder / GALLERY_FILE} has shape {gallery_vectors.shape}, expected ({index.ntotal}, {index.d})"
                )
        meta.folder = str(folder)
        loaded = cls(index, params, items, meta, queries, gallery_vectors, use_gpu=use_gpu)
        loaded.neighbours, loaded.neighbours_problem = _load_neighbours(folder, meta, files, index.ntotal)
        return loaded


class ShardedGalleryIndex(GalleryIndex):
    """A GalleryIndex whose vectors live in shards: searched in parallel in this process, published as shard files."""

    index: ShardSet

    def _configure_search(self) -> None:
        self.index.configure(self.params)

    def _target(self) -> Any:
        if self._searchable is None:
            self.index.configure(self.params)
            self._searchable = self.index
            self.search_device = f"cpu ({len(self.index)} shards in parallel)"
        return self._searchable

    def exact_gallery_vectors(self) -> np.ndarray:
        if self.gallery_vectors is not None:
            return np.asarray(self.gallery_vectors, dtype=np.float32)
        vectors = self.index.exact_vectors(self.params)
        if vectors is None:
            raise IndexFileError(
                f"the {self.params.index_type} shards do not keep exact vectors and no gallery.npy "
                "was stored; rebuild the index"
            )
        return vectors

    def add(self, vectors: np.ndarray, items: Any) -> None:
        self.index.add(vectors)

    def remove(self, rows: Any) -> None:
        raise IndexBuildError(
            "a sharded index folder cannot remove items in place: rebuild it with `retrieval index --from-embeddings "
            "DIR --shards N` from parts that no longer hold them, or merge the shards (--merge), which supports "
            "--remove"
        )

    def build_neighbours(self, n: int = 0) -> None:
        raise RerankError(
            "gallery neighbour lists (--rerank-neighbours) are not available for sharded index "
            "folders; build the index with --merge to re-rank with them"
        )

    def search_subset(
        self, queries: np.ndarray, k: int, ids: np.ndarray, where: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, restricted to the rows `ids`: each shard searches its own rows (an ID selector inside
        FAISS), the results are merged like an unrestricted search's."""
        queries = check_embeddings(queries, self.embedding_size, "query embeddings")
        ids = np.asarray(ids, dtype=np.int64)
        shards = self.index
        shards.configure(self.params)
        scores, found = [], []
        for j in range(len(shards)):
            lo, hi = int(shards.offsets[j]), int(shards.offsets[j]) + shards.ntotals[j]
            local = ids[(ids >= lo) & (ids < hi)] - lo
            if len(local) == 0:
                continue
            s, i = filtered_search(shards.shard(j), queries, k, local)
            scores.append(s)
            found.append(np.where(i >= 0, i + lo, -1))
        k_out = int(min(k, len(ids)))
        if not scores:
            return np.zeros((len(queries), k_out), np.float32), np.full((len(queries), k_out), -1, np.int64)
        return merge_results(scores, found, k_out)

    def _write_index_files(self, tmp: Path) -> list[str]:
        names, record = [], []
        for j in range(len(self.index)):
            name = shard_file_name(j)
            source = self.index.files[j]
            if self.index._shards[j] is None and source is not None and _is_published(source):
                shutil.copyfile(source, tmp / name)  # re-saving an opened folder: its files stay where they are
            elif self.index._shards[j] is None and source is not None:
                os.replace(source, tmp / name)  # a build's staged shard: moved in, never loaded here
            else:
                write_index(self.index.shard(j), tmp / name)
            names.append(name)
            record.append({"file": name, "n_items": self.index.ntotals[j], "first_id": int(self.index.offsets[j])})
        self.meta.shards = record
        return names

    def save(self, folder: str | os.PathLike[str]) -> Path:
        folder = super().save(folder)
        self.index.files = [folder / shard_file_name(j) for j in range(len(self.index))]  # now read from here
        return folder


def _is_published(path: Path) -> bool:
    """A shard file inside a published index folder (copied on re-save) rather than a build's staging file."""
    return (path.parent / META_FILE).is_file()


def _write_array(target: Path, arr: np.ndarray) -> None:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)

    atomic_write_with(target, writer)


def _load_queries(folder: Path, d: int, data_root: str | None) -> StoredQueries:
    emb = _read_npy(folder / QUERIES_FILE)
    items_path = folder / QUERY_ITEMS_FILE
    items = ItemTable.from_dict(_read_json_file(items_path, "query table"), items_path, data_root)
    if emb.ndim != 2 or emb.shape != (len(items), d):
        raise IndexFileError(f"{folder / QUERIES_FILE} has shape {emb.shape}, expected ({len(items)}, {d})")
    return StoredQueries(emb.astype(np.float32, copy=False), items)


def _load_neighbours(
    folder: Path, meta: IndexMeta, files: dict[str, Any], n_items: int
) -> tuple[NeighbourLists | None, str]:
    """The stored neighbour lists when they belong to this index file; else (None, why not)."""
    record = meta.rerank
    if not isinstance(record, dict):
        return None, ""
    stale = f"the gallery neighbour lists in {folder} are stale (the index changed since they were built)"
    if NEIGHBOURS_FILE not in files or NEIGHBOUR_SCORES_FILE not in files:
        return None, stale
    if record.get("index_sha256") != files.get(INDEX_FILE, {}).get("sha256"):
        return None, stale
    ids, scores = _read_npy(folder / NEIGHBOURS_FILE), _read_npy(folder / NEIGHBOUR_SCORES_FILE)
    if ids.ndim != 2 or ids.shape[0] != n_items or scores.shape != ids.shape:
        return None, stale
    return NeighbourLists(ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)), ""


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return read_json(path, what)
    except ValueError as exc:
        raise IndexFileError(str(exc)) from exc


def _verify_file(path: Path, expected: dict[str, Any], verify_checksums: bool) -> None:
    if not path.is_file():
        raise IndexFileError(f"{path} is missing (listed in meta.json); the index folder is incomplete, rebuild it")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise IndexFileError(
            f"{path} is {size:,} bytes but meta.json records {expected.get('bytes'):,}: the file is truncated or was "
            "replaced; rebuild the index with `retrieval index`"
        )
    if verify_checksums and file_digest(path)["sha256"] != expected.get("sha256"):
        raise IndexFileError(
            f"{path} does not match the SHA-256 recorded in meta.json: the file is corrupt or was modified; "
            "rebuild the index with `retrieval index`"
        )


def items_from_paths(paths: Sequence[str | os.PathLike[str]], label: int = -1) -> ItemTable:
    """Items for images added without a dataset: label -1 (unlabelled), item id = parent folder name."""
    resolved = [str(Path(p).resolve()) for p in paths]
    return ItemTable(resolved, [int(label)] * len(resolved), [Path(p).parent.name for p in resolved])
