"""Dataset loaders on fake copies of each official layout: counts, labels, splits, protocol and errors."""

from __future__ import annotations

import sys

import pytest

from retrieval.data import DATASETS, DatasetLayoutError, load_dataset
from tests.fakes import make_fake_cars, make_fake_cub, make_fake_inshop, make_fake_sop, make_image_folder


def _assert_valid(split, n, classes):
    assert len(split) == n
    assert split.num_classes == classes
    assert sorted(set(split.labels)) == list(range(classes))  # dense 0..C-1
    assert all(p.is_file() for p in split.paths)


# --- CUB ------------------------------------------------------------------------------------------


def test_cub_splits_by_class_id(tmp_path):
    base = make_fake_cub(tmp_path, train_classes=3, test_classes=2, per_class=4)
    for root in (tmp_path, base):  # the archive folder or its parent
        ds = load_dataset("cub", root)
        assert ds.protocol == "all-vs-all" and ds.recall_ks == (1, 2, 4, 8, 16, 32)
        _assert_valid(ds.train, 12, 3)
        _assert_valid(ds.test, 8, 2)
        assert set(ds.train.item_ids) == {"001.Bird_1", "002.Bird_2", "003.Bird_3"}
        assert set(ds.test.item_ids) == {"101.Bird_101", "102.Bird_102"}
        assert ds.eval_splits() == (ds.test, ds.test)
    # labels follow class ids: the image of class 102 gets test label 1
    i = ds.test.item_ids.index("102.Bird_102")
    assert ds.test.labels[i] == 1


def test_cub_missing_label_file(tmp_path):
    base = make_fake_cub(tmp_path)
    (base / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset("cub", tmp_path)
    assert "image_class_labels.txt" in str(err.value) and "Expected layout" in str(err.value)


def test_cub_missing_image_is_named(tmp_path):
    base = make_fake_cub(tmp_path)
    victim = sorted((base / "images").rglob("*.jpg"))[5]
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match=victim.name):
        load_dataset("cub", tmp_path)


def test_cub_malformed_line(tmp_path):
    base = make_fake_cub(tmp_path)
    with open(base / "image_class_labels.txt", "a") as fh:
        fh.write("999\n")
    with pytest.raises(DatasetLayoutError, match=r"image_class_labels.txt line \d+"):
        load_dataset("cub", tmp_path)


# --- Cars -----------------------------------------------------------------------------------------


def test_cars_reads_real_mat_file(tmp_path):
    make_fake_cars(tmp_path, train_classes=2, test_classes=3, per_class=3)
    ds = load_dataset("cars", tmp_path)
    assert ds.protocol == "all-vs-all" and ds.recall_ks == (1, 2, 4, 8, 16, 32)
    _assert_valid(ds.train, 6, 2)
    _assert_valid(ds.test, 9, 3)
    assert set(ds.train.item_ids) == {"Car Model 1", "Car Model 2"}
    assert set(ds.test.item_ids) == {"Car Model 99", "Car Model 100", "Car Model 101"}
    # the official `test` flag (alternating in the fake) is ignored: the split is by class
    assert all(p.parent.name == "car_ims" for p in ds.train.paths)


def test_cars_missing_mat(tmp_path):
    make_fake_cars(tmp_path)
    (tmp_path / "cars_annos.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat"):
        load_dataset("cars", tmp_path)


