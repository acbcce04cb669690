"""The index version a server is serving, and replacing it while the server runs (no restart, no dropped request).

`retrieval index --out DIR --add/--remove/--rerank-neighbours` (or a rebuild into DIR) republishes the folder
by renaming a complete new folder into place (retrieval.index.folder.publish_folder). `LiveIndex` holds the
served `ServedIndex` (its version and its Searcher). A reload, asked for by the folder watcher or by
`POST /api/v1/admin/reload`:

1. stats DIR/meta.json (inode, mtime, size): unchanged -> nothing to do;
2. opens the new folder beside the served one with the SAME embedder (no model reload), fully verified
   (every file's size and SHA-256 against meta.json; the embedder's fingerprint, size and normalisation
   against the index) and refuses it, logged with the reason, when anything is wrong: the old version
   keeps serving and the watcher tries again only when the folder changes again;
3. runs one warm-up search on it, then makes it current with one assignment. The batching worker reads
   `current` once per batch, so a batch never mixes versions and a batch in flight finishes on the version
   it took; every answer names the version it came from;
4. on a background thread, waits for the last batch on the old version to finish, then returns its memory
   (one garbage collection, then glibc's `malloc_trim`, which hands freed heap pages back to the system).
   Whoever opened the first Searcher must not keep a reference to it, or its memory stays taken.

A version id is stable and says what it is: the folder's publish time (meta.json `saved_at`) and a short
hash of the SHA-256 of every file meta.json records (and of a Milvus-backed folder's store record, which holds
the SHA-256 of the collection's keys), e.g. `20261201T101500Z-3fa2c1d9`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.errors import one_line
from retrieval.index.meta import META_FILE, IndexMeta

log = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL_S = 1.0
MISSING_GRACE_S = 0.2  # a republish leaves DIR missing between two renames: look again before refusing
LOAD_ATTEMPTS = 3  # a folder republished again while it was being loaded is loaded again
COLLECT_AFTER_S = 1.0  # a batch in flight finishes well within this
RELEASE_WAIT_S = 10.0  # how long the release waits for the batches still running on the old version

Outcome = Literal["reloaded", "unchanged", "refused"]
OUTCOMES: tuple[Outcome, ...] = ("reloaded", "unchanged", "refused")


@dataclass(frozen=True)
class IndexVersion:
    """Which published copy of the index folder this is, and its facts."""

    id: str
    built_at: str  # meta.json created_at: when the index was built
    updated_at: str | None  # the last --add/--remove, None = never
    published_at: str  # meta.json saved_at: when this copy was written
    n_items: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "built_at": self.built_at,
            "updated_at": self.updated_at,
            "published_at": self.published_at,
            "n_items": self.n_items,
        }


def version_of(meta: IndexMeta) -> IndexVersion:
    """The version of an index folder from its metadata (what `retrieval index` recorded when it published it)."""
    digest = hashlib.sha256()
    for name in sorted(meta.files):
        digest.update(f"{name}\0{meta.files[name].get('sha256', '')}\n".encode())
    if meta.store:  # vectors kept in a database: its record names the rows this copy of the folder serves
        digest.update(json.dumps(meta.store, sort_keys=True).encode())
    published = meta.saved_at or meta.updated_at or meta.created_at
    stamp = "".join(c for c in published.split("+")[0] if c.isdigit() or c == "T") or "unknown"
    return IndexVersion(
        f"{stamp}Z-{digest.hexdigest()[:8]}", meta.created_at, meta.updated_at, published, int(meta.n_items)
    )


@dataclass(eq=False)
class ServedIndex:
    """One loaded version: what a batch searches with. Read-only once current."""

    version: IndexVersion
    searcher: Any  # retrieval.search.searcher.Searcher
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: reloaded to `version`, found the folder `unchanged`, or `refused` it (`message` why)."""

    outcome: Outcome
    version: str  # the version served after this reload
    previous: str  # the version served before it
    message: str
    trigger: str  # "watch", "request" or "start"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "index_version": self.version,
            "previous_version": self.previous,
            "message": self.message,
            "trigger": self.trigger,
            "seconds": round(self.seconds, 3),
        }


