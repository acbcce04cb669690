"""The Milvus store against Milvus standalone (2.3.5: the Go server a deployment runs, all nodes in one process).

Milvus Lite (test_milvus_store.py) is the issue's test server, but not the server users deploy. Standalone
differs where the store depends on it: it deletes from and counts only loaded collections, a Strong read waits for
its next time tick, and it builds IVF_PQ, which Lite refuses. The add-and-remove test runs here again with the same
assertions, plus IVF_PQ calibration, a rebuild into an existing collection and hostile filter values; the server
comes from .venv-milvus (`make test` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval.config import CalibrationConfig
from retrieval.index.meta import read_meta
from retrieval.index.milvus_filters import where_expression
from retrieval.index.milvus_store import MilvusStoreRecord, connect
from retrieval.search.searcher import Searcher
from tests.milvus_server import run_standalone, standalone_command
from tests.test_milvus_store import (  # noqa: F401  (the shared test runs here against standalone)
    HOSTILE,
    clustered,
    milvus_folder,
    test_add_and_remove_write_through_and_a_running_server_reloads,
)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not standalone_command().exists():
        pytest.skip(f"no Milvus standalone at {standalone_command()} (`make test` installs it)")
    yield from run_standalone(tmp_path_factory.mktemp("milvus-standalone") / "data")


def test_ivf_pq_calibrates_then_hnsw_rebuilt_into_its_collection_ignores_the_rows_left_from_it(
    milvus_uri: str, tmp_path: Path
):
    """IVF_PQ (which Milvus Lite refuses) is built and calibrated; HNSW is then built into the same collection: it
    holds its calibration rows out of the graph and upserts them after calibrating, so the IVF_PQ build's copies of
    those rows must not answer its calibration. Filters with hostile values go through standalone's parser."""
    g, labels = clustered(2000, 16, 20, seed=3)
    categories = [HOSTILE[i % len(HOSTILE)] for i in range(len(g))]
    for index_type, milvus_type, knobs in (("ivf-pq", "IVF_PQ", {"pq_m": 16, "pq_nbits": 4}), ("hnsw", "HNSW", {})):
        out = tmp_path / index_type
        milvus_folder(milvus_uri, out, g, labels, categories, "calibrated", index_type,
                      CalibrationConfig(target_recall=0.9, queries=100), **knobs)
        cal = read_meta(out / "meta.json").calibration
        assert cal is not None and cal["curve"] and cal["index_type"] == index_type, index_type
        client = connect(MilvusStoreRecord(milvus_uri, "calibrated"))
        assert client.describe_index("calibrated", "vector")["index_type"] == milvus_type
        searcher = Searcher.open(out, device="cpu")
        assert len(searcher.index) == len(g)
        queries = np.arange(0, len(g), 10)
        _, ids = searcher.index.search(g[queries], 11)
        assert all(len(set(row.tolist())) == 11 for row in ids), "an item came back twice"
        # what calibration recorded is what the built index gives (Recall@10 without the query itself)
        exact = np.argsort(-(g[queries] @ g.T), axis=1, kind="stable")[:, 1:11]
        found = [set(row.tolist()) - {q} for row, q in zip(ids, queries)]
        recall = np.mean([len(f & set(e.tolist())) / 10 for f, e in zip(found, exact)])
        assert abs(recall - cal["recall"]) <= 0.05, (index_type, recall, cal["recall"])
        assert cal["reached"] == (cal["recall"] >= 0.9)
    assert cal["reached"]  # HNSW reaches the target (4-bit PQ codes on 16-d data need not)

    for value in HOSTILE:
        _, ids = searcher.search_raw(g[[3, 50]], 5, where={"category": value})
        assert (ids >= 0).all() and all(categories[i] == value for i in ids.ravel()), value
    attack = {"category": frozenset({'nothing" or attributes["category"] != "'})}
    assert (searcher.index.index.search(g[[3]], 5, where_expression(attack))[1] == -1).all()
