"""Scale-out: Ray vs local embedding, sharded vs single-process index builds, sharded vs merged search,
and the capacity plan for 10M / 100M / 1B images computed from the rates measured here.

    python benchmarks/scale_out.py                      # everything (1M x 512 build: several minutes on 2 cores)
    python benchmarks/scale_out.py --vectors 200000     # a quicker build section
    python benchmarks/scale_out.py --json result.json   # also write every number measured
    python benchmarks/scale_out.py milvus-plan --milvus-upload-rows-per-s 3700   # the plan's Milvus column alone

1. Embedding: the same JPEGs through `retrieval embed` with the local engine (this process, all cores)
   and the Ray engine (N actors of one CPU each, Ray started beforehand and timed separately).
   images/s end to end (model load / actor start-up included) and steady state (first to last part);
   also the local engine at one thread, which shows what the default's threads give on a busy machine.
2. Index build from parts: 1M x 512 clustered unit vectors (IVF-flat), one process vs 2 shard builds
   on Ray; each build runs in a fresh process; peak memory is each process's ru_maxrss (the driver,
   and every shard worker, measured inside the worker).
3. Search: the 2-shard folder vs the merged index (same trained quantizer): queries/s at batch 256
   and batch 1, Recall@10 against exact search, identical top-10 rows.
4. Capacity plan: GPU-hours to embed, index type and memory per shard, build time and query latency
   for 10M / 100M / 1B, each derived from a rate measured above (the GPU embedding rate from a CUDA
   run of this script, or --gpu-images-per-s from such a run; see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_child(args: list[str]) -> dict:
    """Run this script in a fresh process (its own memory peak) and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, __file__, *args], env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- 1. embedding ------------------------------------------------------------------------------------


