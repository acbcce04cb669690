"""Server-side dynamic batching: one embedding worker per device serves the API and the UI together.

Callers decode and preprocess their image on a thread pool (`prepare`), then `submit` the pixels; the
worker thread takes whatever requests are waiting (up to `max_batch`, waiting at most `max_wait_ms`
after the first for more), embeds them in one forward pass and searches them in one FAISS call per
(filter, re-ranking) group. The queue is bounded: a request beyond `queue_size` waiting ones is
refused at once (`QueueFull`, HTTP 503), never left to wait minutes.

The index can be replaced while the server runs (app.live_index): the worker takes the served version
once per batch, searches the whole batch with it and hands it back with each result, so a batch never
mixes versions and every answer can name the version it came from.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from app.live_index import LiveIndex, ServedIndex
from retrieval.preprocess import preprocess_eval

CPU_MAX_BATCH, CPU_MAX_WAIT_MS = 16, 2.0  # a CPU forward pass grows ~linearly with the batch: small batches
GPU_MAX_BATCH, GPU_MAX_WAIT_MS = 64, 5.0  # a GPU pass of 64 costs little more than one of 1
DEFAULT_QUEUE_SIZE = 256
MAX_PREPARE_THREADS = 8

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The worker's queue is full; the caller should answer 503 and the client retry later."""


def default_batching(device: str) -> tuple[int, float]:
    """(max_batch, max_wait_ms) suited to the embedding device ("cpu", "cuda:0 (bf16 autocast)", ...)."""
    on_gpu = "cuda" in device.lower() or "gpu" in device.lower()
    return (GPU_MAX_BATCH, GPU_MAX_WAIT_MS) if on_gpu else (CPU_MAX_BATCH, CPU_MAX_WAIT_MS)


class Engine(Protocol):
    """What the worker runs per batch: embedding of preprocessed pixels, then the search."""

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...

    def search(self, emb: np.ndarray, k: int, where: Any, rerank: str) -> list[list[Any]]: ...


class SearcherEngine:
    """The real work: the searcher's embedder on (B, 3, S, S) pixels, then `Searcher.search_embeddings`."""

    def __init__(self, searcher: Any) -> None:
        self.searcher = searcher

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        backend = self.searcher.backend
        if hasattr(backend, "embed_array"):  # onnxruntime
            return backend.embed_array(pixels)
        if hasattr(backend, "embed_tensor"):  # torch
            import torch

            return backend.embed_tensor(torch.from_numpy(pixels))
        raise TypeError(f"the {backend.name} backend cannot embed preprocessed arrays")

    def search(self, emb: np.ndarray, k: int, where: Any, rerank: str) -> list[list[Any]]:
        return self.searcher.search_embeddings(emb, k, where=where, rerank=rerank)


@dataclass
class Prepared:
    """One decoded query, preprocessed for the embedder: pixels (3, S, S) float32."""

    pixels: np.ndarray
    decode_seconds: float


@dataclass
class BatchResult:
    hits: list[Any]
    embed_seconds: float
    search_seconds: float
    batch_size: int
    served: ServedIndex | None = None  # the index version the batch searched

    @property
    def version(self) -> str:
        return self.served.version.id if self.served is not None else ""


@dataclass
class _Request:
    pixels: np.ndarray
    k: int
    where: Any
    where_key: tuple
    rerank: str
    future: Future = field(default_factory=Future)


def _where_key(where: Any) -> tuple:
    if not where:
        return ()
    if isinstance(where, dict):
        return tuple(
            sorted(
                (str(k), tuple(sorted(v)) if isinstance(v, (set, frozenset, list, tuple)) else (str(v),))
                for k, v in where.items()
            )
        )
    return tuple(sorted(str(t) for t in where))


