"""The Gradio Blocks of the search UI, built from an open `retrieval.search.searcher.Searcher`.

Two tabs:
    Search      a photo (upload, drag-and-drop, paste, webcam or one of the stored example queries)
                -> the top-K gallery images with rank, similarity and item id; results of the query's
                own item are ticked when the query is a stored example (its label is known).
    Evaluation  Recall@K and MAP@R of the stored query set against the gallery (table + plot) and
                the facts of the index and embedder; computed once and cached beside the index.

Robustness: the image input hands over the uploaded file untouched (`preprocess=False`), so Gradio
never decodes it; the query intake the JSON API and `retrieval search` use (retrieval.query_intake:
same limits, same size rule) reads, bounds and decodes it, and every refusal becomes a message in the
status line of that query ("Cannot use <name>: <reason>."), never an exception (an exception would
fail every query of a batch).

Throughput: search events hand their decoded query to the server's batching worker (app.batching),
which embeds queries that wait together, UI and API alike, in one forward pass.

"More like this": clicking a result puts that gallery image in the query box and searches by it (its
label is known, so correct matches are marked); a dropdown filters by the items' category (or the
index's first attribute) and a choice of re-ranking applies retrieval.search.rerank.

A live index: the served index can be replaced while the server runs (app.live_index). Each answer is
rendered with the index version its batch searched (its thumbnails, its gallery size) and names it; the
thumbnails live per version (app.thumbnails.VersionedThumbnails), so a result tile never shows another
version's image; the evaluation is cached per version, and the facts describe the version served now.

No server paths in answers, where Gradio allows it: served with the JSON API (`thumbnail_route`), a
result tile is the absolute URL of the API's thumbnail in the version that answered
(/api/v1/thumbnails/<i>.jpg?v=<version>, on the origin the request came to), which Gradio hands to the
browser as is; a tile of a version stays right after a swap (the API keeps the last few versions'
thumbnails). Gradio's image input only takes files it can read, so example queries and a result put
back in the query box stay thumbnail files (of the version that answered).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from app.eval_cache import EvaluationCache, EvaluationResult, index_cache_key
from app.live_index import LiveIndex, ReloadOutcome, ServedIndex
from app.thumbnails import ThumbnailStore, VersionedThumbnails
from retrieval.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from retrieval.query_intake import DEFAULT_MAX_BYTES, QueryIntake, QueryLimits, QueryRejected

log = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 50
MAX_BATCH_SIZE = 16  # queued queries embedded in one forward pass
MAX_DECODE_THREADS = 8  # uploads of one batch decoded in parallel
MAX_UPLOAD_BYTES = DEFAULT_MAX_BYTES  # also passed to launch(max_file_size=...)
NUM_EXAMPLES = 12
SEARCH_API = "search"
EVALUATION_API = "evaluation"
RECOMPUTE_API = "recompute_evaluation"
CORRECT_MARK = "✓"

NO_QUERY_MESSAGE = "Upload a photo (drag and drop, file picker, paste or webcam) or click an example query."


class QueryError(ValueError):
    """A query the app cannot search; the message is shown to the user as is."""


@dataclass(frozen=True)
class StoredQuery:
    """One query image of the index's stored query set (label known: results can be marked correct)."""

    path: Path
    label: int
    item_id: str
    gallery_index: int | None = None  # set when the query is itself a gallery image (all-vs-all datasets)


@dataclass(frozen=True)
class DecodedQuery:
    image: Image.Image  # RGB, upright
    known: StoredQuery | None  # set when the uploaded bytes are one of the example queries (or a gallery image)
    name: str  # what the user called the file, for messages
    origin: str = "Example query"  # how the status line names a known query


ALL_VALUES = "All"
FILTER_KEYS = ("category", "super_category", "class", "folder")  # the dropdown's attribute, first present