def write_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(30, 226, 3)
        noise = rng.integers(-40, 41, (size * 3 // 4, size, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"class_{i % 20:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)


def _start_ray(a: argparse.Namespace) -> float:
    """Seconds to start (or join) Ray when the engine is Ray, timed apart from the work; 0 otherwise."""
    if a.engine != "ray":
        return 0.0
    from retrieval.embed.ray_engine import RayOptions, connect

    t0 = time.perf_counter()
    connect(RayOptions(workers=a.workers))
    return time.perf_counter() - t0


def child_embed(a: argparse.Namespace) -> dict:
    """One engine over the image folder; Ray (if used) is started before the clock and reported apart."""
    from retrieval.embed.engines import embed_to_parts
    from retrieval.embed.job import EmbedOptions, source_from_images
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.embed.parts import EmbeddingsFolder
    from retrieval.embed.ray_engine import RayOptions

    ray_init = _start_ray(a)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    backend = open_embedder(EmbedderSpec.untrained(a.arch, 128, a.image_size, seed=0), "cpu")
    done_at: list[tuple[float, int]] = []
    report = embed_to_parts(a.out, source_from_images([a.image_dir]), backend,
                            EmbedOptions(part_size=a.part_size, batch_size=a.batch_size), engine=a.engine,
                            ray_options=RayOptions(workers=a.workers), progress=False,
                            on_part=lambda r: done_at.append((time.perf_counter(), r.n + r.n_bad)))
    wall = time.perf_counter() - t0
    n = sum(k for _, k in done_at)
    steady = sum(k for _, k in done_at[1:]) / max(done_at[-1][0] - done_at[0][0], 1e-9)
    emb, _ = EmbeddingsFolder.open(a.out).load_role("gallery")
    np.save(Path(a.out) / "all.npy", emb)
    return {"engine": a.engine, "images": n, "wall_s": wall, "images_per_s": n / wall, "steady_images_per_s": steady,
            "ray_init_s": ray_init, "parts": report.parts_total,
            "workers": sorted({r.worker for r in report.results})}


def measure_decode_per_core(folder: Path, n: int = 60) -> float:
    """JPEG decode + resize + crop + normalise at 224 px, one thread: images/s per CPU core."""
    from PIL import Image

    from retrieval.images import open_image
    from retrieval.preprocess import Preprocessing, preprocess_eval

    rng = np.random.default_rng(1)
    path = folder / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
    prep = Preprocessing()
    t0 = time.perf_counter()
    for _ in range(n):
        preprocess_eval(open_image(path), prep)
    return n / (time.perf_counter() - t0)


def measure_model_cpu(arch: str = "resnet50", batch: int = 8, reps: int = 2) -> float:
    """Forward passes of the production embedder (ResNet-50, 224 px, 512-d) on this CPU, all cores: images/s."""
    import torch

    from retrieval.embed.spec import EmbedderSpec, open_embedder

    backend = open_embedder(EmbedderSpec.untrained(arch, 512, 224, seed=0), "cpu")
    x = torch.randn(batch, 3, 224, 224)
    backend.embed_tensor(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        backend.embed_tensor(x)
    return batch * reps / (time.perf_counter() - t0)


def measure_model_gpu(batch: int = 256, reps: int = 20) -> float | None:
    """The same embedder on CUDA (bf16 autocast, channels_last), when a GPU is present."""
    import torch

    if not torch.cuda.is_available():
        return None
    from retrieval.embed.spec import EmbedderSpec, open_embedder

    backend = open_embedder(EmbedderSpec.untrained("resnet50", 512, 224, seed=0), "cuda")
    backend.model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    for _ in range(3):
        backend.embed_tensor(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        backend.embed_tensor(x)
    torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - t0)


# -- 2. build ----------------------------------------------------------------------------------------


def child_make_parts(a: argparse.Namespace) -> dict:
    from benchmarks.index_speed import clustered_vectors
    from retrieval.embed.job import write_arrays

    data = clustered_vectors(a.vectors, a.queries, a.dim, seed=0)
    labels = data.gallery_labels.tolist()
    write_arrays(a.out, {"gallery": (data.gallery, labels, [str(v) for v in labels])}, fingerprint="synthetic",
                 part_size=a.part_size)
    np.save(Path(a.out) / "bench_queries.npy", data.queries)
    return {"vectors": a.vectors, "bytes_on_disk": sum(p.stat().st_size for p in Path(a.out).rglob("*"))}


def child_build(a: argparse.Namespace) -> dict:
    from retrieval.config import CalibrationConfig
    from retrieval.index.config import IndexConfig
    from retrieval.embed.ray_engine import RayOptions
    from retrieval.index.sharded_build import ShardOptions, build_from_parts

    ray_init = _start_ray(a)
    cfg = IndexConfig(index_type=a.index_type, nlist=a.nlist, nprobe=a.nprobe, use_gpu=False)
    t0 = time.perf_counter()
    index, report = build_from_parts(a.parts, a.out, cfg, ShardOptions(shards=a.shards, engine=a.engine),
                                     ray_options=RayOptions(workers=a.workers), progress=False,
                                     calib=CalibrationConfig(target_recall=0))  # the same fixed nprobe for both
    wall = time.perf_counter() - t0
    files = [p for p in Path(a.out).iterdir() if p.suffix == ".faiss"]
    return {"engine": a.engine, "shards": a.shards, "wall_s": wall, "ray_init_s": ray_init,
            "train_s": report.train_seconds, "add_s": report.shard_seconds, "driver_max_rss": max_rss(),
            "workers": [r.__dict__ for r in report.shards], "index_bytes": sum(p.stat().st_size for p in files),
            "n": len(index)}


# -- 3. search ---------------------------------------------------------------------------------------


def qps(search, queries: np.ndarray, k: int, batch: int, limit: int) -> float:
    q = queries[:limit]
    search(q[:batch], k)
    t0 = time.perf_counter()
    for start in range(0, len(q), batch):
        search(q[start : start + batch], k)
    return len(q) / (time.perf_counter() - t0)


def child_search(a: argparse.Namespace) -> dict:
    import faiss

    from retrieval.index.folder import GalleryIndex
    from retrieval.embed.parts import EmbeddingsFolder

    queries = np.load(Path(a.parts) / "bench_queries.npy")
    sharded = GalleryIndex.load(a.index, use_gpu=False)
    merged_index = sharded.index.merged(sharded.params)
    flat = faiss.IndexFlatIP(sharded.embedding_size)
    gallery, _ = EmbeddingsFolder.open(a.parts).load_role("gallery", verify=False)
    flat.add(gallery)
    del gallery
    _, truth = flat.search(queries, 10)
    del flat
    out: dict = {"nprobe": sharded.params.nprobe, "nlist": sharded.params.nlist, "queries": len(queries)}
    for name, search in (("sharded", sharded.search), ("merged", merged_index.search)):
        _, ids = search(queries, 10)
        out[name] = {"qps_b256": qps(search, queries, 10, 256, len(queries)),
                     "qps_b1": qps(search, queries, 10, 1, 200),
                     "recall10": float(np.mean([len(set(r) & set(t)) / 10 for r, t in zip(ids, truth)]))}
        out[name + "_ids"] = ids
    out["identical_rows"] = float(np.mean(np.all(out.pop("sharded_ids") == out.pop("merged_ids"), axis=1)))
    # scan cost per vector for the capacity plan: batch-256 time per query / vectors scanned per query
    scanned = sharded.params.nprobe * len(sharded) / sharded.params.nlist
    out["scan_ns_per_vector"] = 1e9 / out["merged"]["qps_b256"] / scanned
    return out


def child_pq(a: argparse.Namespace) -> dict:
    """IVF-PQ on a slice of the same vectors: bytes per vector, add rate (1 thread) and scan cost per vector."""
    import faiss

    from retrieval.index.config import IndexConfig
    from retrieval.index.faiss_index import build_faiss_index, resolve_params, write_index
    from retrieval.embed.parts import EmbeddingsFolder

    faiss.omp_set_num_threads(1)
    folder = EmbeddingsFolder.open(a.parts)
    names = folder.part_names("gallery")
    vectors = np.concatenate([folder.read_part(p, verify=False)[0] for p in names[: max(1, a.pq_parts)]])
    queries = np.load(Path(a.parts) / "bench_queries.npy")
    params = resolve_params(IndexConfig(index_type="ivf-pq", nlist=a.nlist, nprobe=a.nprobe, pq_m=64), len(vectors),
                            vectors.shape[1])
    built = build_faiss_index(vectors, params, use_gpu=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_index(built.index, Path(tmp) / "pq.faiss")
        size = (Path(tmp) / "pq.faiss").stat().st_size
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rate = qps(built.index.search, queries, 10, 256, len(queries))
    return {"n": len(vectors), "bytes_per_vector": size / len(vectors), "add_per_s_1thread": len(vectors) / built.add_seconds,
            "train_s": built.train_seconds,
            "scan_ns_per_vector": 1e9 / rate / (params.nprobe * len(vectors) / params.nlist)}


# -- 4. capacity plan --------------------------------------------------------------------------------


PLAN_SIZES = (10_000_000, 100_000_000, 1_000_000_000)
IVF_FLAT_UP_TO = 10_000_000  # the plan's index rule: IVF-flat up to this many vectors, IVF-PQ64 above


def capacity_plan(m: dict, gpu_rate: float, gpu_source: str) -> list[dict]:
    """Per gallery size: embedding GPU-hours, index layout, memory per shard, build time, query latency.

    Rules (each number below is a measured rate times a count):
      embedding   GPU-hours = N / (GPU images/s); CPU cores to decode for one GPU = GPU rate / decode rate per core
      index       <= 10M: IVF-flat (measured bytes/vector); above: IVF-PQ64 (measured bytes/vector),
                  shards of at most 100M vectors, nlist = 4 sqrt(shard size) (capped at 65,536), nprobe 16
      build       add worker-hours = N x (measured add time per vector per 1-CPU worker) x nlist / nlist measured
                  (the brute-force coarse assignment dominates and grows linearly with nlist); parts are spread
                  over as many shard workers as there are CPUs, so wall time = worker-hours / workers
      latency     coarse search (nlist x D multiply-adds at the measured flat rate) + nprobe x shard/nlist vectors
                  x measured scan cost per vector; shards in parallel, so the slowest shard sets it
    """
    plan = []
    flat_bpv, pq_bpv = m["ivf_flat_bytes_per_vector"], m["pq"]["bytes_per_vector"]
    add_flat = m["add_s_per_vector_1024"]  # seconds per vector per worker at nlist 1024 (ivf-flat)
    add_pq = 1.0 / m["pq"]["add_per_s_1thread"] * (1024 / m["nlist"])  # per vector per thread, at nlist 1024
    coarse_ns_per_centroid = m["coarse_ns_per_centroid"]
    for n in PLAN_SIZES:
        pq = n > IVF_FLAT_UP_TO
        shards = max(1, math.ceil(n / 100_000_000)) if pq else 1
        per_shard = n / shards
        nlist = int(min(65_536, round(4 * math.sqrt(per_shard))))
        bpv = pq_bpv if pq else flat_bpv
        add_s = n * (add_pq if pq else add_flat) * nlist / 1024
        scan = m["pq"]["scan_ns_per_vector"] if pq else m["flat_scan_ns_per_vector"]
        latency_ms = (nlist * coarse_ns_per_centroid + 16 * per_shard / nlist * scan) / 1e6
        plan.append({
            "images": n,
            "embed_gpu_hours": n / gpu_rate / 3600,
            "decode_cores_per_gpu": gpu_rate / m["decode_per_core"],
            "embed_cpu_core_hours": n / (m["model_cpu_images_per_s"] / (os.cpu_count() or 1)) / 3600,
            "index": f"IVF{nlist},PQ64" if pq else f"IVF{nlist},Flat",
            "shards": shards,
            "memory_per_shard_gb": per_shard * bpv / 1e9,
            "build_worker_hours": add_s / 3600,
            "query_ms_batch256_per_query": latency_ms,
            "gpu_rate_source": gpu_source,
        })
    return plan


def milvus_plan(dim: int, upload_rows_per_s: float, node_gb: float, hnsw_m: int = 32, pq_m: int = 64) -> list[dict]:
    """The capacity plan's Milvus column: what the query nodes of one replica hold, and the upload time.

    Computed, not measured on a cluster (none runs here). Rules:
      memory per vector   Milvus loads a collection's segments into query-node memory: IVF_FLAT 4 D + 8 bytes
                          (vector, int64 key), IVF_PQ m + 8 (codes and key; raw vectors stay on object storage),
                          HNSW 4 D + 8 M + 8 (vector, about 2 M links of 4 bytes, key); scalar fields (item id,
                          path, attributes) add their text length and are not counted
      index               the FAISS plan's rule: IVF_FLAT up to 10M vectors, IVF_PQ (m 64) above; HNSW beside it
      query nodes         per replica = ceil(memory / usable memory per node); replicas multiply it
      upload hours        N / the upsert rate of one client (given: measured with benchmarks/store_compare.py);
                          parallel uploads (retrieval index --engine ray) divide it as far as the cluster ingests
    """
    rows = []
    for n in PLAN_SIZES:
        pq = n > IVF_FLAT_UP_TO
        ivf_bpv = (pq_m + 8) if pq else (4 * dim + 8)
        hnsw_bpv = 4 * dim + 8 * hnsw_m + 8
        ivf_gb, hnsw_gb = n * ivf_bpv / 1e9, n * hnsw_bpv / 1e9
        rows.append({
            "images": n,
            "milvus_index": f"IVF_PQ (m {pq_m})" if pq else "IVF_FLAT",
            "memory_per_replica_gb": ivf_gb,
            "query_nodes_per_replica": math.ceil(ivf_gb / node_gb),
            "hnsw_memory_per_replica_gb": hnsw_gb,
            "hnsw_query_nodes_per_replica": math.ceil(hnsw_gb / node_gb),
            "upload_hours_one_client": n / upload_rows_per_s / 3600,
        })
    return rows


def print_milvus_plan(dim: int, upload_rows_per_s: float, node_gb: float) -> list[dict]:
    rows = milvus_plan(dim, upload_rows_per_s, node_gb)
    print(f"\n## Capacity plan, Milvus column ({dim}-d, {node_gb:g} GB usable per query node, upload "
          f"{upload_rows_per_s:,.0f} rows/s per client)")
    print("| images | Milvus index | memory per replica | query nodes per replica | HNSW (M 32) memory | "
          "HNSW query nodes | upload hours (1 client) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['images']:,} | {r['milvus_index']} | {r['memory_per_replica_gb']:,.1f} GB | "
              f"{r['query_nodes_per_replica']} | {r['hnsw_memory_per_replica_gb']:,.0f} GB | "
              f"{r['hnsw_query_nodes_per_replica']} | {r['upload_hours_one_client']:,.1f} |")
    return rows


# -- driver ------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="all", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=480, help="JPEGs for the embedding section")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--part-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--index-type", default="ivf-flat")
    p.add_argument("--shards", type=int, default=0)
    p.add_argument("--engine", default="local")
    p.add_argument("--pq-parts", type=int, default=4, help="parts (of 65,536 vectors) used for the IVF-PQ rates")
    p.add_argument("--gpu-images-per-s", type=float, default=0.0,
                   help="GPU embedding rate (images/s) measured on a CUDA machine, used when none is present here")
    p.add_argument("--milvus-upload-rows-per-s", type=float, default=0.0,
                   help="upserts/s of one client into Milvus (benchmarks/store_compare.py): adds the Milvus column")
    p.add_argument("--milvus-node-gb", type=float, default=64.0, help="usable memory per Milvus query node")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--only-embed", action="store_true")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=2, help="alternated runs per engine (best kept)")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="")
    p.add_argument("--out", default="")
    p.add_argument("--parts", default="")
    p.add_argument("--image-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--index", default="")
    a = p.parse_args()
    children = {"_embed": child_embed, "_make_parts": child_make_parts, "_build": child_build,
                "_search": child_search, "_pq": child_pq}
    if a.mode in children:
        print(json.dumps(children[a.mode](a), default=float))
        return
    if a.mode == "milvus-plan":  # the Milvus column alone: arithmetic on a given upload rate, nothing measured
        if a.milvus_upload_rows_per_s <= 0:
            p.error("milvus-plan needs --milvus-upload-rows-per-s (measure it with benchmarks/store_compare.py)")
        print_milvus_plan(a.dim, a.milvus_upload_rows_per_s, a.milvus_node_gb)
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="scale_out-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPU cores; load average at start {os.getloadavg()[0]:.1f}; work folder {work}")
    result: dict = {"cpu_cores": os.cpu_count()}

    if not a.skip_embed:
        imgs = work / "images"
        write_jpegs(imgs, a.images, 160)
        common = ["--image-dir", str(imgs), "--arch", a.arch, "--image-size", str(a.image_size), "--part-size",
                  str(a.part_size), "--batch-size", str(a.batch_size), "--workers", str(a.workers)]
        runs: dict[str, list[dict]] = {"local": [], "local1": [], "ray": []}
        for rep in range(a.repeats):  # alternated, best of each: fair on a machine shared with other work
            for key, extra in (("local", ["--engine", "local"]), ("local1", ["--engine", "local", "--threads", "1"]),
                               ("ray", ["--engine", "ray"])):
                out = work / f"emb_{key}_{rep}"
                runs[key].append(run_child(["_embed", *common, *extra, "--out", str(out)]))
                runs[key][-1]["folder"] = str(out)
        local, local1, ray = (max(runs[k], key=lambda r: r["steady_images_per_s"]) for k in ("local", "local1", "ray"))
        os.replace(Path(local["folder"]) / "all.npy", work / "emb_local_all.npy")
        os.replace(Path(ray["folder"]) / "all.npy", work / "emb_ray_all.npy")
        diff = float(np.abs(np.load(work / "emb_local_all.npy") - np.load(work / "emb_ray_all.npy")).max())
        result["embed"] = {"local": local, "local_1_thread": local1, "ray": ray, "max_abs_diff": diff}
        print(f"\n## Embedding {local['images']} JPEGs, best of {a.repeats} alternated runs per engine (160x120 -> {a.image_size} px, {a.arch}, 128-d, parts of "
              f"{a.part_size})")
        print("| engine | images/s end to end | images/s steady | ratio (steady) | ratio (end to end) |")
        print("| --- | --- | --- | --- | --- |")
        names = {id(local): f"local (1 process, {os.cpu_count()} threads: the default)",
                 id(local1): "local (1 process, 1 thread)", id(ray): f"ray ({a.workers} actors x 1 CPU)"}
        for row in (local, local1, ray):
            name = names[id(row)]
            print(f"| {name} | {row['images_per_s']:.1f} | {row['steady_images_per_s']:.1f} | "
                  f"{row['steady_images_per_s'] / local['steady_images_per_s']:.2f} | "
                  f"{row['images_per_s'] / local['images_per_s']:.2f} |")
        print(f"Ray start-up (not in the times above): {ray['ray_init_s']:.1f} s; max |ray - local| = {diff:.2e}")

    if a.only_embed:
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2, default=float))
        return
    decode = measure_decode_per_core(work)
    model_cpu = measure_model_cpu()
    gpu = measure_model_gpu()
    gpu_rate, gpu_source = (gpu, "measured in this run (CUDA)") if gpu else (
        (a.gpu_images_per_s, "given with --gpu-images-per-s") if a.gpu_images_per_s else (0.0, ""))
    result["rates"] = {"decode_per_core": decode, "model_cpu_images_per_s": model_cpu, "model_gpu_images_per_s": gpu}
    print(f"\nJPEG decode + preprocess (500x375 -> 224): {decode:.1f} images/s per core; ResNet-50 224 px forward "
          f"on this CPU: {model_cpu:.1f} images/s" + (f"; on CUDA: {gpu:,.0f} images/s" if gpu else ""))

    parts = work / "parts"
    if not (parts / "manifest.json").exists():
        made = run_child(["_make_parts", "--vectors", str(a.vectors), "--dim", str(a.dim), "--queries",
                          str(a.queries), "--part-size", "65536", "--out", str(parts)])
        print(f"\nwrote {made['vectors']:,} x {a.dim} clustered unit vectors as parts ({made['bytes_on_disk'] / 1e9:.2f} GB)")
    common = ["--parts", str(parts), "--nlist", str(a.nlist), "--nprobe", str(a.nprobe), "--index-type", a.index_type,
              "--workers", str(a.workers)]
    single = run_child(["_build", *common, "--out", str(work / "idx_single")])
    sharded = run_child(["_build", *common, "--shards", "2", "--engine", "ray", "--out", str(work / "idx_sharded")])
    worker_peak = max(w["max_rss_bytes"] for w in sharded["workers"])
    result["build"] = {"single": single, "sharded": sharded}
    gb = 1024**3
    print(f"\n## Index build from parts: {a.vectors:,} x {a.dim}, IVF{a.nlist},Flat (train on {64 * a.nlist:,} "
          f"sampled vectors), each build in a fresh process")
    print("| build | wall s | train s | add s | peak memory per process | wall ratio | memory ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| one process ({os.cpu_count()} threads) | {single['wall_s']:.1f} | {single['train_s']:.1f} | "
          f"{single['add_s']:.1f} | {single['driver_max_rss'] / gb:.2f} GiB | 1.00 | 1.00 |")
    print(f"| 2 shards on Ray, 2 workers x 1 CPU | {sharded['wall_s']:.1f} | {sharded['train_s']:.1f} | "
          f"{sharded['add_s']:.1f} | worker {worker_peak / gb:.2f} GiB, driver {sharded['driver_max_rss'] / gb:.2f} GiB | "
          f"{sharded['wall_s'] / single['wall_s']:.2f} | {worker_peak / single['driver_max_rss']:.2f} (worker) |")
    print(f"Ray start-up (not in the times above): {sharded['ray_init_s']:.1f} s")

    search = run_child(["_search", "--parts", str(parts), "--index", str(work / "idx_sharded")])
    result["search"] = search
    print(f"\n## Search: {search['queries']} held-out queries, k = 10, nprobe {search['nprobe']} of {search['nlist']}")
    print("| index | q/s batch 256 | q/s batch 1 | Recall@10 vs exact |")
    print("| --- | --- | --- | --- |")
    for name in ("merged", "sharded"):
        r = search[name]
        label = "merged (one index)" if name == "merged" else "2 shards searched in parallel"
        print(f"| {label} | {r['qps_b256']:,.0f} | {r['qps_b1']:,.0f} | {r['recall10']:.4f} |")
    print(f"identical top-10 rows, sharded vs merged: {100 * search['identical_rows']:.1f}%")

    pq = run_child(["_pq", "--parts", str(parts), "--nlist", str(max(64, a.nlist // 4)), "--nprobe", str(a.nprobe),
                    "--pq-parts", str(a.pq_parts)])
    result["pq"] = pq
    add_per_vector = np.mean([w["seconds"] / w["n_items"] for w in sharded["workers"]])
    measured = {
        "nlist": max(64, a.nlist // 4),
        "decode_per_core": decode, "model_cpu_images_per_s": model_cpu,
        "ivf_flat_bytes_per_vector": single["index_bytes"] / single["n"],
        "add_s_per_vector_1024": add_per_vector * 1024 / a.nlist,
        "flat_scan_ns_per_vector": search["scan_ns_per_vector"],
        "coarse_ns_per_centroid": search["scan_ns_per_vector"],  # a coarse centroid costs one D-dim inner product
        "pq": pq,
    }
    result["measured_for_plan"] = measured
    print(f"\nIVF-PQ64 on {pq['n']:,} of the vectors: {pq['bytes_per_vector']:.1f} bytes/vector, "
          f"{pq['add_per_s_1thread']:,.0f} vectors/s added per thread, scan {pq['scan_ns_per_vector']:.1f} ns/vector; "
          f"IVF-flat scan {search['scan_ns_per_vector']:.1f} ns/vector, add {add_per_vector * 1e6:.1f} us/vector "
          "per worker")
    if gpu_rate:
        plan = capacity_plan(measured, gpu_rate, gpu_source)
        result["plan"] = plan
        print(f"\n## Capacity plan (GPU rate {gpu_rate:,.0f} images/s: {gpu_source})")
        print("| images | embed GPU-hours | decode cores per GPU | index | shards | memory per shard | "
              "add worker-hours (1 CPU each) | query ms (batch 256, per query) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in plan:
            print(f"| {row['images']:,} | {row['embed_gpu_hours']:.1f} | {row['decode_cores_per_gpu']:.0f} | "
                  f"{row['index']} | {row['shards']} | {row['memory_per_shard_gb']:.1f} GB | "
                  f"{row['build_worker_hours']:,.0f} | {row['query_ms_batch256_per_query']:.2f} |")
    else:
        print("\nno GPU here and no --gpu-images-per-s given: the capacity plan needs a GPU embedding rate")
    if a.milvus_upload_rows_per_s > 0:
        result["milvus_plan"] = print_milvus_plan(a.dim, a.milvus_upload_rows_per_s, a.milvus_node_gb)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[2]:.1f} (15 min)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
