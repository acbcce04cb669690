"""Index metadata (retrieval.index.meta): typed, versioned, and folders of earlier versions still open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.index.errors import IndexFileError
from retrieval.index.folder import GalleryIndex
from retrieval.index.meta import FORMAT_VERSION, INDEX_FORMAT, IndexMeta
from retrieval.index.types import IndexParams

VERSION_1_FOLDER = Path(__file__).parent / "data" / "index_format_1"


@pytest.fixture
def v1_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "v1"
    shutil.copytree(VERSION_1_FOLDER, folder, ignore=shutil.ignore_patterns("README.md"))
    return folder


def _rewrite_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_folder_written_before_format_version_opens_searches_and_is_saved_as_the_current_version(v1_folder):
    assert "format_version" not in json.loads((v1_folder / "meta.json").read_text())
    index = GalleryIndex.load(v1_folder, use_gpu=False)
    assert len(index) == 12 and index.params == IndexParams("flat") and index.meta.index_type == "flat"
    assert index.meta.format_version == FORMAT_VERSION and index.meta.folder == str(v1_folder)
    assert index.fingerprint == "vectors:0000000000000000" and index.meta.protocol == "all-vs-all"
    assert index.items.item_ids == [f"item{i}" for i in range(12)] and index.items.labels == [i % 3 for i in range(12)]
    vectors = index.exact_gallery_vectors()
    scores, ids = index.search(vectors, 3)
    assert ids[:, 0].tolist() == list(range(12))  # every vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    index.save(v1_folder)
    written = json.loads((v1_folder / "meta.json").read_text())
    assert written["format_version"] == FORMAT_VERSION and written["format"] == INDEX_FORMAT
    assert written["index_type"] == "flat" and written["index_factory"] == "Flat" and written["n_items"] == 12
    assert GalleryIndex.load(v1_folder, use_gpu=False).search(vectors, 3)[1].tolist() == ids.tolist()


def test_metadata_from_before_index_params_were_recorded_reads_the_index_type():
    meta = IndexMeta.from_dict({"format": INDEX_FORMAT, "index_type": "hnsw", "n_items": 3})
    assert meta.index_params == IndexParams("hnsw") and meta.n_items == 3 and meta.extra == {}


def test_a_newer_format_version_is_refused_naming_the_release_that_wrote_it(v1_folder):
    _rewrite_meta(v1_folder, format_version=FORMAT_VERSION + 1, versions={"metrix-retrieval": "9.1.0"})
    newer = FORMAT_VERSION + 1
    with pytest.raises(IndexFileError, match=rf"written by metrix-retrieval 9\.1\.0 \(index format version {newer}\)"
                                             rf".*reads versions up to {FORMAT_VERSION}.*rebuild"):
        GalleryIndex.load(v1_folder, use_gpu=False)
    with pytest.raises(IndexFileError, match="invalid format_version"):
        IndexMeta.from_dict({"format": INDEX_FORMAT, "format_version": "two"})
    with pytest.raises(IndexFileError, match="not metrix-retrieval index metadata"):
        IndexMeta.from_dict({"format": "something else"})


def test_unknown_keys_are_kept_and_written_back(v1_folder):
    _rewrite_meta(v1_folder, written_by_a_later_release={"knob": 3})
    index = GalleryIndex.load(v1_folder, use_gpu=False)
    assert index.meta.extra == {"written_by_a_later_release": {"knob": 3}}
    index.save(v1_folder)
    assert json.loads((v1_folder / "meta.json").read_text())["written_by_a_later_release"] == {"knob": 3}


def test_the_json_form_round_trips_and_leaves_out_what_was_not_recorded():
    meta = IndexMeta(dataset="cub", fingerprint="fp", embedding_size=4, index_params=IndexParams("ivf-flat", nlist=8),
                     bad_images=[{"path": "a.jpg", "reason": "truncated"}], folder="/somewhere")
    raw = meta.to_dict()
    assert raw["index_type"] == "ivf-flat" and raw["index_factory"] == "IVF8,Flat" and raw["n_bad_images"] == 1
    assert "folder" not in raw and "extra" not in raw and "calibration" not in raw and "preprocessing" not in raw
    assert IndexMeta.from_dict(json.loads(json.dumps(raw))) == IndexMeta(**{**meta.__dict__, "folder": ""})
