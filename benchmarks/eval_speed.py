"""Evaluation speed on SOP-sized embeddings: ours vs pytorch-metric-learning vs a bare FAISS search.

Synthetic, seeded data shaped like the Stanford Online Products test set (60,502 x 512 float32,
11,316 classes of 2+ images, clustered around class centres, L2-normalised). In one run it times

  ours   retrieval.metrics.evaluate_embeddings: Recall@1/10/100/1000 + MAP@R + R-precision, all-vs-all
  pml    pytorch-metric-learning AccuracyCalculator: precision_at_1, mean_average_precision_at_r,
         r_precision (k="max_bin_count", the setting under which its MAP@R is correct; default FAISS kNN)
  faiss  a bare FAISS IndexFlatIP top-1000 search of the same embeddings (the floor for Recall@1000)

and prints the times, the ratios ours/pml and ours/faiss, and whether the metric values agree.
Targets: ours/pml <= 1.0 and ours/faiss <= 1.5. Rounds interleave the three methods so machine load
hits them alike; with --repeat > 1 each method's best time is used. Run with --n 8000 for a quick check.

    python benchmarks/eval_speed.py [--n 60502] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOP_TEST_IMAGES = 60_502
SOP_TEST_CLASSES = 11_316
KS = (1, 10, 100, 1000)


def make_embeddings(n: int, n_classes: int, dim: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around n_classes random centres; every class has at least two members."""
    if n < 2 * n_classes:
        raise ValueError(f"need n >= 2 * classes, got n={n}, classes={n_classes}")
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.multinomial(n - 2 * n_classes, np.full(n_classes, 1.0 / n_classes))
    labels = rng.permutation(np.repeat(np.arange(n_classes), sizes))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = centres[labels] + (noise / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb, dtype=np.float32), labels


def run_ours(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from retrieval.metrics import evaluate_embeddings

    return evaluate_embeddings(emb, labels, ks=KS, map_at_r=True, use_gpu=True)


def run_pml(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from retrieval.devices import torch_device

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch_device("auto"),
    )
    return calc.get_accuracy(emb, labels)


def run_bare_faiss(emb: np.ndarray) -> None:
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    index.search(emb, max(KS))


def timed(fn, *args):
    """(wall seconds, process CPU seconds over all threads, result); CPU time is less sensitive to other load."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=SOP_TEST_IMAGES, help="number of embeddings (default: SOP test size)")
    parser.add_argument("--classes", type=int, default=None, help="number of classes (default: SOP's images-per-class ratio)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.1, help="within-class spread (2.1 gives a Recall@1 well below 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the best time per method counts")
    parser.add_argument("--skip-pml", action="store_true")
    args = parser.parse_args()

    import faiss

    n_classes = args.classes or max(1, round(args.n * SOP_TEST_CLASSES / SOP_TEST_IMAGES))
    emb, labels = make_embeddings(args.n, n_classes, args.dim, args.seed, args.noise)
    from retrieval.knn import knn_device

    print(f"embeddings: {args.n:,} x {args.dim} float32, {n_classes:,} classes, max class size {np.bincount(labels).max()}")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; our k-NN device: {knn_device(True, max(KS) + 1)}")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    wall: dict[str, list[float]] = {"faiss": [], "ours": [], "pml": []}
    cpu: dict[str, list[float]] = {"faiss": [], "ours": [], "pml": []}
    ours = pml = None
    for round_no in range(args.repeat):
        t, c, _ = timed(run_bare_faiss, emb)
        wall["faiss"].append(t), cpu["faiss"].append(c)
        t, c, ours = timed(run_ours, emb, labels)
        wall["ours"].append(t), cpu["ours"].append(c)
        if not args.skip_pml:
            t, c, pml = timed(run_pml, emb, labels)
            wall["pml"].append(t), cpu["pml"].append(c)
        print(f"round {round_no + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items() if v))
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    best_wall = {k: min(v) for k, v in wall.items() if v}
    best_cpu = {k: min(v) for k, v in cpu.items() if v}
    labels_of = {
        "ours": f"ours  (R@{'/'.join(map(str, KS))} + MAP@R + RP)",
        "pml": "pml   (P@1 + MAP@R + RP)",
        "faiss": f"faiss (bare IndexFlatIP top-{max(KS)})",
    }
    print()
    print(f"{'':40s} {'wall s':>8s} {'CPU s':>8s}")
    for key in best_wall:
        print(f"{labels_of[key]:40s} {best_wall[key]:8.2f} {best_cpu[key]:8.2f}")
    ok = True
    for other, target in (("pml", 1.0), ("faiss", 1.5)):
        if other not in best_wall:
            continue
        ratio = best_wall["ours"] / best_wall[other]
        cpu_ratio = best_cpu["ours"] / best_cpu[other]
        ok &= ratio <= target
        verdict = "OK" if ratio <= target else "MISSED"
        print(f"ours / {other:5s} = {ratio:.3f} wall, {cpu_ratio:.3f} CPU  (target <= {target})  {verdict}")

    print()
    print("ours: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in ours.items()))
    if pml is not None:
        pairs = [("R@1", "precision_at_1"), ("MAP@R", "mean_average_precision_at_r"), ("RP", "r_precision")]
        diffs = {a: abs(ours[a] - pml[b]) for a, b in pairs}
        print("pml:  " + ", ".join(f"{b} {100 * pml[b]:.2f}" for _, b in pairs))
        # pml ranks by L2 and we by inner product: identical for unit vectors up to float rounding.
        agree = max(diffs.values()) <= 1e-4
        ok &= agree
        print(f"metric agreement (max |ours - pml| = {max(diffs.values()):.2e}): {'agree' if agree else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
