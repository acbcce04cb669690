"""Fixtures shared across test modules, and how the suite is spread over parallel workers.

`make test` runs the suite on pytest-xdist workers (`-n 2 --dist loadfile`). Each worker is a separate
process with its own session fixtures, so a module runs whole on one worker, in file order: its module-scoped
fixtures (a server, a trained run) are built once, and the Ray tests (one module) share one runtime. The few
heavy tests that share nothing with their module (SPREAD) are handed out one by one instead, and the heaviest
units go first, so that the suite does not end with one worker busy and the other idle.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests (node id prefixes) that use no module-scoped fixture and each run long: one scheduling unit each.
SPREAD = ("tests/test_trainer.py::test_short_feature_metrix_run",)
# Units known to run longest on 2 cores, heaviest first: the scheduler hands them out before the rest.
# Only the order changes; every test runs either way.
HEAVY_FIRST = (
    "tests/test_scale_ray.py",
    "tests/test_trainer.py::test_short_feature_metrix_run",
    "tests/test_cli_errors.py",
    "tests/test_milvus_store.py",
    "tests/test_analysis.py",
    "tests/test_bounded_decode.py",
    "tests/test_trainer.py",
    "tests/test_export.py",
    "tests/test_ddp.py",
    "tests/test_resume_kill.py",
    "tests/test_scale.py",
    "tests/test_gpu_checks.py",
    "tests/test_fused_pool.py",
    "tests/test_api_contract.py",
    "tests/test_access.py",
    "tests/test_app.py",
    "tests/test_app_browser.py",
    "tests/test_metrix.py",
    "tests/test_live.py",
    "tests/test_api.py",
)


def _worker_count() -> int:
    """How many xdist workers share this machine (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker, give torch (and the processes tests start) this worker's share of the cores:
    two workers each running 2 compute threads on 2 cores would fight over them."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // _worker_count())
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201 - xdist's types
    """`--dist loadfile`, except that each SPREAD test is a unit of its own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith(SPREAD) else super()._split_scope(nodeid)

    return ModuleScheduling(config, log)


def _rank(item: pytest.Item) -> int:
    for rank, prefix in enumerate(HEAVY_FIRST):
        if item.nodeid.startswith(prefix):
            return rank
    return len(HEAVY_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist's workers, the heaviest units first (a stable sort: a module's tests keep their order)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=_rank)


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