def test_cars_corrupt_mat(tmp_path):
    make_fake_cars(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a matlab file at all" * 10)
    with pytest.raises(DatasetLayoutError, match="cars_annos.mat"):
        load_dataset("cars", tmp_path)


def test_cars_mat_without_annotations(tmp_path):
    from scipy.io import savemat

    make_fake_cars(tmp_path)
    savemat(str(tmp_path / "cars_annos.mat"), {"something_else": [1, 2, 3]})
    with pytest.raises(DatasetLayoutError, match="annotations"):
        load_dataset("cars", tmp_path)


# --- SOP ------------------------------------------------------------------------------------------


def test_sop_splits_and_labels(tmp_path):
    base = make_fake_sop(tmp_path, train_classes=4, test_classes=3, per_class=2)
    ds = load_dataset("sop", tmp_path)
    assert ds.root == base
    assert ds.protocol == "all-vs-all" and ds.recall_ks == (1, 10, 100, 1000)
    _assert_valid(ds.train, 8, 4)
    _assert_valid(ds.test, 6, 3)
    assert set(ds.test.item_ids) == {"11319", "11320", "11321"}
    assert ds.test.labels[ds.test.item_ids.index("11321")] == 2


def test_sop_bad_header(tmp_path):
    base = make_fake_sop(tmp_path)
    text = (base / "Ebay_test.txt").read_text().split("\n", 1)[1]
    (base / "Ebay_test.txt").write_text(text)
    with pytest.raises(DatasetLayoutError, match="Ebay_test.txt line 1"):
        load_dataset("sop", base)


def test_sop_missing_test_file(tmp_path):
    base = make_fake_sop(tmp_path)
    (base / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="Ebay_test.txt"):
        load_dataset("sop", tmp_path)


# --- In-Shop --------------------------------------------------------------------------------------


def test_inshop_query_gallery_share_labels(tmp_path):
    make_fake_inshop(tmp_path, train_items=3, test_items=4, per_item=4)
    ds = load_dataset("inshop", tmp_path)
    assert ds.protocol == "query-gallery" and ds.recall_ks == (1, 10, 20, 30, 40, 50)
    _assert_valid(ds.train, 12, 3)
    assert len(ds.query) == len(ds.gallery) == 8
    q, g = ds.eval_splits()
    assert (q, g) == (ds.query, ds.gallery) and ds.gallery_split() is ds.gallery
    # the same item id carries the same label in query and gallery
    label_of = {}
    for split in (ds.query, ds.gallery):
        for item, label in zip(split.item_ids, split.labels):
            assert label_of.setdefault(item, label) == label
    assert sorted(label_of.values()) == [0, 1, 2, 3]
    assert not set(ds.train.item_ids) & set(label_of)
    assert all("Img" in p.parts for p in ds.query.paths)


def test_inshop_count_mismatch(tmp_path):
    make_fake_inshop(tmp_path)
    part = tmp_path / "Eval" / "list_eval_partition.txt"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-2]) + "\n")  # truncated: fewer rows than declared
    with pytest.raises(DatasetLayoutError, match="declares"):
        load_dataset("inshop", tmp_path)


def test_inshop_bad_status(tmp_path):
    make_fake_inshop(tmp_path)
    part = tmp_path / "Eval" / "list_eval_partition.txt"
    part.write_text(part.read_text().replace(" query", " probe", 1))
    with pytest.raises(DatasetLayoutError, match=r"list_eval_partition.txt line \d+"):
        load_dataset("inshop", tmp_path)


def test_inshop_missing_partition_shows_layout(tmp_path):
    make_fake_inshop(tmp_path)
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        load_dataset("inshop", tmp_path)
    assert "list_eval_partition.txt" in str(err.value) and "Img/" in str(err.value)


def test_inshop_missing_image_named(tmp_path):
    make_fake_inshop(tmp_path)
    victim = sorted((tmp_path / "Img").rglob("*.jpg"))[-1]
    victim.unlink()
    with pytest.raises(DatasetLayoutError, match="first missing: .*" + victim.name):
        load_dataset("inshop", tmp_path)


# --- image folder ---------------------------------------------------------------------------------


def test_folder_split_rule(tmp_path):
    make_image_folder(tmp_path, classes=5, per_class=3)
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    (tmp_path / "class_00" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", tmp_path)
    assert ds.protocol == "all-vs-all" and ds.recall_ks == (1, 2, 4, 8)
    _assert_valid(ds.train, 9, 3)  # ceil(5 / 2) = 3 classes by sorted name
    _assert_valid(ds.test, 6, 2)
    assert set(ds.train.item_ids) == {"class_00", "class_01", "class_02"}
    assert set(ds.test.item_ids) == {"class_03", "class_04"}


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found"):
        load_dataset("folder", tmp_path / "nowhere")
    make_image_folder(tmp_path, classes=1)
    with pytest.raises(DatasetLayoutError, match="at least 2"):
        load_dataset("folder", tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetLayoutError, match="empty_class"):
        load_dataset("folder", tmp_path)


# --- registry -------------------------------------------------------------------------------------


def test_every_dataset_has_layout_protocol_and_ks():
    assert set(DATASETS) == {"cub", "cars", "sop", "inshop", "folder", "demo"}
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.title and callable(spec.load)
        assert spec.layout.strip() and spec.recall_ks[0] == 1
        assert spec.protocol in ("all-vs-all", "query-gallery")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", ".")


def test_package_import_is_light():
    import subprocess

    code = "import sys, retrieval.data; print('torch' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
