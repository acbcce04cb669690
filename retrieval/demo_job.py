"""The demo: every stage of the product on the embedded demo dataset, in one call.

generate the dataset -> evaluate an untrained embedder -> train with Metrix -> index the gallery ->
evaluate the index -> (optionally) serve the web UI. Each stage is the same library call the
individual commands make; nothing here is demo-only logic except the small default settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.config import RunConfig, override, preset


@dataclass
class DemoResult:
    dataset_root: Path
    checkpoint: Path
    index_dir: Path
    untrained: dict[str, float]
    trained: dict[str, float]  # last epoch, through the index
    recall_ks: tuple[int, ...]
    seconds: float


def demo_config(data_root: Path, run_dir: Path, loss: str, mixup: str, epochs: int | None) -> RunConfig:
    cfg = preset("demo", loss, mixup)
    cfg.data = override(cfg.data, root=str(data_root))
    cfg.train = override(cfg.train, out_dir=str(run_dir), epochs=epochs)
    return cfg


def run_demo(
    data_root: Path = Path("data/demo"),
    run_dir: Path = Path("runs/demo"),
    index_dir: Path = Path("indexes/demo"),
    loss: str = "ms",
    mixup: str = "feature",
    epochs: int | None = None,
    say: Callable[[str], None] = print,
) -> DemoResult:
    from retrieval.data import load_dataset
    from retrieval.data.demo import generate_demo
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import build_index
    from retrieval.search.searcher import Searcher
    from training.trainer import train

    started = time.perf_counter()
    say(f"[1/4] demo dataset -> {data_root}")
    generate_demo(data_root, progress=True)
    dataset = load_dataset("demo", data_root)
    n_query, n_gallery = (len(split) if split is not None else 0 for split in (dataset.query, dataset.gallery))
    say(
        f"      {len(dataset.train)} train images, {n_query} queries, {n_gallery} gallery images "
        "(test products never seen in training)"
    )

    cfg = demo_config(data_root, run_dir, loss, mixup, epochs)
    say(
        f"[2/4] training {cfg.model.arch} ({cfg.loss.name} loss, Metrix at the {cfg.mixup.level} level, "
        f"{cfg.train.epochs} epochs, {cfg.data.image_size} px) -> {run_dir}"
    )
    result = train(cfg, progress=True, evaluate_before=True)

    say(f"[3/4] indexing the gallery with the trained embedder -> {index_dir}")
    backend = open_embedder(EmbedderSpec.checkpoint(result.last_checkpoint))
    build_index(dataset, backend, index_dir, progress=True)

    say("[4/4] evaluating the stored queries against the index")
    trained = Searcher.open(index_dir, backend).evaluate()
    return DemoResult(
        dataset_root=data_root,
        checkpoint=result.last_checkpoint,
        index_dir=index_dir,
        untrained=result.initial_metrics or {},
        trained=trained,
        recall_ks=tuple(dataset.recall_ks),
        seconds=time.perf_counter() - started,
    )
