"""The index-type registry: every registered type keeps the contract build, search, calibration, removal and
shard merging rely on, and every declared knob is a config field, an index parameter and a flag. A new type
registered in retrieval.index.types (or a new knob in retrieval.index.knobs) is checked here without new code."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import faiss
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.cli.index_options import with_knob_options
from retrieval.index.config import IndexConfig
from retrieval.index.errors import IndexBuildError
from retrieval.index.faiss_index import build_faiss_index, exact_vectors, remove_from_index, resolve_params, search
from retrieval.index.knobs import INDEX_KNOBS, Knob, KnobValues, knob_fields, knob_values
from retrieval.index.shards import merge_shards
from retrieval.index.types import INDEX_TYPES, IndexParams, IndexType, index_type

N, D = 3_000, 16
SMALL = dict(nlist=16, nprobe=16, pq_m=4, pq_nbits=6, hnsw_m=8, ef_search=64, use_gpu=False)
# every registered type with SMALL, and the IVF variants its knobs make: an HNSW coarse quantizer, an OPQ rotation
VARIANTS = [(kind, {}) for kind in INDEX_TYPES.values()] + [
    (INDEX_TYPES["ivf-flat"], dict(coarse_hnsw_m=8)),
    (INDEX_TYPES["ivf-fastscan"], dict(opq=1, coarse_hnsw_m=8)),
]
VARIANT_IDS = [kind.name + "".join(f"-{k}{v}" for k, v in extra.items()) for kind, extra in VARIANTS]


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, D))
    x = centres[np.arange(n) % 30] + 0.5 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(N, 0)


@pytest.mark.parametrize("kind, extra", VARIANTS, ids=VARIANT_IDS)
def test_every_registered_type_builds_searches_and_declares_what_it_can_do(kind: IndexType, extra: dict, gallery):
    params = resolve_params(IndexConfig(index_type=kind.name, **SMALL, **extra), N, D)
    for field, value in extra.items():
        assert getattr(params, field) == value
    assert ("_HNSW8," in params.factory_string()) == ("coarse_hnsw_m" in extra)
    assert params.factory_string().startswith("OPQ4,") == ("opq" in extra)
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


@pytest.mark.parametrize("kind, extra", VARIANTS, ids=VARIANT_IDS)
def test_shards_of_every_type_merge_into_one_index_or_are_refused(kind: IndexType, extra: dict, gallery):
    params = resolve_params(IndexConfig(index_type=kind.name, **SMALL, **extra), N, D)
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


# -- the knobs: declared once in retrieval.index.knobs, read by IndexConfig, IndexParams and the flags ---------

# A valid, non-default value of every knob that has a flag, for 700 vectors of size 16 (ivf-pq with 4-bit codes
# trains on 39 x 16 = 624 of them). A new knob needs a value here.
KNOB_VALUES = dict(nlist=4, nprobe=3, coarse_hnsw_m=8, pq_m=4, pq_nbits=4, opq=1, hnsw_m=6, ef_construction=20,
                   ef_search=24, refine_factor=2)


def _index_options() -> dict:
    command = typer.main.get_command(app).commands["index"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_every_knob_is_an_index_config_field_an_index_params_field_and_a_flag_with_its_declared_default():
    options = _index_options()
    config_fields = {f.name: f for f in dataclasses.fields(IndexConfig)}
    params_fields = {f.name: f for f in dataclasses.fields(IndexParams)}
    for knob in INDEX_KNOBS.values():
        assert config_fields[knob.field].default == knob.default, knob.field
        assert params_fields[knob.field].default == 0, knob.field  # 0 = the type does not use it
        if not knob.cli:
            assert knob.field not in options, f"{knob.field} is declared without a flag"
            continue
        option = options[knob.field]
        assert option.opts == [knob.flag] and option.help == knob.help
        # a calibrated knob left out lets calibration choose; the others default to IndexConfig's value
        assert option.default == (None if knob.calibrated else knob.default)
        assert (option.min, option.max) == (knob.minimum, knob.maximum)
    assert set(KNOB_VALUES) == {k.field for k in INDEX_KNOBS.values() if k.cli}
    # the flags users and the README name
    for flag in ("--nlist", "--nprobe", "--pq-m", "--pq-nbits", "--hnsw-m", "--ef-construction", "--ef-search",
                 "--refine-factor", "--coarse-hnsw-m", "--opq"):
        assert any(flag in p.opts for p in options.values()), flag


def test_the_knob_attributes_type_checkers_see_are_exactly_the_declared_knobs():
    declared = {k.field: k.value_type for k in INDEX_KNOBS.values()}
    assert KnobValues.__annotations__ == {name: "int" for name in declared}  # names, order; `from __future__` strings
    assert set(declared.values()) == {int}
    assert not dataclasses.is_dataclass(KnobValues)  # it adds no field: knob_fields does
    assert [f.name for f in dataclasses.fields(IndexParams)] == ["index_type", *declared]
    assert IndexParams("ivf-flat", **knob_values(nlist=8)).nlist == 8
    with pytest.raises(TypeError, match="unknown index knobs"):
        knob_values(nlsit=8)


def test_every_type_names_declared_knobs_and_its_search_knob_among_them():
    for kind in INDEX_TYPES.values():
        assert set(kind.knobs) <= set(INDEX_KNOBS), kind.name
        assert kind.knob is None or kind.knob.field in kind.knobs, kind.name
        assert kind.knob is None or kind.knob.calibrated, "calibration sweeps the type's search knob"


@pytest.mark.parametrize("kind", list(INDEX_TYPES.values()), ids=list(INDEX_TYPES))
def test_each_flag_of_a_type_reaches_its_index_and_the_others_stay_unused(kind: IndexType, tmp_path):
    """Through the command line: the values given for the knobs a type declares are the ones its index is built
    and searched with (a given --nprobe / --ef-search is kept, not calibrated); the other knobs stay 0."""
    np.save(tmp_path / "emb.npy", clustered(700, 1))
    flags = [arg for field, value in KNOB_VALUES.items() for arg in (INDEX_KNOBS[field].flag, str(value))]
    res = CliRunner().invoke(app, ["index", "--from-embeddings", str(tmp_path / "emb.npy"), "--out",
                                   str(tmp_path / "idx"), "--index-type", kind.name, "--no-gpu",
                                   "--calibration-queries", "50", *flags])
    assert res.exit_code == 0, res.output
    params = json.loads((tmp_path / "idx" / "meta.json").read_text())["index_params"]
    assert params["index_type"] == kind.name
    for field in INDEX_KNOBS:
        expected = KNOB_VALUES.get(field, params[field]) if field in kind.knobs else 0
        assert params[field] == expected, field


def test_a_new_knob_needs_only_its_declaration(monkeypatch):
    """A knob added to INDEX_KNOBS becomes a field of classes generated with knob_fields and a flag of a command
    decorated with with_knob_options, whose value reaches the command."""
    monkeypatch.setitem(INDEX_KNOBS, "beam", Knob("beam", 7, "A new search width.", minimum=1))

    @dataclasses.dataclass
    @knob_fields(lambda knob: knob.default, after="name")
    class Settings:
        name: str = "x"

    assert Settings().beam == 7 and Settings(beam=9).beam == 9  # type: ignore[attr-defined]
    seen: dict = {}
    demo = typer.Typer()

    @demo.command()
    @with_knob_options(after="name")
    def run(name: str = typer.Option("x", "--name"), knobs: Optional[dict] = None) -> None:
        seen.update(knobs or {})

    assert CliRunner().invoke(demo, ["--beam", "9", "--nlist", "5"]).exit_code == 0
    assert seen["beam"] == 9 and seen["nlist"] == 5 and seen["nprobe"] is None
    res = CliRunner().invoke(demo, ["--beam", "0"])
    assert res.exit_code == 2  # the declared range is the flag's
