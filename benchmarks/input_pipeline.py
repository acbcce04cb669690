"""How fast each input path feeds training, measured in one run against synthetic on-device tensors.

Paths:
  plain    DataLoader + Pillow decode + RandomResizedCrop + flip in worker processes (the file pipeline)
  cache    decoded-image cache (`retrieval prepare`) + batched crop/flip/normalise on the device
  decode   JPEG bytes read by threads, decoded on the GPU (nvJPEG) + the same device augmentation
           (needs CUDA; skipped with a message otherwise)
For each: images/s delivered on the device (input only), and images/s of a full training step fed
by it, as a ratio to the same step on synthetic tensors already on the device (the ceiling).

The dataset is generated here: JPEGs of about 500x375 (some portrait), in a temporary folder.

    python benchmarks/input_pipeline.py                            # GPU defaults: ResNet-50, 224 px, batch 120
    python benchmarks/input_pipeline.py --arch resnet18 --image-size 128 --images 200 --batch-size 32 --steps 12

Imports only torch/torchvision/numpy/Pillow/tqdm/rich and this project.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import LossConfig, MixupConfig, ModelConfig, RunConfig  # noqa: E402
from retrieval.devices import torch_device  # noqa: E402
from retrieval.data.base import Split  # noqa: E402
from retrieval.model import Embedder  # noqa: E402
from training.levels import level_names  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Synthetic dataset
# ----------------------------------------------------------------------------------------------


def _write_jpeg(args: tuple[Path, int]) -> int:
    """One photo-like JPEG: smooth random colour field + fine grain, ~60 KB at 500x375 (photo sets: ~57 KB)."""
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if seed % 4 else (375, 500)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    img.save(path, quality=90)
    return path.stat().st_size


def make_dataset(folder: Path, n: int, images_per_class: int = 5) -> tuple[Split, float]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(_write_jpeg, [(p, i) for i, p in enumerate(paths)], chunksize=16))
    labels = tuple(i // images_per_class for i in range(n))
    return Split("train", tuple(paths), labels), float(np.mean(sizes))


# ----------------------------------------------------------------------------------------------
# Sampler (the project's, or a minimal stand-in with the same protocol)
# ----------------------------------------------------------------------------------------------


def make_sampler(n: int, batch_size: int, seed: int = 0):  # noqa: ANN201
    try:
        from retrieval.data.samplers import RandomBatchSampler

        return RandomBatchSampler(n, batch_size, seed=seed, drop_last=True)
    except ImportError:
        class _Random:
            def __init__(self) -> None:
                self.epoch = 0

            def set_epoch(self, epoch: int) -> None:
                self.epoch = epoch

            def __len__(self) -> int:
                return n // batch_size

            def __iter__(self) -> Iterator[list[int]]:
                perm = np.random.default_rng([seed, self.epoch]).permutation(n)
                return iter([perm[i : i + batch_size].tolist() for i in range(0, len(self) * batch_size, batch_size)])

        return _Random()


# ----------------------------------------------------------------------------------------------
# Input paths: each yields (images on device, labels on device) forever (epoch after epoch)
# ----------------------------------------------------------------------------------------------


def _epochs(loader, sampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        else:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def plain_batches(split: Split, args: argparse.Namespace, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from torch.utils.data import DataLoader

    from retrieval.data.loading import ImageDataset
    from retrieval.data.transforms import train_transform

    def collate(items):  # noqa: ANN001, ANN202
        return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items], dtype=torch.long)

    sampler = make_sampler(len(split), args.batch_size)
    loader = DataLoader(
        ImageDataset(split, train_transform(args.image_size)), batch_sampler=sampler, num_workers=args.workers,
        collate_fn=collate, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )  # fmt: skip
    non_blocking = device.type == "cuda"
    for images, labels in _epochs(loader, sampler):
        yield images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)


def cache_batches(cache_dir: Path, split: Split, args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    from retrieval.data.cache.loader import CacheTrainLoader

    sampler = make_sampler(len(split), args.batch_size)
    loader = CacheTrainLoader(cache_dir, split.name, sampler, args.image_size, device, seed=0,
                              channels_last=device.type == "cuda")
    return _epochs(loader, sampler)


def decode_batches(split: Split, args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    from benchmarks.gpu_decode import DecodeTrainLoader

    sampler = make_sampler(len(split), args.batch_size)
    loader = DecodeTrainLoader(split, sampler, args.image_size, device, seed=0, threads=args.decode_threads,
                               channels_last=device.type == "cuda")
    return _epochs(loader, sampler)


def synthetic_batches(split: Split, args: argparse.Namespace, device: torch.device):  # noqa: ANN201
    g = torch.Generator().manual_seed(0)
    images = torch.randn((args.batch_size, 3, args.image_size, args.image_size), generator=g).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    first = next(iter(make_sampler(len(split), args.batch_size)))
    labels = torch.tensor([split.labels[i] for i in first], dtype=torch.long, device=device)
    while True:
        yield images, labels


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int, device: torch.device) -> float:
    """Images/s delivered on the device, nothing else running."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        images, _ = next(batches)
        n += images.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


