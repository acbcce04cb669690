"""Build-time recall calibration: the chosen search setting is the smallest that reaches the target (checked
against a NumPy brute-force sweep), survives save/load, yields to --nprobe / --ef-search, and auto builds
flat when no approximate setting is worth it. Small synthetic vectors only."""

from __future__ import annotations

import dataclasses
import json

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.index.calibrate import (
    _search_without_self,
    REFINE_EXTENSION,
    REFINE_LADDER,
    Candidate,
    build_calibrated,
    choose_fastest,
    calibrate,
    override_search_params,
    sample_queries,
    search_setting_text,
)
from retrieval.cli import app
from retrieval.config import CalibrationConfig
from retrieval.index.config import IndexConfig
from retrieval.index.faiss_index import build_faiss_index, configure_search, read_index, resolve_params
from retrieval.index.folder import GalleryIndex, ItemTable
from retrieval.index.meta import IndexMeta
from retrieval.index.types import INDEX_TYPES, IndexParams, IndexType


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_classes: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_classes, d)))
    labels = rng.integers(0, n_classes, n)
    return _unit(centres[labels] + spread * rng.standard_normal((n, d)) / np.sqrt(d)), labels


def isotropic(n: int, d: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def exact_top_k(g: np.ndarray, q: np.ndarray, k: int, own: np.ndarray | None) -> np.ndarray:
    """NumPy float64 brute force: top-k gallery rows of each query, its own row (if any) excluded."""
    scores = q.astype(np.float64) @ g.astype(np.float64).T
    if own is not None:
        scores[np.arange(len(q)), own] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_without_self(index: faiss.Index, q: np.ndarray, own: np.ndarray | None, exact: np.ndarray) -> float:
    k = exact.shape[1]
    _, ids = index.search(q, k + 1)
    rows = []
    for i, row in enumerate(ids):
        row = [int(v) for v in row if own is None or v != own[i]][:k]
        rows.append(len(set(row) & set(exact[i].tolist())) / k)
    return float(np.mean(rows))


def test_ivf_calibration_picks_the_smallest_nprobe_reaching_the_target_as_a_brute_force_sweep():
    g, _ = clustered(6_000, 32, 60, seed=3, spread=1.0)
    params = resolve_params(IndexConfig(index_type="ivf-flat"), len(g), 32)
    built = build_faiss_index(g, params, use_gpu=False)
    cfg = CalibrationConfig(target_recall=0.9, k=10, queries=300, seed=7)
    chosen, cal = calibrate(built.index, params, g, cfg, use_gpu=False)
    applied = faiss.extract_index_ivf(built.index).nprobe  # the choice is applied to the index itself

    rows = sample_queries(len(g), 300, 7)
    exact = exact_top_k(g, g[rows], 10, rows)
    sweep = {}
    for nprobe in [1, 2, 4, 8, 16, 32, 64, 128, params.nlist]:
        configure_search(built.index, dataclasses.replace(params, nprobe=min(nprobe, params.nlist)))
        sweep[min(nprobe, params.nlist)] = recall_without_self(built.index, g[rows], rows, exact)
    smallest = min(p for p, r in sweep.items() if r >= 0.9)
    assert chosen.nprobe == smallest == cal.chosen["nprobe"]
    assert cal.reached and cal.recall == pytest.approx(sweep[smallest], abs=1e-4)
    for point in cal.curve:  # every measured point agrees with the brute-force sweep
        assert point.recall == pytest.approx(sweep[point.setting["nprobe"]], abs=1e-4)
    assert all(p.recall < 0.9 for p in cal.curve[:-1]) and cal.curve[-1].setting == {"nprobe": smallest}
    assert applied == smallest
    assert smallest > 1  # the data is hard enough that the choice matters


def test_hnsw_calibration_uses_held_out_vectors_and_matches_a_brute_force_sweep():
    g, _ = clustered(3_000, 32, 30, seed=1, spread=1.2)
    held = g[2_700:]
    params = resolve_params(IndexConfig(index_type="hnsw", hnsw_m=4, ef_construction=8), 2_700, 32)
    built = build_faiss_index(g[:2_700], params, use_gpu=False)
    chosen, cal = calibrate(built.index, params, g[:2_700], CalibrationConfig(target_recall=0.9, queries=300),
                            use_gpu=False, holdout=held)
    exact = exact_top_k(g[:2_700], held, 10, None)
    sweep = {}
    for point in cal.curve:
        ef = point.setting["ef_search"]
        configure_search(built.index, dataclasses.replace(params, ef_search=ef))
        sweep[ef] = recall_without_self(built.index, held, None, exact)
        assert point.recall == pytest.approx(sweep[ef], abs=1e-4)
    smallest = min(ef for ef, r in sweep.items() if r >= 0.9)
    assert cal.reached and chosen.ef_search == smallest and cal.held_out
    assert smallest > 16  # a weak graph (M=4) needs a wider beam than the first rung


def _calibrated_refined(g: np.ndarray, cfg: IndexConfig):
    """Build and calibrate (target Recall@10 0.9, 200 gallery queries) a refined index over `g`; also return
    rec(nprobe, refine factor): the same queries' recall at that setting, measured directly."""
    params = resolve_params(cfg, len(g), g.shape[1])
    built = build_faiss_index(g, params, use_gpu=False)
    chosen, cal = calibrate(built.index, params, g, CalibrationConfig(target_recall=0.9, queries=200, seed=3),
                            use_gpu=False)
    rows = sample_queries(len(g), 200, 3)
    exact = exact_top_k(g, g[rows], 10, rows)

    def rec(nprobe: int, rf: int) -> float:
        configure_search(built.index, dataclasses.replace(params, nprobe=nprobe, refine_factor=rf))
        return recall_without_self(built.index, g[rows], rows, exact)

    return chosen, cal, rec


def test_ivf_pq_refine_calibration_takes_the_smallest_nprobe_then_the_smallest_factor():
    g, _ = clustered(3_000, 16, 40, seed=2, spread=1.0)
    chosen, cal, rec = _calibrated_refined(g, IndexConfig(index_type="ivf-pq", pq_m=4, pq_nbits=6, refine_factor=4))
    assert cal.reached and rec(chosen.nprobe, chosen.refine_factor) >= 0.9
    smaller = [p for p in (1, 2, 4, 8, 16, 32, 64) if p < chosen.nprobe]
    assert all(rec(p, REFINE_LADDER[-1]) < 0.9 for p in smaller)
    assert all(rec(chosen.nprobe, rf) < 0.9 for rf in REFINE_LADDER if rf < chosen.refine_factor)
    assert all(p.setting["refine_factor"] <= REFINE_LADDER[-1] for p in cal.curve)  # no larger re-ranking needed


def test_refine_factors_past_the_ladder_are_tried_only_when_its_largest_misses_the_target():
    """Codes far too coarse for structureless data (one 2-bit sub-quantizer): re-ranking 10 x 64 candidates misses
    the target at every nprobe, so calibration tries the larger factors and keeps the smallest that reaches it."""
    g = np.random.default_rng(2).standard_normal((3_000, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cfg = IndexConfig(index_type="ivf-pq", nlist=8, pq_m=1, pq_nbits=2, refine_factor=4)
    chosen, cal, rec = _calibrated_refined(g, cfg)
    largest_nprobe = max(p.setting["nprobe"] for p in cal.curve)
    assert rec(largest_nprobe, REFINE_LADDER[-1]) < 0.9  # the usual factors could not reach it
    assert cal.reached and chosen.refine_factor in REFINE_EXTENSION
    assert rec(chosen.nprobe, chosen.refine_factor) >= 0.9
    assert all(rec(chosen.nprobe, rf) < 0.9 for rf in REFINE_EXTENSION if rf < chosen.refine_factor)


def test_queries_the_index_does_not_hold_keep_their_results_when_the_index_returns_fewer_than_asked():
    """Held-out queries (row -1) drop only their (k+1)-th result, also when the index pads with -1 (an IVF
    probing one small list; a Milvus collection whose stale rows are left out): the padding is not a self-match."""
    g = np.random.default_rng(4).standard_normal((60, 8)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 16, faiss.METRIC_INNER_PRODUCT)
    index.train(g)
    index.add(g)
    index.nprobe = 1
    queries = g[:10] + 0.01
    ids, _ = _search_without_self(index, queries, np.full(10, -1, np.int64), 10)
    raw = index.search(queries, 11)[1]
    assert (raw == -1).any(axis=1).sum() >= 3  # some queries' lists hold fewer than 11 rows
    np.testing.assert_array_equal(ids, raw[:, :10])


def _gallery_index(result, g: np.ndarray, labels: np.ndarray) -> GalleryIndex:
    items = ItemTable([f"/img/{i}.jpg" for i in range(len(g))], [int(v) for v in labels], [str(v) for v in labels])
    meta = IndexMeta(fingerprint="fp", protocol="all-vs-all", dataset="synthetic", **result.meta())
    return GalleryIndex(result.built.index, result.built.params, items, meta, None, None, use_gpu=False)


def test_chosen_setting_survives_save_load_and_explicit_flags_override_it(tmp_path):
    g, labels = clustered(5_000, 32, 50, seed=4, spread=1.0)
    result = build_calibrated(g, IndexConfig(index_type="ivf-flat", use_gpu=False),
                              CalibrationConfig(target_recall=0.95, queries=300))
    chosen = result.calibration.chosen["nprobe"]
    assert chosen != IndexConfig().nprobe or chosen == result.built.params.nprobe
    gi = _gallery_index(result, g, labels)
    before = gi.search(g[:50], 10)
    gi.save(tmp_path / "idx")

    assert faiss.extract_index_ivf(read_index(tmp_path / "idx" / "index.faiss")).nprobe == chosen
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["index_params"]["nprobe"] == chosen and meta["calibration"]["chosen"] == {"nprobe": chosen}
    assert meta["calibration"]["recall"] >= 0.95 and len(meta["calibration"]["curve"]) >= 1
    loaded = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    assert loaded.params.nprobe == chosen
    np.testing.assert_array_equal(loaded.search(g[:50], 10)[1], before[1])
    assert f"nprobe {chosen} (calibrated on 300" in search_setting_text(loaded.meta, loaded.params)
    # the UI's facts table row shows the recorded setting (search_setting_text of the index metadata)
    assert search_setting_text(loaded.meta).startswith(f"nprobe {chosen} (calibrated on 300 gallery vectors")

    # --nprobe 1 at search time: the same results as the index configured by hand with nprobe 1
    loaded.set_search_params(override_search_params(loaded.params, nprobe=1))
    reference = GalleryIndex.load(tmp_path / "idx", use_gpu=False)
    configure_search(reference.index, dataclasses.replace(reference.params, nprobe=1))
    np.testing.assert_array_equal(loaded.search(g[:50], 10)[1], reference.index.search(g[:50], 10)[1])
    assert "nprobe 1 (given for this search" in search_setting_text(loaded.meta, loaded.params)
    with pytest.raises(ValueError, match="--ef-search applies to HNSW"):
        override_search_params(loaded.params, ef_search=64)
    with pytest.raises(ValueError, match="--nprobe must be in 1"):
        override_search_params(loaded.params, nprobe=10**6)

    # the command line: evaluate uses the calibrated setting unless --nprobe is given
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--index", str(tmp_path / "idx"), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    default = json.loads(res.output)
    assert default["search_params"]["nprobe"] == chosen and default["calibration"]["chosen"] == {"nprobe": chosen}
    res = runner.invoke(app, ["evaluate", "--index", str(tmp_path / "idx"), "--json", "--device", "cpu", "--nprobe", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["search_params"]["nprobe"] == 1
    res = runner.invoke(app, ["evaluate", "--index", str(tmp_path / "idx"), "--device", "cpu", "--ef-search", "8"])
    assert res.exit_code == 2 and "--ef-search applies to HNSW" in " ".join(res.output.split())


def test_auto_builds_flat_when_no_approximate_setting_is_faster_at_the_target(monkeypatch):
    import retrieval.index.calibrate as calibrate

    # The decision compares measured speeds. Exact search is reported 1000x faster than measured, so the outcome
    # cannot flip with this machine's load (on isotropic data IVF rarely wins anyway).
    measured = calibrate.exact_neighbours

    def fast_exact(*args, **kwargs):
        ids, flat_qps, device = measured(*args, **kwargs)
        return ids, flat_qps * 1000, device

    monkeypatch.setattr(calibrate, "exact_neighbours", fast_exact)
    g = isotropic(6_000, 32, seed=5)  # no structure: IVF needs most lists for 0.95, never worth it
    cfg = IndexConfig(index_type="auto", flat_max_items=1_000, use_gpu=False)
    result = build_calibrated(g, cfg, CalibrationConfig(queries=300))
    assert result.built.params.exact and result.calibration is None
    assert result.decision.startswith("auto built flat (exact search): no candidate reaches Recall@10 0.95 at >= "
                                      "1.5x the speed of exact search")
    assert result.rejected is not None and not result.rejected.applied
    assert result.meta()["index_decision"] == result.decision
    # every candidate was measured and recorded: speed, recall and memory of each
    assert [c["name"] for c in result.meta()["auto_candidates"]] == ["ivf-flat", "ivf-fastscan", "hnsw"]
    assert all(c["measured"] and c["memory_bytes"] > 0 and c["flat_qps"] > 0 for c in result.meta()["auto_candidates"])
    assert result.built.index.ntotal == len(g)
    meta = IndexMeta(index_params=IndexParams("flat"), **result.meta())
    assert "auto built flat" in search_setting_text(meta)


def test_memory_forced_approximate_index_keeps_its_best_setting_and_says_what_it_reached():
    g = isotropic(3_000, 32, seed=6)
    cfg = IndexConfig(index_type="auto", memory_budget_gb=1e-4, pq_m=4, pq_nbits=6, use_gpu=False)
    result = build_calibrated(g, cfg, CalibrationConfig(queries=300))
    cal = result.calibration
    assert result.built.params.index_type == "ivf-pq" and cal is not None and not cal.reached
    assert cal.recall == max(p.recall for p in cal.curve) < 0.95
    assert f"reaches at most Recall@10 {cal.recall:.3f}" in result.decision and "memory budget" in result.decision
    assert result.built.params.nprobe == cal.chosen["nprobe"]


def test_fixed_setting_is_measured_not_swept_and_zero_target_skips_calibration():
    g, _ = clustered(3_000, 16, 30, seed=8, spread=1.0)
    cfg = IndexConfig(index_type="ivf-flat", nprobe=3, use_gpu=False)
    fixed = build_calibrated(g, cfg, CalibrationConfig(queries=200, sweep=False))
    assert fixed.built.params.nprobe == 3 and not fixed.calibration.swept
    assert [p.setting for p in fixed.calibration.curve] == [{"nprobe": 3}]
    off = build_calibrated(g, cfg, CalibrationConfig(target_recall=0.0))
    assert off.calibration is None and off.built.params.nprobe == 3


# -- auto: the decision from measured speeds, and a build that records what it measured --------------------

GB = 1024**3


def _measured(name: str, speedup: float, recall: float, memory_gb: float = 1.0) -> Candidate:
    return Candidate(name, int(memory_gb * GB), factory=name, recall=recall, qps=100.0 * speedup, flat_qps=100.0,
                     reached=recall >= 0.95, sample=1_000)


def test_auto_picks_the_fastest_candidate_that_meets_the_target_within_the_memory_budget():
    fast_but_low = _measured("ivf-pq", 40.0, 0.90)
    fastscan, ivf, hnsw = _measured("ivf-fastscan", 20.0, 0.96), _measured("ivf-flat", 8.0, 0.97), _measured("hnsw", 12.0, 0.95)
    name, why = choose_fastest([ivf, fastscan, hnsw, fast_but_low], flat_memory=2 * GB, budget=4 * GB, target=0.95)
    assert name == "ivf-fastscan" and why.startswith("auto chose ivf-fastscan: the fastest index reaching Recall@10")
    assert "20.0x" in why and "hnsw 12.0x" in why  # the winner's speed, and what else was measured
    # the fastest needs more memory than the budget: the next fastest
    big = _measured("ivf-fastscan", 20.0, 0.96, memory_gb=5.0)
    assert choose_fastest([ivf, big, hnsw], 2 * GB, 4 * GB, 0.95)[0] == "hnsw"
    # a candidate that is not measured (time cap, memory) is never chosen
    skipped = Candidate("ivf-fastscan", GB, measured=False, note="skipped")
    assert choose_fastest([ivf, skipped], 2 * GB, 4 * GB, 0.95)[0] == "ivf-flat"


def test_auto_keeps_flat_when_nothing_is_clearly_faster_at_the_target_and_says_so():
    slow = [_measured("ivf-flat", 1.2, 0.96), _measured("hnsw", 0.4, 0.97), _measured("ivf-fastscan", 3.0, 0.80)]
    name, why = choose_fastest(slow, flat_memory=GB, budget=4 * GB, target=0.95)
    assert name == "flat"
    assert why.startswith("auto built flat (exact search): no candidate reaches Recall@10 0.95 at >= 1.5x")
    assert "best measured: ivf-flat Recall@10 0.960 at 1.2x" in why
    assert choose_fastest([], flat_memory=GB, budget=4 * GB, target=0.95)[0] == "flat"


def test_when_flat_exceeds_the_budget_auto_takes_the_fastest_fitting_or_else_the_closest_recall():
    fitting = [_measured("ivf-pq", 9.0, 0.96, 0.5), _measured("ivf-fastscan", 30.0, 0.97, 3.0)]
    name, why = choose_fastest(fitting, flat_memory=8 * GB, budget=1 * GB, target=0.95)
    assert name == "ivf-pq" and "flat exceeds the memory budget of 1 GB" in why
    missing = [_measured("ivf-pq", 9.0, 0.80, 0.5), _measured("hnsw", 2.0, 0.85, 0.9)]
    name, why = choose_fastest(missing, flat_memory=8 * GB, budget=1 * GB, target=0.95)
    assert name == "hnsw" and "came closest (0.850)" in why
    too_big = [Candidate("ivf-flat", 9 * GB, measured=False), Candidate("ivf-pq", 2 * GB, measured=False)]
    assert choose_fastest(too_big, flat_memory=8 * GB, budget=1 * GB, target=0.95)[0] == "ivf-pq"


def test_auto_builds_what_its_recorded_measurements_choose(tmp_path):
    from retrieval.index.calibrate import choose_fastest as decide

    g, _ = clustered(4_000, 32, 40, seed=11, spread=1.0)
    cfg = IndexConfig(index_type="auto", flat_max_items=1_000, use_gpu=False)
    result = build_calibrated(g, cfg, CalibrationConfig(queries=200))
    recorded = [Candidate(**{k: v for k, v in c.items() if k != "speedup"}) for c in result.meta()["auto_candidates"]]
    choice, why = decide(recorded, 4_000 * 32 * 4, int(cfg.memory_budget_gb * GB), 0.95)
    assert result.built.params.index_type == choice and result.decision.startswith(why)
    assert result.built.index.ntotal == len(g)
    assert {c.name for c in recorded} == {"ivf-flat", "ivf-fastscan", "hnsw"}
    fastscan = next(c for c in recorded if c.name == "ivf-fastscan")
    assert fastscan.factory == "IVF102,PQ8x4fs,RFlat" and "refine_factor" in fastscan.setting  # 8 sub-codes divide 32


APPROXIMATE = [kind for kind in INDEX_TYPES.values() if not kind.exact]


@pytest.mark.parametrize("kind", APPROXIMATE, ids=[k.name for k in APPROXIMATE])
def test_recall_on_held_out_queries_is_within_002_of_what_calibration_measured(kind: IndexType):
    """The recall a build promises (measured on gallery vectors, or held-out ones for graphs) is what new queries
    of the same distribution get."""
    points, _ = clustered(6_000, 32, 50, seed=12, spread=1.0)
    g, queries = points[:5_000], points[5_000:]  # queries: new points of the same distribution
    cfg = IndexConfig(index_type=kind.name, pq_m=8, pq_nbits=4, refine_factor=8 if kind.name == "ivf-pq" else 0,
                      hnsw_m=8, use_gpu=False)
    result = build_calibrated(g, cfg, CalibrationConfig(target_recall=0.9, queries=1_000, seed=1))
    cal = result.calibration
    assert cal is not None and cal.reached
    exact = exact_top_k(g, queries, 10, None)
    held_out = recall_without_self(result.built.index, queries, None, exact)
    assert abs(held_out - cal.recall) <= 0.02, (kind.name, held_out, cal.recall)
