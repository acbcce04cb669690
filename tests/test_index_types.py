"""The index-type registry: every registered type keeps the contract build, search, calibration, removal and
shard merging rely on. A new type registered in retrieval.index.types is checked here without new code."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
import typer

from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.index.errors import IndexBuildError
from retrieval.index.faiss_index import build_faiss_index, exact_vectors, remove_from_index, resolve_params, search
from retrieval.index.shards import merge_shards
from retrieval.index.types import INDEX_TYPES, IndexType, index_type

N, D = 3_000, 16
SMALL = dict(nlist=16, nprobe=16, pq_m=4, pq_nbits=6, hnsw_m=8, ef_search=64, use_gpu=False)


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, D))
    x = centres[np.arange(n) % 30] + 0.5 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(N, 0)


@pytest.mark.parametrize("kind", list(INDEX_TYPES.values()), ids=list(INDEX_TYPES))
def test_every_registered_type_builds_searches_and_declares_what_it_can_do(kind: IndexType, gallery):
    params = resolve_params(IndexConfig(index_type=kind.name, **SMALL), N, D)
    assert params.kind is kind and params.exact == kind.exact and params.factory_string()
    assert kind.memory_bytes(N, D, IndexConfig(**SMALL)) > 0
    built = build_faiss_index(gallery, params, use_gpu=False)
    _, ids = search(built.index, gallery[:100], 5)
    assert (ids == np.arange(100)[:, None]).any(axis=1).mean() >= 0.5  # finds itself (PQ codes are lossy)

    if kind.knob is None:
        assert kind.exact and kind.ladder(params, 10, N) == []
    else:
        ladder = kind.ladder(params, 10, N)
        assert ladder == sorted(ladder) and ladder, "calibration needs values to try, cheapest first"
        cheapest = dataclasses.replace(params, **{kind.knob.field: ladder[0]})
        kind.apply_search(built.index, cheapest)  # the knob reaches FAISS without error
        kind.check_knob(params, ladder[-1])  # the calibrated values are valid overrides

    vectors = exact_vectors(built.index, params)
    assert (vectors is not None) == params.stores_exact_vectors == kind.stores_vectors
    if vectors is not None:
        np.testing.assert_allclose(vectors, gallery, atol=1e-6)

    if kind.removable:
        remove_from_index(built.index, params, np.array([0, 5]))
        assert built.index.ntotal == N - 2
    else:
        with pytest.raises(IndexBuildError, match="cannot remove items"):
            remove_from_index(built.index, params, np.array([0]))


@pytest.mark.parametrize("kind", list(INDEX_TYPES.values()), ids=list(INDEX_TYPES))
def test_shards_of_every_type_merge_into_one_index_or_are_refused(kind: IndexType, gallery):
    params = resolve_params(IndexConfig(index_type=kind.name, **SMALL), N, D)
    built = build_faiss_index(gallery, params, use_gpu=False).index
    if not kind.mergeable:
        with pytest.raises(IndexBuildError, match="cannot be merged"):
            merge_shards([built, built], params)
        return
    halves = []
    for part in (gallery[: N // 2], gallery[N // 2 :]):  # shards share one trained quantizer, as shard builds do
        shard = faiss.clone_index(built)
        shard.reset()
        shard.add(part)
        halves.append(shard)
    merged = merge_shards(halves, params)
    assert merged.ntotal == N
    _, ids = merged.search(gallery[N // 2 : N // 2 + 50], 5)
    assert (ids == np.arange(N // 2, N // 2 + 50)[:, None]).any(axis=1).mean() >= 0.5  # second shard's ids are global


def test_unknown_types_are_refused_by_the_config_listing_the_registry():
    choices = ", ".join(INDEX_TYPES)
    with pytest.raises(IndexBuildError, match=f"unknown index type 'lsh'; choose auto or one of {choices}"):
        IndexConfig(index_type="lsh")
    with pytest.raises(IndexBuildError, match="unknown index type"):
        index_type("lsh")
    assert IndexConfig(index_type="auto").index_type == "auto"


def test_the_command_line_lists_the_registered_types():
    command = typer.main.get_command(app).commands["index"]  # type: ignore[attr-defined]
    option = next(p for p in command.params if "--index-type" in p.opts)
    assert option.help == "auto | " + " | ".join(INDEX_TYPES) + "."