Signature = tuple[int, int, int, int, int]


def folder_signature(index_dir: Path) -> Signature | None:
    """(folder inode, meta.json device, inode, mtime ns, size): changes whenever the folder is republished."""
    try:
        folder = os.stat(index_dir)
        meta = os.stat(index_dir / META_FILE)
    except OSError:
        return None
    return folder.st_ino, meta.st_dev, meta.st_ino, meta.st_mtime_ns, meta.st_size


class LiveIndex:
    """The served index version of one server; see the module docstring.

    `current` is read without a lock (one attribute read); reloads are serialised by a lock, so the
    watcher and the admin route never load the same folder twice at once."""

    def __init__(
        self,
        searcher: Any,
        index_dir: str | os.PathLike[str] | None = None,
        *,
        data_root: str | os.PathLike[str] | None = None,
    ) -> None:
        folder = index_dir if index_dir is not None else searcher.index_dir
        self.index_dir = Path(folder) if folder is not None else None
        self.data_root = data_root
        self.current = ServedIndex(version_of(searcher.meta), searcher)
        self._served_signature = folder_signature(self.index_dir) if self.index_dir else None
        self._seen_signature = self._served_signature
        self.stale: ReloadOutcome | None = None  # the last refusal, while the folder holds that refused copy
        self.last: ReloadOutcome | None = None
        self._listeners: list[Callable[[ReloadOutcome], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.watch_interval = DEFAULT_WATCH_INTERVAL_S
        self.released = threading.Event()  # set when the release after the last swap has finished
        self.released.set()
        self.release_ok = True  # whether it let the replaced version go (False: something still holds it)

    # -- facts ------------------------------------------------------------------------------------------
    @property
    def version(self) -> IndexVersion:
        return self.current.version

    @property
    def searcher(self) -> Any:
        return self.current.searcher

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.is_alive()

    def on_reload(self, listener: Callable[[ReloadOutcome], None]) -> None:
        """Call `listener(outcome)` after every reload attempt (metrics, logs)."""
        self._listeners.append(listener)

    # -- reloading --------------------------------------------------------------------------------------
    def reload(self, trigger: str = "request") -> ReloadOutcome:
        """Load the folder if it changed and swap it in; never raises for a bad folder (it is refused)."""
        with self._lock:
            started = time.perf_counter()
            outcome = self._reload(trigger)
            outcome = ReloadOutcome(**{**outcome.__dict__, "seconds": time.perf_counter() - started})
            self.last = outcome
        if outcome.outcome == "refused":
            log.warning(
                "refused the index version published at %s: %s; still serving %s",
                self.index_dir,
                outcome.message,
                outcome.version,
            )
        elif outcome.outcome == "reloaded":
            log.info(
                "now serving index version %s (%d items; was %s), loaded in %.2f s",
                outcome.version,
                self.version.n_items,
                outcome.previous,
                outcome.seconds,
            )
        for listener in list(self._listeners):
            try:
                listener(outcome)
            except Exception:  # a listener's bug must not stop reloads
                log.exception("reload listener failed")
        return outcome

    def _reload(self, trigger: str) -> ReloadOutcome:
        before = self.version.id

        def result(outcome: Outcome, message: str) -> ReloadOutcome:
            return ReloadOutcome(outcome, self.version.id, before, message, trigger)

        if self.index_dir is None:
            return result("unchanged", "this server's index was never saved to a folder; there is nothing to reload")
        for _ in range(LOAD_ATTEMPTS):
            signature = folder_signature(self.index_dir)
            if signature is None:
                time.sleep(MISSING_GRACE_S)
                signature = folder_signature(self.index_dir)
            self._seen_signature = signature
            if signature is None:
                return self._refuse(
                    result(
                        "refused",
                        f"{self.index_dir / META_FILE} is missing (the folder was "
                        "deleted, or is not a complete index folder)",
                    )
                )
            if signature == self._served_signature:
                self.stale = None
                return result("unchanged", f"the folder still holds version {before}")
            try:
                searcher = self._open()
            except Exception as exc:
                if folder_signature(self.index_dir) != signature:
                    continue  # republished again while it was read: read the newer copy
                if not _expected(exc):
                    log.exception("loading the republished index %s failed", self.index_dir)
                return self._refuse(result("refused", one_line(str(exc)) or type(exc).__name__))
            if folder_signature(self.index_dir) != signature:
                continue
            version = version_of(searcher.meta)
            if version.id == before:  # the same files published again (or only touched)
                self._served_signature, self.stale = signature, None
                return result("unchanged", f"the folder holds version {before} again")
            try:
                _warm_up(searcher)
            except Exception as exc:
                log.exception("the warm-up search on the republished index %s failed", self.index_dir)
                return self._refuse(result("refused", f"its warm-up search failed: {one_line(str(exc))}"))
            self._swap(ServedIndex(version, searcher), signature)
            return result("reloaded", f"now serving version {version.id} ({version.n_items:,} items)")
        return self._refuse(
            result("refused", "the folder kept changing while it was being loaded; it is loaded when it stops changing")
        )

    def _refuse(self, outcome: ReloadOutcome) -> ReloadOutcome:
        self.stale = outcome
        return outcome

    def _open(self) -> Any:
        """The folder as a Searcher with the served embedder (checked against the index), fully verified."""
        from retrieval.search.searcher import Searcher

        assert self.index_dir is not None
        served = self.current.searcher
        return Searcher.open(
            self.index_dir, served.backend, served.device, verify_checksums=True, data_root=self.data_root
        )

    def _swap(self, new: ServedIndex, signature: Signature | None) -> None:
        old = weakref.ref(self.current.searcher)
        self.current = new  # the next batch takes it; batches in flight keep theirs
        self._served_signature, self.stale = signature, None
        self.released = threading.Event()
        threading.Thread(target=self._release, args=(old, self.released), name="index-release", daemon=True).start()

    def _release(self, old: weakref.ref[Any], done: threading.Event) -> None:
        self.release_ok = release_memory(old)
        if not self.release_ok:
            log.warning(
                "the previous index version is still referenced %.0f s after the swap; its memory is not returned",
                RELEASE_WAIT_S,
            )
        done.set()

    # -- watching ---------------------------------------------------------------------------------------
    def start_watching(self, interval_s: float = DEFAULT_WATCH_INTERVAL_S) -> None:
        """Poll the folder every `interval_s` on a daemon thread and reload when it changes."""
        if self.index_dir is None or self.watching:
            return
        self.watch_interval = float(interval_s)
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        assert self.index_dir is not None
        while not self._stop.wait(self.watch_interval):
            try:
                if folder_signature(self.index_dir) != self._seen_signature:
                    self.reload("watch")
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("watching %s failed; still watching", self.index_dir)

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None


def _expected(exc: BaseException) -> bool:
    """A refusal the operator fixes (corrupt or mismatched folder), not a bug: logged without a traceback."""
    from retrieval.errors import UserError

    return isinstance(exc, (UserError, OSError, ValueError))


def _warm_up(searcher: Any) -> None:
    """One search on the new version before it serves (moves it to the search device, builds lazy state)."""
    size = int(searcher.meta.embedding_size)
    probe = np.full((1, size), 1.0 / np.sqrt(max(size, 1)), dtype=np.float32)
    searcher.search_embeddings(probe, 1)
    searcher.attribute_values  # noqa: B018 (computed once, on this thread, not in the first request)


def release_memory(old: weakref.ref[Any], wait_s: float = RELEASE_WAIT_S) -> bool:
    """Wait until nothing holds the old version's Searcher (its last batch finished), then hand freed memory
    back; False when something still holds it after `wait_s`.

    A full garbage collection holds the interpreter lock for a while on a server's large heap (every
    request waits), so it runs only when the version outlives its batches (a reference cycle)."""
    started = time.monotonic()
    collected = False
    while old() is not None and time.monotonic() - started < wait_s:
        time.sleep(0.02)
        if not collected and time.monotonic() - started > COLLECT_AFTER_S:
            gc.collect()
            collected = True
    _malloc_trim()
    return old() is None


def _malloc_trim() -> None:
    """glibc keeps freed heap pages of a dropped index mapped; malloc_trim(0) returns them (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
