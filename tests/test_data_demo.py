"""The embedded demo dataset: In-Shop layout, disjoint test items, deterministic, idempotent, atomic."""

from __future__ import annotations

import hashlib

import pytest

from retrieval.data import load_dataset
from retrieval.data import demo as demo_mod
from retrieval.data.demo import demo_classes, generate_demo
from retrieval.errors import UsageError
from retrieval.images import open_image

SMALL = dict(num_train_classes=4, num_test_classes=3, images_per_class=4, image_size=64, test_images_per_class=None)


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != demo_mod.MARKER_FILE:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return generate_demo(tmp_path_factory.mktemp("d") / "demo", seed=0, **SMALL)


def test_demo_is_an_inshop_dataset(small_demo):
    ds = load_dataset("demo", small_demo)
    assert ds.name == "demo" and ds.protocol == "query-gallery"
    assert ds.recall_ks == (1, 10, 20, 30, 40, 50)
    assert len(ds.train) == 16 and ds.train.num_classes == 4
    assert len(ds.query) == len(ds.gallery) == 6 and ds.query.num_classes == 3
    assert set(ds.train.item_ids).isdisjoint(ds.query.item_ids + ds.gallery.item_ids)  # unseen test products
    assert set(ds.query.item_ids) == set(ds.gallery.item_ids)
    inshop = load_dataset("inshop", small_demo)  # the real In-Shop loader reads it too
    assert inshop.query.paths == ds.query.paths
    img = open_image(ds.query.paths[0])
    assert img.size == (64, 64) and ds.query.paths[0].suffix == ".jpg"


def test_demo_catalogue_records_classes(small_demo):
    classes = demo_classes(small_demo)
    assert len(classes) == 7 and sum(c.split == "test" for c in classes) == 3
    assert len({(c.family, c.primary, c.secondary, c.pattern) for c in classes}) == 7


def test_test_products_can_have_more_photos_than_train_products(tmp_path):
    """Many train products with few photos each; test products keep enough photos for a query and a gallery."""
    root = generate_demo(tmp_path / "demo", num_train_classes=3, num_test_classes=2, images_per_class=2,
                         test_images_per_class=4, image_size=32)
    ds = load_dataset("demo", root)
    assert len(ds.train) == 6 and len(ds.query) == len(ds.gallery) == 4
    assert sorted(ds.query.labels) == sorted(ds.gallery.labels)  # two queries and two gallery photos per item
    with pytest.raises(UsageError, match="must be >= 2"):
        generate_demo(tmp_path / "bad", num_train_classes=3, num_test_classes=2, test_images_per_class=1)


def test_demo_is_deterministic_per_seed(small_demo, tmp_path):
    again = generate_demo(tmp_path / "again", seed=0, **SMALL)
    assert _digest(again) == _digest(small_demo)
    other = generate_demo(tmp_path / "other", seed=1, **SMALL)
    assert _digest(other) != _digest(small_demo)


def test_demo_images_vary_within_a_class(small_demo):
    import numpy as np

    ds = load_dataset("demo", small_demo)
    a, b = (np.asarray(open_image(p), dtype=float) for p in ds.train.paths[:2])
    assert ds.train.labels[0] == ds.train.labels[1]
    assert np.abs(a - b).mean() > 10  # different pose / background, not copies


def test_demo_is_idempotent(tmp_path, monkeypatch):
    root = generate_demo(tmp_path / "demo", **SMALL)
    stamp = (root / demo_mod.MARKER_FILE).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete demo")

    monkeypatch.setattr(demo_mod, "_write_demo", fail)
    assert generate_demo(tmp_path / "demo", **SMALL) == root
    assert (root / demo_mod.MARKER_FILE).stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # other parameters replace the old demo
    generate_demo(tmp_path / "demo", **{**SMALL, "images_per_class": 2})
    assert len(load_dataset("demo", root).train) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp or old folders left


def test_demo_generation_is_atomic(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = demo_mod._draw_photo

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_mod, "_draw_photo", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_demo(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "user data"


def test_load_dataset_draws_missing_demo(tmp_path, monkeypatch):
    seen = {}

    def fake_generate(root, **kwargs):
        seen["root"] = root
        return generate_demo(root, **SMALL)

    monkeypatch.setattr(demo_mod, "generate_demo", fake_generate)
    ds = load_dataset("demo", tmp_path / "fresh")
    assert seen["root"] == tmp_path / "fresh" and len(ds.query) == 6
