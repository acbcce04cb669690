"""Wall time of a whole training recipe as a user runs it: `retrieval prepare`, then `retrieval train --cache`.

The default is the CUB-200-2011 multi-similarity recipe with feature-level Metrix (the preset's epochs,
5,864 training and 5,924 test images, 224 px crops, evaluation every 5 epochs, checkpoints every epoch), and
the plain recipe (no Metrix) of the same cell in the same run. The images are generated in CUB's official
layout with the real dataset's counts and typical size (about 500x375 JPEG), so decoding and the cache cost
what they cost on the real files.

Training every epoch of the recipe would take as long as the recipe, so each recipe trains a stated number of
epochs (its warm-up epochs plus `--full-epochs`, evaluating after each), and the total is extrapolated from
what that run measured: per-epoch time in each phase, per-evaluation time, per-checkpoint time, the trainer's
set-up and the process start. Nothing in the total is a fixed number.

    python benchmarks/recipe_time.py                                   # GPU: the full-size recipe
    python benchmarks/recipe_time.py --scale 0.02 --image-size 64 --arch resnet18 --full-epochs 1 \\
        --train-arg=--warmup-epochs=1                                  # a CPU dry run (minutes)

Headline target (one H200): the feature-Metrix recipe in <= 3 minutes including data, evaluation and
checkpoints. Imports only numpy, Pillow, torch and this project.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES = 5864, 5924  # CUB-200-2011: classes 1-100 and 101-200
CLI = "import sys; from retrieval.cli import main; sys.argv[0] = 'retrieval'; main()"


def _draw(task: tuple[Path, int, int, int, int]) -> None:
    """One photo-like JPEG: a smooth background, a few soft blobs of the class's colours, sensor noise."""
    path, cls, index, width, height = task
    rng = np.random.default_rng(cls * 100_003 + index)
    base = np.random.default_rng(cls).uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = base + 30 * np.stack([np.sin(xx / rng.uniform(40, 120) + c) for c in range(3)], axis=-1)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(25, 90)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + blob * np.random.default_rng(cls + 7).uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate_cub(root: Path, scale: float, workers: int) -> tuple[int, int]:
    """CUB_200_2011 layout under root with the real counts times `scale`; returns (train, test) image counts."""
    base = root / "CUB_200_2011"
    per_class_train = max(2, round(TRAIN_IMAGES * scale / 100))
    per_class_test = max(2, round(TEST_IMAGES * scale / 100))
    rng = np.random.default_rng(0)
    tasks, images, labels = [], [], []
    image_id = 0
    for cls in range(1, 201):
        for j in range(per_class_train if cls <= 100 else per_class_test):
            image_id += 1
            rel = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{j:04d}.jpg"
            width, height = int(rng.integers(420, 501)), int(rng.integers(300, 376))
            tasks.append((base / "images" / rel, cls, j, width, height))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_draw, tasks, chunksize=64))
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return per_class_train * 100, per_class_test * 100


def run_cli(args: list[str], log: Path) -> float:
    """Run `retrieval ARGS` in a fresh process (as a user does); returns its wall time in seconds."""
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-c", CLI, *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"retrieval {' '.join(args[:3])} ... failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - started


