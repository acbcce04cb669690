"""Fixtures shared across test modules (kept minimal)."""

from __future__ import annotations

from pathlib import Path

import pytest

# A small demo dataset: 40 train products and 40 unseen test products, 12 photos each, 64 px (960 images).
# 240 queries keep query/gallery Recall@1 from being decided by a handful of images.
SMALL_DEMO = dict(seed=0, num_train_classes=40, num_test_classes=40, images_per_class=12, image_size=64,
                  test_images_per_class=None)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo dataset (In-Shop layout), generated once per test session."""
    from retrieval.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", **SMALL_DEMO)


@pytest.fixture(scope="session")
def small_index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small served index (demo layout: 8 test products x 2 gallery photos, categories and genders to filter
    on, neighbour lists for DBA) embedded by an untrained resnet18 at 32 px: for server tests that need
    a real index, not a large one."""
    from retrieval.data.demo import generate_demo
    from retrieval.data.inshop import load_inshop
    from retrieval.embed.spec import EmbedderSpec, open_embedder
    from retrieval.index.build import build_index

    root = generate_demo(tmp_path_factory.mktemp("small-data") / "demo", seed=0, num_train_classes=2,
                         num_test_classes=8, images_per_class=4, image_size=32, test_images_per_class=None)
    backend = open_embedder(EmbedderSpec.untrained("resnet18", embedding_size=8, image_size=32), "cpu")
    out = tmp_path_factory.mktemp("small-index") / "demo-index"
    build_index(load_inshop(root, name="demo"), backend, out, progress=False, rerank_neighbours=4)
    return out


@pytest.fixture(scope="session")
def ray_runtime():
    """One small local Ray runtime (2 CPUs, no dashboard) shared by every test marked `ray`."""
    ray = pytest.importorskip("ray", reason="the Ray tests need the `ray` extra: pip install -e .[ray]")
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
