"""Search an index folder by image, and evaluate it: the API behind `retrieval search`, `evaluate` and the app.

    searcher = Searcher.open("indexes/inshop")                # re-opens the embedder recorded in meta.json
    hits = searcher.search_paths(["photo.jpg"], k=10)[0]      # [Hit(rank=1, ..., path="img/x.jpg", score=0.93), ...]
    searcher.evaluate()                                       # {"R@1": ..., "MAP@R": ..., ...}

The embedder is checked against the index (fingerprint, embedding size, normalisation) before any
search; a different one is refused. `evaluate` needs no embedder: it uses the stored query
embeddings (query/gallery datasets) or the gallery against itself with self excluded (all-vs-all).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.embed.backend import EmbeddingBackend
from retrieval.embed.spec import EmbedderSpec, open_embedder, open_recorded, recorded_spec
from retrieval.errors import InputError
from retrieval.index.filters import Where, attribute_values, matching_ids, parse_where
from retrieval.index.folder import GalleryIndex
from retrieval.index.meta import IndexMeta
from retrieval.index.stores import open_index
from retrieval.metrics import neighbour_metrics
from retrieval.search.hits import Hit, dataset_relative
from retrieval.search.rerank import RerankConfig, Reranker, check_method

DEFAULT_RECALL_KS = (1, 2, 4, 8)  # when an index records no protocol ks (e.g. a folder of images)
EVAL_CHUNK = 2048


class Searcher:
    """An opened index plus (lazily) the embedder that built it."""

    def __init__(self, index: GalleryIndex, backend: EmbeddingBackend | None = None, device: str = "auto") -> None:
        self.index = index
        self.device = device
        self._backend: EmbeddingBackend | None = None
        self._subsets: dict[tuple, np.ndarray] = {}  # filter -> matching rows (the item table is fixed once open)
        self.reranker = Reranker(
            index.exact_gallery_vectors,
            index.neighbour_lists,
            RerankConfig(),
            fetch=index.vectors_of if index.fetches_vectors else None,
        )
        if backend is not None:
            self._attach(backend)

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike[str],
        embedder: EmbeddingBackend | EmbedderSpec | None = None,
        device: str = "auto",
        *,
        verify_checksums: bool = True,
        data_root: str | os.PathLike[str] | None = None,
    ) -> Searcher:
        """Open `index_dir` with `embedder` (an open backend, or a spec opened here), else the one recorded
        in the index (opened on first search). FAISS uses a GPU unless `device` is "cpu".
        `data_root`: where the dataset is now, when it moved (with the index) since the build."""
        index = open_index(index_dir, verify_checksums=verify_checksums, use_gpu=device != "cpu", data_root=data_root)
        if isinstance(embedder, EmbedderSpec):
            embedder = open_embedder(embedder, device)
        return cls(index, embedder, device)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def meta(self) -> IndexMeta:
        """The index folder's metadata (dataset, n_items, index_type, fingerprint, created_at, ...)."""
        return self.index.meta

    @property
    def index_dir(self) -> Path | None:
        """The index folder this searcher was opened from (None for an index never saved)."""
        folder = self.index.meta.folder
        return Path(folder) if folder else None

    @property
    def recall_ks(self) -> tuple[int, ...]:
        """The K of Recall@K the dataset's protocol reports (those `evaluate` computes by default)."""
        return tuple(int(k) for k in (self.index.meta.recall_ks or DEFAULT_RECALL_KS))

    # Item columns below are the index's own lists, row i = gallery (or stored query) i: read, don't mutate.
    @property
    def gallery_paths(self) -> list[str]:
        """Absolute image path of each gallery row."""
        return self.index.items.paths

    @property
    def gallery_labels(self) -> list[int]:
        """Integer class label of each gallery row (-1 = unlabelled, e.g. added with --add)."""
        return self.index.items.labels

    @property
    def gallery_item_ids(self) -> list[str]:
        """Display item id of each gallery row (product id, class folder name, ...)."""
        return self.index.items.item_ids

    @property
    def has_stored_queries(self) -> bool:
        """Whether the index stores a query set (query/gallery datasets); all-vs-all indexes store none."""
        return self.index.queries is not None and len(self.index.queries.items) > 0

    @property
    def query_paths(self) -> list[str]:
        """Image path of each stored query; empty when the index stores none."""
        return self.index.queries.items.paths if self.index.queries is not None else []

    @property
    def query_labels(self) -> list[int]:
        """Class label of each stored query; empty when the index stores none."""
        return self.index.queries.items.labels if self.index.queries is not None else []

    @property
    def query_item_ids(self) -> list[str]:
        """Item id of each stored query; empty when the index stores none."""
        return self.index.queries.items.item_ids if self.index.queries is not None else []

    @property
    def backend(self) -> EmbeddingBackend:
        """The embedder (opened from the index's record on first use, then checked)."""
        if self._backend is None:
            self._attach(open_recorded(self.index.meta.embedder_source, self.device))
        assert self._backend is not None
        return self._backend

    def check_embeds_images(self) -> None:
        """Raise the error that opening the embedder would (an index built from vectors, a recorded embedder file
        that is gone) without opening it: cheap, so a command can say so before it reads any query image."""
        if self._backend is None:
            recorded_spec(self.index.meta.embedder_source)

    def _attach(self, backend: EmbeddingBackend) -> None:
        self.index.check_embedder(
            backend.fingerprint,
            backend.embedding_size,
            getattr(backend, "normalisation", "l2"),
            what=f"the {backend.name} embedder",
        )
        self._backend = backend

    @property
    def devices(self) -> dict[str, str]:
        """Where embedding and FAISS search run (known after the first search)."""
        return {
            "embedding": self._backend.device if self._backend else "not opened yet",
            "index": self.index.search_device,
        }

    @property
    def attribute_values(self) -> dict[str, list[str]]:
        """Filterable attributes of the gallery items -> their distinct values (empty for indexes without any)."""
        if "_attribute_values" not in self.__dict__:
            self.__dict__["_attribute_values"] = attribute_values(self.index.items.attributes)
        return self.__dict__["_attribute_values"]

    def subset(self, where: Where | Sequence[str] | dict[str, Any] | None) -> np.ndarray | None:
        """Rows matching a filter (None = no filter); FilterError for an attribute the items lack."""
        where = parse_where(where)
        if not where:
            return None
        key = tuple(sorted((k, tuple(sorted(v))) for k, v in where.items()))
        if key not in self._subsets:
            if len(self._subsets) >= 64:
                self._subsets.pop(next(iter(self._subsets)))
            self._subsets[key] = matching_ids(self.index.items.attributes, where)
        return self._subsets[key]

    def search_raw(
        self, emb: np.ndarray, k: int, where: Any = None, rerank: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k'), -1 = none: the index's search, restricted to a filter, re-ranked."""
        method = check_method(rerank)
        rows = self.subset(where)
        width = k if method == "none" else self.reranker.shortlist_size(k)
        if rows is None:
            scores, ids = self.index.search(emb, width)
        else:
            scores, ids = self.index.search_subset(emb, width, rows, parse_where(where))
        if method != "none":
            scores, ids = self.reranker.rerank(method, np.asarray(emb, dtype=np.float32), scores, ids)
            scores, ids = scores[:, :k], ids[:, :k]
        return scores, ids

    # -- search ---------------------------------------------------------------------------------
    def search_embeddings(
        self, emb: np.ndarray, k: int = 10, *, where: Any = None, rerank: str | None = None
    ) -> list[list[Hit]]:
        """emb (Q, D) L2-normalised -> per query, up to k hits, best first.

        `where`: a filter ("category=Dresses" terms or {"category": "Dresses"}), exact inside FAISS;
        `rerank`: none | qe | dba | kreciprocal (see retrieval.search.rerank)."""
        scores, ids = self.search_raw(emb, k, where, rerank)
        items, root = self.index.items, self.index.meta.data_root
        out: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids):
            hits: list[Hit] = []
            for s, i in zip(row_scores, row_ids):
                if i < 0:
                    continue
                i = int(i)
                hits.append(
                    Hit(
                        rank=len(hits) + 1,
                        gallery_index=i,
                        item_id=items.item_ids[i],
                        label=items.labels[i],
                        path=dataset_relative(items.paths[i], root),
                        score=float(s),
                        attributes=items.attributes[i],
                    )
                )
            out.append(hits)
        return out

    def search_images(
        self, images: Sequence[Image.Image], k: int = 10, *, where: Any = None, rerank: str | None = None
    ) -> list[list[Hit]]:
        """RGB PIL images -> per image, its k nearest gallery items."""
        if len(images) == 0:
            return []
        return self.search_embeddings(self.backend.embed_images(list(images)), k, where=where, rerank=rerank)

    def search_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        k: int = 10,
        batch_size: int = 64,
        *,
        where: Any = None,
        rerank: str | None = None,
    ) -> list[list[Hit]]:
        """Image files -> per file, its k nearest gallery items (unreadable files raise ImageLoadError naming them)."""
        if len(paths) == 0:
            return []
        emb = self.backend.embed_paths(list(paths), batch_size=batch_size, progress=False)
        return self.search_embeddings(emb, k, where=where, rerank=rerank)

    def relative_path(self, gallery_index: int) -> str:
        """Gallery item's path relative to the dataset folder (absolute when outside it)."""
        return dataset_relative(self.index.items.paths[int(gallery_index)], self.index.meta.data_root)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(
        self, ks: Sequence[int] | None = None, exact: bool = True, rerank: str | None = None
    ) -> dict[str, float]:
        """Recall@K, MAP@R and R-precision of the stored evaluation protocol, as fractions.

        The keys are "R@k", "MAP@R", "RP" from the index's own search. For approximate indexes
        (and `exact=True`) also "exact R@k", ... from exact search over the same vectors and
        "diff R@k", ... = index - exact. Unlabelled items (added with --add) are never relevant.
        `rerank`: the same ranking with a re-ranking method applied (then no exact comparison).
        """
        method = check_method(rerank)
        ks = tuple(int(k) for k in ks) if ks else self.recall_ks
        gallery_labels = np.asarray(self.index.items.labels, dtype=np.int64)
        if self.index.meta.protocol == "query-gallery":
            if self.index.queries is None:
                raise InputError(f"index {self.index.meta.folder} stores no query embeddings; rebuild it to evaluate")
            q_emb = self.index.queries.emb
            q_labels = np.asarray(self.index.queries.items.labels, dtype=np.int64)
            self_ids = None
        else:
            g_emb = self.index.exact_gallery_vectors()
            self_ids = np.flatnonzero(gallery_labels >= 0)
            q_emb, q_labels = g_emb[self_ids], gallery_labels[self_ids]
        if method != "none":
            return neighbour_metrics(
                lambda q, k: self.search_raw(q, k, rerank=method),
                q_emb,
                q_labels,
                gallery_labels,
                ks,
                self_ids=self_ids,
                chunk_size=EVAL_CHUNK,
            )
        result = neighbour_metrics(
            self.index.search, q_emb, q_labels, gallery_labels, ks, self_ids=self_ids, chunk_size=EVAL_CHUNK
        )
        if self.index.exact or not exact:
            return result

        from retrieval.knn import FlatSearcher

        g_exact = self.index.exact_gallery_vectors()
        labelled = gallery_labels[gallery_labels >= 0]
        max_r = int(np.unique(labelled, return_counts=True)[1].max()) if len(labelled) else 0
        flat = FlatSearcher(g_exact, metric="ip", use_gpu=self.device != "cpu", max_k=max(max(ks), max_r) + 1)
        exact_result = neighbour_metrics(
            flat.search, q_emb, q_labels, gallery_labels, ks, self_ids=self_ids, chunk_size=EVAL_CHUNK
        )
        for key, value in exact_result.items():
            result[f"exact {key}"] = value
            result[f"diff {key}"] = result[key] - value
        return result