def resolved_config(train_args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CLI, "train", *train_args, "--print-config"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@dataclass
class RecipeTime:
    name: str
    epochs: int
    warmup_epochs: int
    evals: int
    warm_epoch_s: float
    full_epoch_s: float
    eval_s: float
    checkpoint_s: float
    setup_s: float
    process_s: float  # process start and exit around the trainer (imports, CUDA context)
    train_images: int

    @property
    def total_s(self) -> float:
        return (self.process_s + self.setup_s + self.warmup_epochs * self.warm_epoch_s
                + (self.epochs - self.warmup_epochs) * self.full_epoch_s + self.evals * self.eval_s
                + self.epochs * self.checkpoint_s)

    @property
    def sustained_images_per_s(self) -> float:
        return self.epochs * self.train_images / self.total_s


def measure_recipe(name: str, train_args: list[str], full_epochs: int, eval_every: int, work: Path,
                   train_images: int) -> RecipeTime:
    cfg = resolved_config(train_args)
    recipe_epochs, warmup = int(cfg["train"]["epochs"]), int(cfg["train"]["warmup_epochs"])
    measured = min(recipe_epochs, warmup + full_epochs)
    out = work / f"run-{name}"
    wall = run_cli(["train", *train_args, "--epochs", str(measured), "--eval-every", "1", "--out", str(out),
                    "--quiet"], work / f"train-{name}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") in ("warmup", "full")]
    summary = json.loads((out / "summary.json").read_text())
    warm = [r["epoch_time_s"] for r in rows if r["phase"] == "warmup"]
    full = [r["epoch_time_s"] for r in rows if r["phase"] == "full"]
    evals = [r["eval_time_s"] for r in rows if "eval_time_s" in r]
    if not full:
        raise SystemExit(f"{name}: no epoch after warm-up was measured; raise --full-epochs")
    # the first full epoch carries one-off costs (cuDNN plans, graph capture): the later ones are the rate
    full_rate = float(np.median(full[1:] if len(full) > 1 else full))
    in_trainer = summary["setup_time_s"] + sum(warm) + sum(full) + sum(evals) + summary["checkpoint_time_s"]
    return RecipeTime(
        name=name, epochs=recipe_epochs, warmup_epochs=warmup,
        evals=len(range(eval_every, recipe_epochs + 1, eval_every)) + (recipe_epochs % eval_every != 0),
        warm_epoch_s=float(np.median(warm)) if warm else 0.0,
        full_epoch_s=full_rate + (sum(full) - full_rate * len(full)) / (recipe_epochs - warmup),  # one-off cost spread
        eval_s=float(np.median(evals)), checkpoint_s=summary["checkpoint_time_s"] / len(rows),
        setup_s=summary["setup_time_s"], process_s=max(0.0, wall - in_trainer), train_images=train_images,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="ms")
    parser.add_argument("--mixup", default="feature", help="the Metrix level of the headline recipe")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of CUB's image count to generate")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--full-epochs", type=int, default=2, help="epochs after warm-up to measure per recipe")
    parser.add_argument("--eval-every", type=int, default=5, help="the recipe's evaluation period in epochs")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--train-arg", action="append", default=[], help="extra `retrieval train` argument (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated data and runs here")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="recipe-time-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        n_train, n_test = generate_cub(work / "data", args.scale, args.workers)
        print(f"generated CUB layout: {n_train} train + {n_test} test JPEGs (about 500x375) "
              f"in {time.perf_counter() - started:.0f}s")
        data_root = work / "data" / "CUB_200_2011"
        cache = work / "cache"
        prepare_s = run_cli(["prepare", "--dataset", "cub", "--data-root", str(data_root), "--out", str(cache),
                             "--workers", str(args.workers)], work / "prepare.log")
        print(f"retrieval prepare: {prepare_s:.1f}s")
        common = ["--dataset", "cub", "--data-root", str(data_root), "--cache", str(cache), "--loss", args.loss,
                  "--image-size", str(args.image_size), "--arch", args.arch, "--pretrained", "none",
                  "--workers", str(min(args.workers, 8)), *args.train_arg]
        results = []
        for name, level in (("plain", "none"), (f"metrix-{args.mixup}", args.mixup)):
            res = measure_recipe(name, [*common, "--mixup", level], args.full_epochs, args.eval_every, work, n_train)
            results.append(res)
        print(f"\n{'recipe':<16} {'epochs':>6} {'warm ep s':>9} {'full ep s':>9} {'eval s':>7} {'ckpt s':>7} "
              f"{'setup s':>8} {'total':>9} {'img/s sustained':>16}")
        for r in results:
            print(f"{r.name:<16} {r.epochs:>6} {r.warm_epoch_s:>9.2f} {r.full_epoch_s:>9.2f} {r.eval_s:>7.2f} "
                  f"{r.checkpoint_s:>7.2f} {r.setup_s + r.process_s:>8.1f} {r.total_s / 60:>7.2f} min "
                  f"{r.sustained_images_per_s:>16.0f}")
        plain, metrix = results
        print(f"\nprepare (once per dataset): {prepare_s:.1f}s")
        print(f"{metrix.name} recipe incl. prepare: {(metrix.total_s + prepare_s) / 60:.2f} min "
              f"(target <= 3 min on one H200); per epoch vs plain: {plain.full_epoch_s / metrix.full_epoch_s:.3f}x")
        print("totals extrapolate the measured per-epoch, per-evaluation and per-checkpoint times to the recipe's "
              f"{metrix.epochs} epochs ({metrix.evals} evaluations); the plain recipe at its preset's {plain.epochs}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