class BatchingWorker:
    """One thread that owns the embedder and the index; see the module docstring."""

    def __init__(
        self,
        index: Any,
        *,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        engine: Engine | None = None,
        warm_up: bool = False,
    ) -> None:
        """`index`: the served LiveIndex (or one Searcher, served as the only version); `engine` replaces
        embed + search for every version (tests and benchmarks); `warm_up`: first embed and search one blank
        image with the real embedder and index (a server is ready only after that, see `warmed`)."""
        self.live = index if isinstance(index, LiveIndex) else LiveIndex(index)
        searcher = self.live.searcher
        self._engine = engine
        device = str(getattr(searcher.backend, "device", "cpu"))
        default_batch, default_wait = default_batching(device)
        self.max_batch = int(max_batch or default_batch)
        self.max_wait = float(default_wait if max_wait_ms is None else max_wait_ms) / 1000.0
        self.queue_size = int(queue_size)
        self.preprocessing = searcher.backend.preprocessing
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=self.queue_size)
        self._pool = ThreadPoolExecutor(min(MAX_PREPARE_THREADS, os.cpu_count() or 1), thread_name_prefix="prepare")
        self.batches_run = 0
        self.batch_sizes: list[int] = []  # the last few hundred, for tests and statistics
        self.warmed = threading.Event()  # set after the warm-up or the first batch (readiness)
        self._warm_up = bool(warm_up)
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size (metrics)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="embedding-worker", daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------------------
    @property
    def searcher(self) -> Any:
        """The Searcher of the version served now (the next batch's)."""
        return self.live.searcher

    @property
    def engine(self) -> Engine:
        """What the next batch runs: the given engine, else the served version's embed + search."""
        return self._engine or SearcherEngine(self.live.searcher)

    def queue_depth(self) -> int:
        """Queries waiting for a batch."""
        return self._queue.qsize()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The thread pool callers decode and preprocess on (never the event loop)."""
        return self._pool

    def prepare(self, image: Image.Image, decode_seconds: float = 0.0) -> Prepared:
        """Preprocess a decoded RGB image for the embedder (run it on `pool`)."""
        return Prepared(preprocess_eval(image, self.preprocessing), decode_seconds)

    def submit(self, pixels: np.ndarray, k: int, where: Any = None, rerank: str = "none") -> Future:
        """Queue one query; its Future resolves to a BatchResult (or the search's exception). QueueFull when full."""
        if self._closed:
            raise QueueFull("the server is shutting down")
        request = _Request(pixels, int(k), where or None, _where_key(where), rerank or "none")
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue_size} queries are already waiting; try again shortly") from None
        return request.future

    def search_many(
        self, prepared: Sequence[np.ndarray], ks: Sequence[int], where: Any = None, rerank: str = "none"
    ) -> list[BatchResult]:
        """Submit several queries at once and wait for all (blocking; for synchronous callers)."""
        futures = [self.submit(p, k, where, rerank) for p, k in zip(prepared, ks)]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        while True:  # anything still queued is answered, not left hanging
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None and not request.future.done():
                request.future.set_exception(QueueFull("the server is shutting down"))

    # -- the worker thread -----------------------------------------------------------------------------
    def _collect(self, first: _Request) -> list[_Request]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    request = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if request is None:
                self._closed = True
                break
            batch.append(request)
        return batch

    def _warm(self) -> None:
        """One blank image through the served version's embedder and index, before any query."""
        served = self.live.current
        try:
            size = int(self.preprocessing.image_size)
            pixels = preprocess_eval(Image.new("RGB", (size, size), (128, 128, 128)), self.preprocessing)
            engine = SearcherEngine(served.searcher)
            engine.search(engine.embed(pixels[None]), 1, None, "none")
        except Exception:  # a broken embedder: the server stays not ready until a batch succeeds
            log.exception("the warm-up batch failed")
            return
        self.warmed.set()

    def _loop(self) -> None:
        if self._warm_up:
            self._warm()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [r for r in self._collect(first) if r.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
            first = batch = None  # type: ignore[assignment]  # hold no answered batch (nor its index version)
            if self._closed and self._queue.empty():
                return

    def _run(self, batch: list[_Request]) -> None:
        served = self.live.current  # once per batch: the whole batch searches this version
        engine = self._engine or SearcherEngine(served.searcher)
        try:
            t0 = time.perf_counter()
            emb = engine.embed(np.stack([r.pixels for r in batch]))
            embed_seconds = time.perf_counter() - t0
        except Exception as exc:  # a failing forward pass fails these requests, not the worker
            for r in batch:
                r.future.set_exception(exc)
            return
        self.batches_run += 1
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-512:]
        if self.on_batch is not None:
            self.on_batch(len(batch))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(batch):
            groups.setdefault((r.where_key, r.rerank), []).append(i)
        for rows in groups.values():
            first = batch[rows[0]]
            try:
                t1 = time.perf_counter()
                results = engine.search(emb[rows], max(batch[i].k for i in rows), first.where, first.rerank)
                search_seconds = time.perf_counter() - t1
            except Exception as exc:
                for i in rows:
                    batch[i].future.set_exception(exc)
                continue
            for i, hits in zip(rows, results):
                batch[i].future.set_result(
                    BatchResult(list(hits)[: batch[i].k], embed_seconds, search_seconds, len(batch), served)
                )
        self.warmed.set()
