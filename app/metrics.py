"""Prometheus metrics of one server, served at `/metrics` in the Prometheus text format.

Each server has its own CollectorRegistry (no process-wide state: tests and benchmarks run several
servers in one process). What is exported:

    retrieval_http_requests_total{route, method, status}    every HTTP request; `route` is the API route's
                                                            template (/api/v1/thumbnails/{index}.jpg), `/metrics`,
                                                            or `ui` for the web UI and its assets
    retrieval_search_seconds{stage}                         JSON API searches: decode, embed, search (the
                                                            batch's shared forward pass and FAISS call) and
                                                            total (the request on the server), histograms
    retrieval_batch_size                                    queries per forward pass (API and UI), histogram
    retrieval_queue_depth                                   queries waiting for the batching worker
    retrieval_index_items                                   gallery items of the served index version
    retrieval_index_version_info{version, built_at, ...}   the served index version
    retrieval_index_reloads_total{outcome}                  reloads: reloaded, unchanged, refused
    retrieval_ready                                         1 when /api/v1/ready answers 200
    retrieval_embedder_info{fingerprint, backend, device}   the embedder
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from app.live_index import OUTCOMES, LiveIndex, ReloadOutcome

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("decode", "embed", "search", "total")
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format every Prometheus reads


class ServerMetrics:
    """The metrics of one server and the hooks that keep them current."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "retrieval_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.search_seconds = Histogram(
            "retrieval_search_seconds",
            "JSON API search latency by stage, seconds",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "retrieval_batch_size", "Queries embedded in one forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("retrieval_queue_depth", "Queries waiting for the batching worker", registry=r)
        self.index_items = Gauge("retrieval_index_items", "Gallery items in the served index version", registry=r)
        self.index_version = Info("retrieval_index_version", "The served index version", registry=r)
        self.reloads = Counter("retrieval_index_reloads", "Index reloads by outcome", ["outcome"], registry=r)
        self.ready = Gauge("retrieval_ready", "1 when the server is ready (GET /api/v1/ready answers 200)", registry=r)
        self.embedder = Info("retrieval_embedder", "The embedder the server embeds queries with", registry=r)
        for stage in STAGES:
            self.search_seconds.labels(stage)
        for outcome in OUTCOMES:
            self.reloads.labels(outcome)

    def bind(self, live: LiveIndex, worker: Any, is_ready: Callable[[], bool]) -> None:
        """Follow the served index, the worker's batches and queue, and readiness."""
        backend = live.searcher.backend
        self.embedder.info(
            {"fingerprint": str(backend.fingerprint), "backend": str(backend.name), "device": str(backend.device)}
        )
        self.queue_depth.set_function(lambda: float(worker.queue_depth()))
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)
        self.index_items.set_function(lambda: float(live.version.n_items))
        worker.on_batch = self.batch_size.observe
        self._show_version(live)
        live.on_reload(lambda outcome: self._reloaded(live, outcome))

    def _reloaded(self, live: LiveIndex, outcome: ReloadOutcome) -> None:
        self.reloads.labels(outcome.outcome).inc()
        self._show_version(live)

    def _show_version(self, live: LiveIndex) -> None:
        v = live.version
        self.index_version.info(
            {"version": v.id, "built_at": v.built_at, "updated_at": v.updated_at or "", "published_at": v.published_at}
        )

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests.labels(route, method, str(status)).inc()

    def observe_search(self, timings_ms: dict[str, float]) -> None:
        """One answered API search's stage timings (milliseconds, as the answer reports them)."""
        for stage in STAGES:
            if stage in timings_ms:
                self.search_seconds.labels(stage).observe(timings_ms[stage] / 1000.0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
