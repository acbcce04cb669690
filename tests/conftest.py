"""Fixtures shared across test modules (kept minimal)."""

from __future__ import annotations

from pathlib import Path

import pytest

# A small demo dataset: 40 train products and 40 unseen test products, 12 photos each, 64 px (960 images).
# 240 queries keep query/gallery Recall@1 from being decided by a handful of images.
SMALL_DEMO = dict(seed=0, num_train_classes=40, num_test_classes=40, images_per_class=12, image_size=64)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo dataset (In-Shop layout), generated once per test session."""
    from retrieval.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", **SMALL_DEMO)


@pytest.fixture(scope="session")
def ray_runtime():
    """One small local Ray runtime (2 CPUs, no dashboard) shared by every test marked `ray`."""
    ray = pytest.importorskip("ray", reason="the Ray tests need the `ray` extra: pip install -e .[ray]")
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