def _clamp_k(k: Any, max_k: int) -> int:
    try:
        value = int(round(float(k)))
    except (TypeError, ValueError):
        value = DEFAULT_K
    return max(1, min(value, max_k))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class SearchApp:
    """Holds what the UI needs (searcher, thumbnails, evaluation cache) and the event handlers.

    The handlers are plain methods so they can be called and tested without a browser;
    `build_blocks()` wires them into Gradio.
    """

    def __init__(
        self,
        searcher: Any,
        *,
        index_dir: str | os.PathLike[str] | None = None,
        max_k: int = MAX_K,
        default_k: int = DEFAULT_K,
        num_examples: int = NUM_EXAMPLES,
        thumbnails: ThumbnailStore | VersionedThumbnails | None = None,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        worker: Any = None,
        live: LiveIndex | None = None,
        thumbnail_route: Callable[[int, str], str] | None = None,
    ) -> None:
        """`live`: the served index (the worker's when a worker is given; else `searcher`, served as it is);
        `thumbnail_route`: (gallery index, index version) -> the server-relative URL of that thumbnail
        (None: tiles are files)."""
        self.thumbnail_route = thumbnail_route
        self._worker = worker
        self._worker_lock = threading.Lock()
        index_dir = index_dir if index_dir is not None else searcher.index_dir
        if index_dir is None:
            raise ValueError(
                "the searcher's index was never saved to a folder; pass index_dir (evaluations are cached there)"
            )
        self.index_dir = Path(index_dir)
        self.live = live or (worker.live if worker is not None else LiveIndex(searcher, self.index_dir))
        self.max_k = max(1, min(int(max_k), self.gallery_size))
        self.default_k = _clamp_k(default_k, self.max_k)
        self.max_batch_size = int(max_batch_size)
        self.intake = QueryIntake(QueryLimits(max_bytes=int(max_upload_bytes), max_pixels=int(max_pixels)))
        if isinstance(thumbnails, ThumbnailStore):
            thumbnails = VersionedThumbnails.from_store(thumbnails)
        self.thumbnails = thumbnails or VersionedThumbnails()
        self._follow(self.live.current)
        self.live.on_reload(self._reloaded)
        self.backend = searcher.backend
        self.examples = self._pick_examples(num_examples)
        self._example_by_hash = {_sha256(q.path.read_bytes()): q for q in self.examples}
        # Examples are shown (and served) as thumbnails, like results; a query that is one of those
        # thumbnails is searched with its original file, so example results match the evaluation.
        self.example_thumbnails = ThumbnailStore(
            [q.path for q in self.examples], self.thumbnails.folder / "examples", max_side=self.thumbnails.max_side
        )
        self._example_by_thumbnail_hash = {
            _sha256(self.example_thumbnails.path_for(i).read_bytes()): q for i, q in enumerate(self.examples)
        }
        self.recall_ks = tuple(searcher.recall_ks)
        self._evaluation_cache: tuple[str, EvaluationCache] | None = None  # (version id, its cache)
        values = searcher.attribute_values
        self.filter_key = next((k for k in FILTER_KEYS if k in values), next(iter(values), None))
        self.filter_choices = [ALL_VALUES] + (values[self.filter_key] if self.filter_key else [])
        self.rerank_choices = (
            ["none", "qe"] + (["dba"] if searcher.index.neighbours is not None else []) + ["kreciprocal"]
        )

    # --- the served index version ---------------------------------------------------------------------

    @property
    def searcher(self) -> Any:
        """The Searcher of the index version served now."""
        return self.live.searcher

    @property
    def meta(self) -> Any:
        """The served version's metadata (retrieval.index.meta.IndexMeta)."""
        return self.live.searcher.index.meta

    @property
    def gallery_size(self) -> int:
        return len(self.live.searcher.gallery_paths)

    @property
    def evaluation_cache(self) -> EvaluationCache:
        """The evaluation of the served version (its identity keys the cache file beside the index)."""
        served = self.live.current
        cached = self._evaluation_cache
        if cached is None or cached[0] != served.version.id:
            identity = {k: v for k, v in served.searcher.index.meta.to_dict().items() if k != "folder"}
            key = index_cache_key(identity, self.backend.fingerprint, self.backend.name)  # moving the folder keeps it
            cached = (served.version.id, EvaluationCache(self.index_dir, key, served.searcher.evaluate))
            self._evaluation_cache = cached
        return cached[1]

    def _follow(self, served: ServedIndex) -> None:
        self.thumbnails.for_version(served.version.id, served.searcher.gallery_paths, current=True)

    def _reloaded(self, outcome: ReloadOutcome) -> None:
        if outcome.outcome == "reloaded":
            self._follow(self.live.current)
            self._evaluation_cache = None  # holds the old version's Searcher: let it go

    @property
    def limits(self) -> QueryLimits:
        """The query images' limits (the server's JSON API is given the same)."""
        return self.intake.limits

    @property
    def max_pixels(self) -> int:
        return self.limits.max_pixels

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_bytes

    @property
    def worker(self) -> Any:
        """The batching worker searches go through (the server's; one of its own when used without a server)."""
        with self._worker_lock:
            if self._worker is None:
                from app.batching import BatchingWorker

                self._worker = BatchingWorker(self.live, max_batch=self.max_batch_size)
            return self._worker

    # --- example queries ------------------------------------------------------------------------

    def _pick_examples(self, n: int) -> list[StoredQuery]:
        """Up to `n` stored queries of distinct items, spread evenly over the query set."""
        queries = stored_queries(self.searcher)
        if n <= 0 or not queries:
            return []
        first_of_item: dict[int, StoredQuery] = {}
        for q in queries:
            first_of_item.setdefault(q.label, q)
        distinct = list(first_of_item.values())
        step = max(1, len(distinct) // n)
        return [q for q in distinct[::step][:n] if q.path.is_file()]

    # --- search ---------------------------------------------------------------------------------

    def _decode(self, payload: Any) -> DecodedQuery:
        """Gradio's raw file payload (or a path) -> RGB image, or QueryError with a readable reason."""
        try:
            return self._take_in(payload)
        except QueryRejected as exc:
            raise QueryError(f"Cannot use {exc.subject}: {exc.reason}.") from None

    def _take_in(self, payload: Any) -> DecodedQuery:
        """The query behind a payload, through the query intake (QueryRejected when refused)."""
        if payload is None or payload == "":
            raise QueryError(NO_QUERY_MESSAGE)
        name = "the uploaded file"
        if isinstance(payload, Mapping):
            name = str(payload.get("orig_name") or name)
            path, url = payload.get("path"), payload.get("url")
            if path:
                data = self.intake.read_file(Path(str(path)), name)
            elif isinstance(url, str) and url:
                name = "the pasted image"
                data = self.intake.base64_bytes(url, name)  # a data: URL; other URLs are refused, never fetched
            else:
                raise QueryError(NO_QUERY_MESSAGE)
        elif isinstance(payload, (str, os.PathLike)):
            name = Path(payload).name
            data = self.intake.read_file(Path(payload), name)
        else:
            raise QueryError(f"unexpected input of type {type(payload).__name__}; upload an image file")
        gallery_query = self._gallery_query(payload)
        if gallery_query is not None:
            return gallery_query
        digest = _sha256(data)
        known = self._example_by_hash.get(digest)
        if known is None and digest in self._example_by_thumbnail_hash:
            known = self._example_by_thumbnail_hash[digest]
            data = self.intake.read_file(known.path, name)
        return DecodedQuery(self.intake.decode(data, name), known, name)

    def _gallery_query(self, payload: Any) -> DecodedQuery | None:
        """A result tile put back in the query box ("more like this"): the gallery image behind it, its label
        known when the tile is of the version served now (a tile of an earlier version searches by its image)."""
        raw = payload.get("path") if isinstance(payload, Mapping) else payload
        if not raw:
            return None
        path = Path(str(raw))
        match = re.fullmatch(r"(\d+)\.jpg", path.name)
        owner = self.thumbnails.owner_of(path) if match else None
        if match is None or owner is None:
            return None
        version, store = owner
        i = int(match.group(1))
        if not 0 <= i < len(store.gallery_paths):
            return None
        served = self.live.current  # read once: a swap in between must not pair this version with another's rows
        searcher = served.searcher
        try:
            image = open_image(store.gallery_paths[i], max_pixels=self.max_pixels)
        except ImageLoadError:
            image = open_image(path, max_pixels=self.max_pixels)  # the original moved: its thumbnail
        known = None
        if version == served.version.id:
            label, item = int(searcher.gallery_labels[i]), str(searcher.gallery_item_ids[i])
            known = StoredQuery(Path(searcher.gallery_paths[i]), label, item, i) if label >= 0 else None
        return DecodedQuery(image, known, f"gallery image #{i}", "Gallery image")

    def _decode_or_error(self, payload: Any) -> DecodedQuery | QueryError:
        try:
            return self._decode(payload)
        except QueryError as exc:
            return exc

    def _decode_all(self, payloads: Sequence[Any]) -> list[DecodedQuery | QueryError]:
        """Decode a batch's uploads on parallel threads (Pillow decodes without the GIL): a full-size
        phone photo takes tens of milliseconds to decode, and a queued batch would pay that serially."""
        threads = min(len(payloads), os.cpu_count() or 1, MAX_DECODE_THREADS)
        if threads <= 1:
            return [self._decode_or_error(p) for p in payloads]
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
            return list(pool.map(self._decode_or_error, payloads))

    def search_batch(
        self, images: Sequence[Any], ks: Sequence[Any], filter_value: Any = None, rerank: Any = None
    ) -> tuple[list[list[tuple[str, str]]], list[str]]:
        """One (gallery, status) per query, searched through the batching worker; never raises."""
        galleries, statuses, _ = self._search(images, ks, filter_value, rerank)
        return galleries, statuses

    def search_one(
        self, image: Any, k: Any, filter_value: Any = None, rerank: Any = None, root_url: str | None = None
    ) -> tuple[list[tuple[str, str]], str, list[str]]:
        """The UI's search event: (result tiles, status, the tiles' thumbnail files, for "more like this").
        `root_url`: the server's public root as the request saw it; tiles are then thumbnail URLs."""
        galleries, statuses, shown = self._search([image], [k], filter_value, rerank, root_url)
        return galleries[0], statuses[0], shown[0]

    def tile(self, gallery_index: int, version: str, file: Path, root_url: str | None = None) -> str:
        """What a result tile shows: the URL of the thumbnail of that index version when served with the API,
        else its file."""
        if self.thumbnail_route is not None and root_url:
            return root_url.rstrip("/") + self.thumbnail_route(gallery_index, version)
        return str(file)

    def more_like_this(self, shown: Sequence[str] | None, evt: Any = None) -> Any:
        """A click on result tile `evt.index`: that gallery image's thumbnail (of the version that answered)
        becomes the query."""
        import gradio as gr

        index = getattr(evt, "index", None)
        if isinstance(index, (list, tuple)):
            index = index[0] if index else None
        if index is None or not shown or not 0 <= int(index) < len(shown):
            return gr.update()
        return str(shown[int(index)])

    def current_filter_choices(self) -> list[str]:
        """The dropdown's values in the version served now (a page loaded after a reload offers these)."""
        values = self.searcher.attribute_values
        return [ALL_VALUES] + (values.get(self.filter_key, []) if self.filter_key else [])

    def filter_update(self) -> Any:
        """On page load: the dropdown's values of the version served now, when they differ from the page's."""
        import gradio as gr

        choices = self.current_filter_choices()
        return gr.update() if choices == self.filter_choices else gr.update(choices=choices)

    def _where(self, filter_value: Any) -> dict[str, list[str]] | None:
        if not filter_value or filter_value == ALL_VALUES or not self.filter_key:
            return None
        return {self.filter_key: [str(filter_value)]}

    def _search(
        self, images: Sequence[Any], ks: Sequence[Any], filter_value: Any, rerank: Any, root_url: str | None = None
    ) -> tuple[list[list[tuple[str, str]]], list[str], list[list[str]]]:
        n = len(images)
        galleries: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        statuses = [""] * n
        shown: list[list[str]] = [[] for _ in range(n)]
        ks_clamped = [_clamp_k(ks[i] if i < len(ks) else self.default_k, self.max_k) for i in range(n)]
        method = str(rerank or "none")
        if method not in self.rerank_choices:
            method = "none"
        where = self._where(filter_value)
        good: list[tuple[int, DecodedQuery]] = []
        for i, decoded in enumerate(self._decode_all(images)):
            if isinstance(decoded, QueryError):
                statuses[i] = f"⚠️ {decoded}"
            else:
                good.append((i, decoded))
        if not good:
            return galleries, statuses, shown
        try:  # preprocessing runs here, on the event's worker thread, never on the server's event loop
            futures = [
                self.worker.submit(self.worker.prepare(q.image).pixels, ks_clamped[i], where, method) for i, q in good
            ]
        except Exception as exc:  # queue full, shutting down
            for i, _ in good:
                statuses[i] = f"⚠️ The server is busy ({exc}). Try again in a moment."
            return galleries, statuses, shown
        for (i, query), future in zip(good, futures):
            try:
                result = future.result()
            except Exception as exc:
                log.exception("search failed")
                statuses[i] = f"⚠️ Search failed ({type(exc).__name__}: {exc}). The server keeps running; try again."
                continue
            try:
                hits = list(result.hits)[: ks_clamped[i]]
                seconds = result.embed_seconds + result.search_seconds
                served = result.served or self.live.current
                galleries[i], statuses[i], shown[i] = self._render(
                    query, hits, seconds, result.batch_size, where, method, served, root_url
                )
            except Exception as exc:
                log.exception("rendering results failed")
                statuses[i] = f"⚠️ Could not show the results ({type(exc).__name__}: {exc})."
        return galleries, statuses, shown

    def _render(
        self,
        query: DecodedQuery,
        hits: Sequence[Any],
        seconds: float,
        batch: int,
        where: Mapping[str, Any] | None = None,
        rerank: str = "none",
        served: ServedIndex | None = None,
        root_url: str | None = None,
    ) -> tuple[list[tuple[str, str]], str, list[str]]:
        """(tiles, status, each tile's thumbnail file): tiles are URLs with `root_url` (see `tile`)."""
        served = served or self.live.current  # the version that answered: its thumbnails, its size
        thumbnails = self.thumbnails.for_version(served.version.id, served.searcher.gallery_paths)
        assert thumbnails is not None
        gallery: list[tuple[str, str]] = []
        files: list[str] = []
        correct_ranks: list[int] = []
        for hit in hits:
            itself = query.known is not None and query.known.gallery_index == int(hit.gallery_index)
            correct = query.known is not None and int(hit.label) == query.known.label and not itself
            if correct:
                correct_ranks.append(int(hit.rank))
            thumb = thumbnails.path_for(int(hit.gallery_index))  # rendered now, so a tile's URL answers at once
            files.append(str(thumb))
            # the mark leads so it stays visible when a narrow tile truncates the caption
            caption = f"{CORRECT_MARK} " if correct else ""
            caption += f"#{hit.rank} · {float(hit.score):.3f} · {hit.item_id}"
            if itself:
                caption += " (the query itself)"
            if thumbnails.is_placeholder(int(hit.gallery_index)):
                caption += " (gallery file unreadable)"
            gallery.append((self.tile(int(hit.gallery_index), served.version.id, thumb, root_url), caption))
        timing = f"embed + search **{_fmt_ms(seconds)}**"
        if batch > 1:
            timing += f" (one batch of {batch} queued queries)"
        scope = f"{len(served.searcher.gallery_paths):,} gallery images"
        if where:
            scope += " where " + " and ".join(f"{k} = {', '.join(v)}" for k, v in where.items())
        if rerank != "none":
            timing += f" · re-ranked ({rerank})"
        lines = [
            f"**Top {len(hits)}** of {scope} · {timing} · {self.devices_text()} · index version `{served.version.id}`"
        ]
        if query.known is not None:
            item = query.known.item_id
            if correct_ranks:
                lines.append(
                    f"{CORRECT_MARK} {query.origin} of item `{item}`: first correct match at rank "
                    f"**{correct_ranks[0]}** ({len(correct_ranks)} of {len(hits)} results are this item, marked "
                    f"{CORRECT_MARK})."
                )
            else:
                lines.append(f"✗ {query.origin} of item `{item}`: no correct match in the top {len(hits)}.")
        else:
            lines.append("Query label unknown (not a stored example), so results are not marked correct.")
        return gallery, "\n\n".join(lines), files

    # --- evaluation -----------------------------------------------------------------------------

    def evaluation(self, recompute: bool = False) -> tuple[Any, Any, Any, str]:
        """(Recall@K/MAP@R table, plot data, facts table, status) for the Evaluation tab; never raises."""
        import pandas as pd

        try:
            result = self.evaluation_cache.get(recompute=recompute)
        except Exception as exc:
            log.exception("evaluation failed")
            empty = pd.DataFrame({"Metric": [], "Value (%)": []})
            return (
                empty,
                pd.DataFrame({"K": [], "Recall@K (%)": []}),
                self.facts_table(),
                (f"⚠️ Evaluation failed ({type(exc).__name__}: {exc})."),
            )
        return (
            self.metrics_table(result),
            self.recall_curve(result),
            self.facts_table(),
            self._evaluation_status(result),
        )

    def metrics_table(self, result: EvaluationResult) -> Any:
        import pandas as pd

        rows = [(name, round(100.0 * value, 2)) for name, value in ordered_metrics(result.metrics, self.recall_ks)]
        return pd.DataFrame(rows, columns=["Metric", "Value (%)"])

    def recall_curve(self, result: EvaluationResult) -> Any:
        import pandas as pd

        points = sorted(
            (int(name[2:]), 100.0 * value) for name, value in result.metrics.items() if _is_recall_key(name)
        )
        return pd.DataFrame({"K": [k for k, _ in points], "Recall@K (%)": [round(v, 2) for _, v in points]})

    def facts(self) -> list[tuple[str, str]]:
        from retrieval.index.calibrate import search_setting_text

        m = self.meta
        rows = [
            ("Dataset", m.dataset),
            ("Protocol", m.protocol),
            ("Split indexed", m.split),
            ("Gallery size", f"{self.gallery_size:,}"),
            ("Stored queries", str(m.n_queries)),
            ("Embedding size", str(m.embedding_size)),
            ("Index type", m.index_type),
            ("FAISS factory", m.index_factory),
            ("Search setting", search_setting_text(m) if m.index_params is not None else ""),
            ("Embedder fingerprint", m.fingerprint),
            ("Built", m.created_at),
            ("Updated", m.updated_at or ""),
            ("Index version", self.live.version.id),
            ("Built with", m.backend or ""),
            ("Serving", self.devices_text()),
            ("Index", self.index_dir.name),  # never the server's absolute paths
        ]
        return [(k, v) for k, v in rows if v]

    def facts_table(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.facts(), columns=["Fact", "Value"])

    def _evaluation_status(self, result: EvaluationResult) -> str:
        how = "read from the cache" if result.from_cache else "computed now"
        where = f"`{result.cache_path.name}` beside the index" if result.cache_path else "memory only"
        text = f"Computed {result.computed_at} in {result.seconds:.1f} s ({how}; cached in {where})."
        if result.note:
            text += f" ⚠️ {result.note}"
        return text

    # --- Gradio wiring --------------------------------------------------------------------------

    def devices_text(self) -> str:
        text = f"{self.backend.name} on {self.backend.device}"
        index_device = getattr(self.searcher, "devices", {}).get("index", "")
        if index_device and index_device != "not yet used":
            text += f", FAISS on {index_device}"
        return text

    def header_markdown(self) -> str:
        dataset = self.meta.dataset or "index"
        return (
            f"## Search by photo · {dataset}\n"
            f"{self.gallery_size:,} gallery images · embedder `{self.backend.fingerprint}` · "
            f"embedding with **{self.backend.name}** on **{self.backend.device}**"
        )

    def build_blocks(self) -> Any:
        """The Gradio Blocks; queue settings are applied by `app.serve.configure_queue`."""
        import gradio as gr

        # delete_cache: uploads and result copies in Gradio's cache older than an hour are removed
        # every 30 minutes (and at shutdown), so a long-running server does not fill the disk.
        with gr.Blocks(title="metrix-retrieval search", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
            gr.Markdown(self.header_markdown())
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=280):
                        query = gr.Image(
                            label="Query photo",
                            type="filepath",
                            sources=["upload", "webcam", "clipboard"],
                            height=280,
                            elem_id="query-image",
                        )
                        k = gr.Slider(
                            1, self.max_k, value=self.default_k, step=1, label="K (results shown)", elem_id="k-slider"
                        )
                        category = gr.Dropdown(
                            self.filter_choices,
                            value=ALL_VALUES,
                            label=f"Only {self.filter_key}" if self.filter_key else "Filter",
                            visible=self.filter_key is not None,
                            elem_id="filter-dropdown",
                        )
                        rerank = gr.Radio(
                            self.rerank_choices, value="none", label="Re-ranking", elem_id="rerank-choice"
                        )
                        button = gr.Button("Search", variant="primary", elem_id="search-button")
                        if self.examples:
                            gr.Examples(
                                examples=[
                                    [str(self.example_thumbnails.path_for(i))] for i in range(len(self.examples))
                                ],
                                inputs=[query],
                                label="Example queries: one per item, spread evenly over the stored query set and "
                                "not chosen by their results (label known: correct results get a ✓)",
                                examples_per_page=len(self.examples),
                                elem_id="example-queries",
                            )
                    with gr.Column(scale=3):
                        status = gr.Markdown(NO_QUERY_MESSAGE, elem_id="search-status")
                        results = gr.Gallery(
                            label="Results",
                            columns=4,
                            height="auto",
                            object_fit="contain",
                            allow_preview=False,  # a click searches by the result ("more like this")
                            elem_id="results-gallery",
                        )
                shown = gr.State([])

                def search(
                    image: Any, k_value: Any, filter_value: Any, rerank_value: Any, request: gr.Request
                ) -> tuple[list[tuple[str, str]], str, list[str]]:
                    return self.search_one(image, k_value, filter_value, rerank_value, root_url(request))

                search.__annotations__["request"] = gr.Request  # Gradio reads the class, not its name

                gr.on(
                    triggers=[query.change, k.release, button.click, category.change, rerank.change],
                    fn=search,
                    inputs=[query, k, category, rerank],
                    outputs=[results, status, shown],
                    api_name=SEARCH_API,
                    preprocess=False,
                    concurrency_limit=max(1, self.worker.max_batch),  # events wait on the worker, which batches
                    concurrency_id="search",
                    show_progress="minimal",
                )

                def clicked(shown_files: list[str], evt: gr.SelectData) -> Any:
                    return self.more_like_this(shown_files, evt)

                clicked.__annotations__["evt"] = gr.SelectData  # Gradio reads the class, not its name

                results.select(clicked, inputs=[shown], outputs=[query], api_visibility="private", queue=False)
            with gr.Tab("Evaluation", id="evaluation"):
                eval_status = gr.Markdown("Evaluating the stored query set against the gallery…", elem_id="eval-status")
                with gr.Row():
                    with gr.Column(scale=1):
                        table = gr.Dataframe(
                            label="Recall@K and MAP@R (stored queries vs gallery)",
                            interactive=False,
                            elem_id="recall-table",
                        )
                    with gr.Column(scale=2):
                        plot = gr.LinePlot(
                            x="K",
                            y="Recall@K (%)",
                            title="Recall@K",
                            y_lim=[0, 100],
                            label="Recall@K",
                            elem_id="recall-plot",
                        )
                facts = gr.Dataframe(
                    value=self.facts_table(), label="Index and embedder", interactive=False, elem_id="facts-table"
                )
                recompute = gr.Button("Recompute evaluation", elem_id="recompute-button")
                outputs = [table, plot, facts, eval_status]
                demo.load(
                    self.evaluation,
                    inputs=None,
                    outputs=outputs,
                    api_name=EVALUATION_API,
                    concurrency_limit=1,
                    concurrency_id="evaluation",
                )
                recompute.click(
                    lambda: self.evaluation(recompute=True),
                    inputs=None,
                    outputs=outputs,
                    api_name=RECOMPUTE_API,
                    concurrency_limit=1,
                    concurrency_id="evaluation",
                )
            if self.filter_key is not None:  # the index may have been republished since the page was built
                demo.load(self.filter_update, inputs=None, outputs=[category], api_name=False, queue=False)
        return demo


# --- helpers shared with the tests / CLI ------------------------------------------------------------


def root_url(request: Any) -> str | None:
    """The server's root URL as the client reached it (Gradio's rule: forwarded host and protocol
    honoured), for links the browser follows; None outside a request."""
    inner = getattr(request, "request", None)
    if inner is None:
        return None
    from gradio import route_utils

    try:
        root_path = inner.scope.get("root_path") or None
        return route_utils.get_root_url(inner, route_utils.get_api_call_path(inner), root_path)
    except Exception:
        log.exception("could not tell the server's root URL")
        return None


def _is_recall_key(name: str) -> bool:
    return name.startswith("R@") and name[2:].isdigit()


def ordered_metrics(metrics: Mapping[str, float], recall_ks: Sequence[int]) -> list[tuple[str, float]]:
    """Recall@K in the dataset's K order, then MAP@R, then any other metric."""
    out = [(f"R@{k}", metrics[f"R@{k}"]) for k in recall_ks if f"R@{k}" in metrics]
    extra = sorted((int(n[2:]), n) for n in metrics if _is_recall_key(n) and int(n[2:]) not in set(recall_ks))
    out += [(n, metrics[n]) for _, n in extra]
    if "MAP@R" in metrics:
        out.append(("MAP@R", metrics["MAP@R"]))
    out += [(n, v) for n, v in metrics.items() if not _is_recall_key(n) and n != "MAP@R"]
    names = {"RP": "R-precision"}
    return [(("Recall@" + n[2:]) if _is_recall_key(n) else names.get(n, n), float(v)) for n, v in out]


def stored_queries(searcher: Any) -> list[StoredQuery]:
    """Example candidates with known labels: the stored query set, or (all-vs-all datasets, which
    store none) the labelled gallery images themselves."""
    if searcher.has_stored_queries:
        columns, from_gallery = (searcher.query_paths, searcher.query_labels, searcher.query_item_ids), False
    else:
        columns, from_gallery = (searcher.gallery_paths, searcher.gallery_labels, searcher.gallery_item_ids), True
    return [
        StoredQuery(Path(p), int(lab), str(item), i if from_gallery else None)
        for i, (p, lab, item) in enumerate(zip(*columns))
        if int(lab) >= 0
    ]


def build_app(searcher: Any, **kwargs: Any) -> tuple[Any, SearchApp]:
    """(Gradio Blocks, SearchApp) for an open Searcher; see SearchApp for the keyword arguments."""
    search_app = SearchApp(searcher, **kwargs)
    return search_app.build_blocks(), search_app