class TrainStep:
    """One optimisation step of the embedder on a batch: forward, loss, backward, AdamW; no host syncs."""

    def __init__(self, args: argparse.Namespace, device: torch.device, num_classes: int) -> None:
        self.device = device
        self.model = Embedder(ModelConfig(arch=args.arch, embedding_size=512, pretrained="none")).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        try:
            from training.objective import build_objective

            cfg = RunConfig(loss=LossConfig(name="ms"), mixup=MixupConfig(level=args.mixup))
            objective = build_objective(cfg, num_classes, 512).to(device)
            self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
                lambda x, y: objective(self.model, x, y).loss)
            self.loss_name = f"training.objective (multi-similarity, mixup {args.mixup})"
            params = list(self.model.parameters()) + list(objective.parameters())
        except ImportError:
            self.loss_fn = self._simple_loss
            self.loss_name = "simple contrastive loss (training.objective not available)"
            params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        if device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp = None

    def _simple_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.model(images).float()
        sim = emb @ emb.T
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = (1 - sim)[same & ~eye].sum()
        neg = torch.relu(sim - 0.5)[~same].sum()
        return (pos + neg) / len(labels)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.loss_fn(images, labels)
        loss.backward()
        self.opt.step()


def step_rate(step: TrainStep, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int,
              device: torch.device) -> float:
    """Images/s of training steps fed by `batches`."""
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        n += images.shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="synthetic JPEGs to generate")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--short-side", type=int, default=256, help="cache short side")
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--steps", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches before each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median reported)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="DataLoader workers / cache writers")
    parser.add_argument("--decode-threads", type=int, default=4, help="file-reading threads of the GPU-decode loader")
    parser.add_argument("--mixup", default="none", help=f"mixup level of the training step ({'/'.join(level_names())})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", type=Path, default=None, help="write the dataset and cache here instead of a temp folder")
    parser.add_argument("--skip-train", action="store_true", help="measure input rates only")
    args = parser.parse_args(list(argv) if argv is not None else None)

    from rich.console import Console
    from rich.table import Table

    from retrieval.data.cache.writer import prepare_split

    console = Console(width=max(Console().width, 132))
    device = torch_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tmp = tempfile.TemporaryDirectory(prefix="input-pipeline-") if args.keep is None else None
    work = Path(tmp.name) if tmp is not None else args.keep
    try:
        t0 = time.perf_counter()
        split, mean_bytes = make_dataset(work / "images", args.images)
        console.print(f"dataset: {len(split):,} JPEGs (~500x375, mean {mean_bytes / 1024:.0f} KB) in "
                      f"{time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        report = prepare_split(split, work / "cache", dataset="synthetic", root=work, short_side=args.short_side,
                               workers=args.workers, show_progress=False, overwrite=True)
        prep_s = time.perf_counter() - t0
        console.print(f"cache: {report.count:,} images, {report.total_bytes / 2**20:.0f} MiB, written at "
                      f"{report.count / prep_s:,.0f} images/s with {args.workers} processes")

        paths: dict[str, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]] = {
            f"plain DataLoader (Pillow + RandomResizedCrop, {args.workers} workers)":
                lambda: plain_batches(split, args, device),
            "decoded-image cache + device augment": lambda: cache_batches(work / "cache", split, args, device),
        }  # fmt: skip
        if device.type == "cuda":
            paths["GPU JPEG decode (nvJPEG) + device augment"] = lambda: decode_batches(split, args, device)
        else:
            console.print("[yellow]GPU-decode loader skipped: no CUDA device (it decodes with nvJPEG on the GPU)[/yellow]")

        # One live iterator per path, measured in interleaved rounds (median), so drift in machine
        # load or clocks affects every path alike.
        streams = {name: make() for name, make in paths.items()}
        inputs: dict[str, float] = {}
        rounds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, stream in streams.items():
                rounds[name].append(input_rate(stream, args.steps, args.warmup, device))
        for name in paths:
            inputs[name] = float(np.median(rounds[name]))
            console.print(f"  input  {name}: {inputs[name]:,.0f} images/s")

        steps: dict[str, float] = {}
        step = None
        if not args.skip_train:
            step = TrainStep(args, device, num_classes=max(split.labels) + 1)
            synth = "synthetic tensors on the device"
            streams = {synth: synthetic_batches(split, args, device), **streams}
            rounds = {name: [] for name in streams}
            for _ in range(args.rounds):
                for name, stream in streams.items():
                    rounds[name].append(step_rate(step, stream, args.steps, args.warmup, device))
            for name in streams:
                steps[name] = float(np.median(rounds[name]))
                console.print(f"  step   {name}: {steps[name]:,.1f} images/s")

        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        precision = "fp32" if step is None or step.amp is None else f"{str(step.amp).replace('torch.', '')} autocast"
        table = Table(title=f"input pipeline on {gpu}: {args.arch}, {args.image_size} px, batch {args.batch_size}, "
                            f"{precision}")
        table.add_column("input path")
        table.add_column("input only, images/s", justify="right")
        table.add_column("training step, images/s", justify="right")
        table.add_column("step vs synthetic", justify="right")
        base = steps.get("synthetic tensors on the device")
        if base:
            table.add_row("synthetic tensors on the device", "-", f"{base:,.1f}", "1.00")
        for name in paths:
            rate = steps.get(name)
            table.add_row(name, f"{inputs[name]:,.0f}", "-" if rate is None else f"{rate:,.1f}",
                          "-" if rate is None or not base else f"{rate / base:.2f}")
        if device.type != "cuda":
            table.add_row("GPU JPEG decode (nvJPEG) + device augment", "skipped (no CUDA)", "-", "-")
        console.print(table)
        if step is not None:
            console.print(f"loss: {step.loss_name}; median of {args.rounds} interleaved rounds of {args.steps} timed "
                          f"steps (after {args.warmup} warm-up steps each); torch {torch.__version__}")
        console.print("target on an H100/H200: training fed from the cache at >= 0.90x the synthetic step")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
